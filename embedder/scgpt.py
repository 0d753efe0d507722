"""scGPT adapter (whole-human checkpoint layout: ``best_model.pt`` + ``args.json`` + ``vocab.json``).

Follows ``bowang-lab/scGPT@cebd6fae655b9c585a4807daa3ac31bb764f06b4``:
``scgpt/tasks/cell_emb.py`` (``embed_data``, ``get_batch_cell_embeddings``),
``scgpt/data_collator.py`` (``DataCollator``), ``scgpt/preprocess.py`` (``binning``,
``_digitize``) and ``scgpt/model/model.py`` (``TransformerModel._encode``).

Per cell: the expressed in-vocabulary genes (``var["symbol"]`` → ``vocab.json`` id) in var
order with their raw counts, the counts binned into 51 bins by quantiles of the cell's
non-zero values, ``<cls>`` prepended with the pad value (−2), at most ``max_length`` tokens
(random gene subset beyond that). Cell embedding = transformer output at ``<cls>``,
L2-normalised (as ``embed_data`` returns it).

Deviations (documented, deliberate):

- Randomness (tie-breaking inside ``_digitize`` and the gene subset beyond ``max_length``)
  comes from a per-cell generator seeded by ``(seed, the cell's gene ids and counts)``
  instead of the DataLoader worker's global numpy/torch RNG, so a cell's tokens do not
  depend on its batch-mates or position (the original's values change with the RNG state).
- Attention uses a boolean padding mask (the original torch path does too); the released
  flash-attention names ``self_attn.Wqkv.*`` are mapped onto ``self_attn.in_proj_*``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from anndata import AnnData
from torch import nn

from scdrugmap.embedder._attention import (
    MHAEmbedder,
    RaggedTokens,
    TransformerEncoder,
    cell_seed,
    check_int,
    counts_csr,
    parse_options,
)
from scdrugmap.embedder._checkpoint import (
    check_state_shapes,
    load_state_dict,
    load_strict,
    require_dir,
    require_files,
)
from scdrugmap.embedder._torch import masked_mean
from scdrugmap.embedder.base import register
from scdrugmap.embedder.vocab import Vocabulary
from scdrugmap.store.errors import CheckpointError

__all__ = ["ScGPTEmbedder", "ScGPTModel", "bin_values", "module_key", "release_key"]

EXPECTED = ("best_model.pt", "args.json", "vocab.json")
SPECIALS = ("<pad>", "<cls>", "<eoc>")
N_BINS = 51  # DataCollator hard-codes binning(n_bins=51)
VALUE_CLAMP = 512  # ContinuousValueEncoder max_value


def module_key(key: str) -> str | None:
    """Map a released key onto :class:`ScGPTModel` (None = dropped).

    ``self_attn.Wqkv.*`` / ``self_attn._impl.Wqkv.*`` (flash-attn builds) →
    ``self_attn.in_proj_*``; ``self_attn._impl.out_proj.*`` → ``self_attn.out_proj.*``;
    ``cls_decoder.*`` (a fine-tuning classification head, absent from the release and never
    used for embeddings; ``load_pretrained`` skips it as well) is dropped.
    """
    if key.startswith("cls_decoder."):
        return None
    key = key.replace("self_attn._impl.", "self_attn.")
    return key.replace("self_attn.Wqkv.weight", "self_attn.in_proj_weight").replace(
        "self_attn.Wqkv.bias", "self_attn.in_proj_bias"
    )


def release_key(key: str) -> str:
    """Inverse of :func:`module_key` for the released flash-attn layout."""
    return key.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight").replace(
        "self_attn.in_proj_bias", "self_attn.Wqkv.bias"
    )


class ScGPTModel(nn.Module):
    """scGPT ``TransformerModel`` (continuous value encoder, post-norm, no batch labels).

    Holds the released file's heads (``flag_encoder``, ``decoder``, ``mvc_decoder``) so the
    checkpoint loads strictly; only the encoder runs for embeddings.

    Parameters
    ----------
    ntoken
        Vocabulary size including the appended special tokens.
    d_model, nhead, d_hid, nlayers, dropout
        ``args.json`` ``embsize``, ``nheads``, ``d_hid``, ``nlayers``, ``dropout``.
    pad_id
        Id of ``<pad>`` (``padding_idx`` of the gene embedding).
    """

    def __init__(
        self, ntoken: int, d_model: int, nhead: int, d_hid: int, nlayers: int, dropout: float, pad_id: int
    ):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.embedding = nn.Embedding(ntoken, d_model, padding_idx=pad_id)
        self.encoder.enc_norm = nn.LayerNorm(d_model)
        self.value_encoder = nn.Module()
        self.value_encoder.linear1 = nn.Linear(1, d_model)
        self.value_encoder.linear2 = nn.Linear(d_model, d_model)
        self.value_encoder.norm = nn.LayerNorm(d_model)
        self.value_dropout = nn.Dropout(dropout)
        self.flag_encoder = nn.Embedding(2, d_model)
        self.transformer_encoder = TransformerEncoder(nlayers, d_model, nhead, d_hid, dropout)
        self.decoder = nn.Module()
        self.decoder.fc = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )
        self.mvc_decoder = nn.Module()
        self.mvc_decoder.gene2query = nn.Linear(d_model, d_model)
        self.mvc_decoder.W = nn.Linear(d_model, d_model, bias=False)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """``_encode``: gene ids ``(B, L)``, values ``(B, L)``, pad mask ``(B, L)`` → ``(B, L, d_model)``."""
        genes = self.encoder.enc_norm(self.encoder.embedding(gene_ids))
        v = torch.clamp(values.unsqueeze(-1), max=VALUE_CLAMP)
        v = self.value_encoder.linear2(F.relu(self.value_encoder.linear1(v)))
        v = self.value_dropout(self.value_encoder.norm(v))
        return self.transformer_encoder(genes + v, pad_mask)


def bin_values(values: np.ndarray, rng: np.random.Generator, n_bins: int = N_BINS) -> np.ndarray:
    """``preprocess.binning`` of one cell's positive values.

    Bin edges = ``np.quantile(values, linspace(0, 1, n_bins - 1))``; a value gets
    ``left = digitize(x, edges)`` when ``left == digitize(x, edges, right=True)``, else a
    uniform draw from ``right+1 … left`` (``_digitize``'s tie spreading), using ``rng``.

    Parameters
    ----------
    values
        float32 ``(n,)``, all > 0.
    rng
        Source of the tie-breaking uniforms (one per value, as the original).

    Returns
    -------
    numpy.ndarray
        float32 ``(n,)`` bins in ``1 … n_bins - 1``.
    """
    edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(values, edges)
    right = np.digitize(values, edges, right=True)
    digits = np.ceil(rng.random(len(values)) * (right - left) + left).astype(np.int64)
    return digits.astype(np.float32)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"cannot read {path}: {exc}"
        raise CheckpointError(msg) from exc


def _read_vocab(path: Path) -> dict[str, int]:
    raw = _read_json(path)
    if not isinstance(raw, dict) or not all(isinstance(v, int) for v in raw.values()):
        msg = f"{path} must be a JSON object gene → integer id (scGPT GeneVocab format)"
        raise CheckpointError(msg)
    vocab = dict(raw)
    if sorted(vocab.values()) != list(range(len(vocab))):
        msg = f"{path}: ids must be 0 … {len(vocab) - 1} without gaps or duplicates"
        raise CheckpointError(msg)
    for tok in SPECIALS:  # embed_data appends missing specials at the end
        vocab.setdefault(tok, len(vocab))
    return vocab


def _read_args(path: Path) -> dict[str, Any]:
    args = _read_json(path)
    need = ("embsize", "nheads", "d_hid", "nlayers")
    missing = [k for k in need if not isinstance(args, dict) or k not in args]
    if missing:
        msg = f"{path} lacks {', '.join(missing)} (scGPT model args)"
        raise CheckpointError(msg)
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        msg = f"{path}: input_emb_style={style!r} is not supported (the released models use 'continuous')"
        raise CheckpointError(msg)
    return args


def build_module(args: Mapping[str, Any], vocab: Mapping[str, int]) -> ScGPTModel:
    """:class:`ScGPTModel` from ``args.json`` and the (special-extended) vocabulary."""
    return ScGPTModel(
        ntoken=len(vocab),
        d_model=int(args["embsize"]),
        nhead=int(args["nheads"]),
        d_hid=int(args["d_hid"]),
        nlayers=int(args["nlayers"]),
        dropout=float(args.get("dropout", 0.2)),
        pad_id=vocab[args.get("pad_token", "<pad>")],
    )


@register
class ScGPTEmbedder(MHAEmbedder):
    """scGPT cell embeddings (whole-human checkpoint).

    Options (``load``): ``device``, ``batch_size`` (32), ``precision`` (fp32/bf16/fp16),
    ``pooling`` — ``"cls"`` (default; L2-normalised ``<cls>`` output, as ``embed_data``),
    ``"cls_raw"`` (not normalised), ``"mean"`` (mean over gene tokens) — ``seed`` (0;
    tie-breaking and gene sampling), ``max_length`` (1200 tokens incl. ``<cls>``).

    LoRA: :attr:`lora_targets` ``("out_proj",)`` (real module calls) plus
    :attr:`lora_target_parameters` ``("in_proj_weight",)`` (packed Q/K/V) for peft.
    """

    name = "scgpt"

    def __init__(self, module: ScGPTModel, files, options, vocab: dict[str, int], args: dict[str, Any]):
        super().__init__(module, files, options)
        self.token_ids = vocab
        self.args = args
        genes = [g for g in vocab if g not in SPECIALS]
        self.vocab = Vocabulary(genes, kind="symbol")
        self._gene_token = np.array([vocab[g] for g in genes], dtype=np.int64)
        self.seed = int(options["seed"])
        self.max_length = int(options["max_length"])
        self.pad_id = vocab[args.get("pad_token", "<pad>")]
        self.cls_id = vocab["<cls>"]
        self.pad_value = float(args.get("pad_value", -2))

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, **options: Any) -> ScGPTEmbedder:
        """Read ``best_model.pt``, ``args.json`` and ``vocab.json`` from ``checkpoint``.

        Raises
        ------
        CheckpointError
            Missing files, unreadable JSON, unsupported args, or weights that do not match.
        InputError
            Unknown or bad options.
        """
        opts = parse_options(
            cls.name,
            options,
            {"pooling": "cls", "seed": 0, "max_length": 1200},
            {"pooling": ("cls", "cls_raw", "mean")},
        )
        check_int(cls.name, "seed", opts["seed"], minimum=0)
        check_int(cls.name, "max_length", opts["max_length"], minimum=2)
        directory = require_dir(checkpoint, model=cls.name, expected=EXPECTED)
        require_files(directory, EXPECTED, model=cls.name, expected=EXPECTED)
        args = _read_args(directory / "args.json")
        vocab = _read_vocab(directory / "vocab.json")
        weights = directory / "best_model.pt"
        raw = load_state_dict(weights)
        if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
            msg = f"{weights} does not hold a flat state dict (name → tensor) like the released best_model.pt"
            raise CheckpointError(msg)
        state = {mk: v for k, v in raw.items() if (mk := module_key(k)) is not None}
        # shapes checked on the meta device first: an args.json declaring a huge model is refused unallocated
        check_state_shapes(
            lambda: build_module(args, vocab), state, source=directory / "args.json", what="scGPT model"
        )
        module = build_module(args, vocab)
        load_strict(module, state, source=weights)
        files = [directory / n for n in EXPECTED]
        return cls(module, files, opts, vocab, args)

    @property
    def dim(self) -> int:
        """``embsize`` of the checkpoint."""
        return int(self.args["embsize"])

    def _gene_ids(self, var: Any) -> np.ndarray:
        """``vocab.json`` id of each gene (-1 when unmatched): the file's symbol exactly, as
        ``embed_data`` reads ``var[gene_col]``, then renamed genes (:mod:`embedder.vocab`)."""
        index = self.match_genes(var).index
        return np.where(index >= 0, self._gene_token[np.maximum(index, 0)], -1)

    def _vocab_symbols(self) -> list[str]:
        return list(self.vocab.tokens)

    def tokenize(self, adata: AnnData) -> RaggedTokens:
        """Per cell ``gene_ids`` and binned ``values`` (``<cls>``/pad value first), see module docstring.

        Returns
        -------
        RaggedTokens
            fields ``gene_ids`` (int64) and ``values`` (float32), ``n_genes`` = expressed
            in-vocabulary genes (before sampling down to ``max_length``).

        Raises
        ------
        InputError
            When ``adata.X`` holds negative values or ``var`` lacks ``symbol``.
        """
        ids = self._gene_ids(adata.var)
        keep = ids >= 0
        X = counts_csr(adata, self.name)[:, keep]
        X.sort_indices()
        gene_of_col = ids[keep]
        out_ids, out_vals, n_genes = [], [], np.zeros(X.shape[0], dtype=np.int64)
        for i in range(X.shape[0]):
            lo, hi = X.indptr[i], X.indptr[i + 1]
            vals = X.data[lo:hi]
            nz = vals != 0
            genes, vals = gene_of_col[X.indices[lo:hi][nz]], vals[nz]
            n_genes[i] = len(genes)
            binned = np.zeros(0, dtype=np.float32)
            if len(genes):
                rng = np.random.default_rng(cell_seed(self.seed, genes, vals))
                binned = bin_values(vals, rng)
                if len(genes) + 1 > self.max_length:  # DataCollator._sample keeps <cls>
                    pick = rng.permutation(len(genes))[: self.max_length - 1]
                    genes, binned = genes[pick], binned[pick]
            out_ids.append(np.concatenate([[self.cls_id], genes]).astype(np.int64))
            out_vals.append(np.concatenate([[self.pad_value], binned]).astype(np.float32))
        return RaggedTokens(
            {"gene_ids": out_ids, "values": out_vals},
            {"gene_ids": self.pad_id, "values": self.pad_value},
            n_genes,
        )

    def hidden_states(self, tokens: RaggedTokens) -> torch.Tensor:
        """Differentiable encoder output ``(n_cells, max_length, embsize)``."""
        p = tokens.padded()
        return self._module(
            self._tensor(p["gene_ids"]), self._tensor(p["values"]), self._tensor(p["pad_mask"])
        )

    def pool_torch(self, hidden: torch.Tensor, tokens: RaggedTokens) -> torch.Tensor:
        """``<cls>`` output (L2-normalised for ``"cls"``) or the mean over gene tokens."""
        if self.pooling == "mean":
            genes = ~self._tensor(tokens.padded()["pad_mask"])
            genes[:, 0] = False
            return masked_mean(hidden.float(), genes)
        cls_out = hidden[:, 0].float()
        return F.normalize(cls_out, dim=-1) if self.pooling == "cls" else cls_out

    def _tokenizer_spec(self) -> dict[str, Any]:
        return {
            "gene_key": "symbol",
            "vocab_size": len(self.token_ids),
            "input": "raw X of expressed in-vocabulary genes, var order",
            "n_bins": N_BINS,
            "cls_value": self.pad_value,
            "max_length": self.max_length,
            "seed": self.seed,
            "rng": "per-cell numpy PCG64 from SeedSequence(seed, BLAKE2b(gene ids, counts))",
        }
