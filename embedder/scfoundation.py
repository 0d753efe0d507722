"""scFoundation adapter (xTrimoGene MAE-autobin; ``models/models.ckpt`` + gene panel TSV).

Follows ``biomap-research/scFoundation@d09626a5c1bc30b9c6227378677b61e0b987fe8b``:
``model/get_embedding.py`` (``--input_type singlecell --output_type cell
--pre_normalized F``), ``model/load.py`` (``load_model_frommmf``, ``convertconfig``,
``gatherData``, ``main_gene_selection``) and ``model/pretrainmodels/``
(``mae_autobin.AutoDiscretizationEmbedding2``, ``transformer.pytorchTransformerModule``).

Checkpoint directory = the repository's ``model/`` folder::

    models/models.ckpt                  {'gene'|'cell'|'rde': {'config', 'state_dict'}}
    OS_scRNA_gene_index.19264.tsv       the gene panel (header gene_name, index), released order

(the panel ships with the code, the weights are downloaded separately). The released panel is
bundled with this package (``embedder/data/OS_scRNA_gene_index.19264.tsv``, Apache-2.0, see
``embedder/data/NOTICE.md``), so a directory holding only ``models/models.ckpt`` works; a panel in
the directory, or ``gene_panel=PATH``, wins over the bundled one.

Per cell: counts re-indexed to the 19,264-gene panel (symbols; other genes dropped),
``x = log1p(counts / total · 1e4)`` with ``total`` = the cell's sum over panel genes, the
expressed genes in panel order followed by the T token (``tgthighres``: ``tN`` → N,
``aN`` → log10(total)+N, ``fN`` → log10(total·N)) and the S token (log10(total)); position
ids = panel index, then 19264 (T), 19265 (S). Cell embedding (``pool_type all``) =
concat(S, T, max over genes, mean over genes) = 4 × hidden (3,072 for the release).

Deviations: the original embeds one cell per forward and reads S/T at positions −1/−2 of
the (padded) batch, pooling over padding too — correct only at batch size 1; here S/T are
read at each cell's own last positions and max/mean are masked, so any batch size gives
the batch-size-1 result. Of duplicate symbols the first is used (the original breaks on them);
inputs with ≥ 19,264 columns are re-indexed too (the original skips that step); T and S are
always kept (the original drops a token whose value is ≤ 0, i.e. S for a total of 1).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from anndata import AnnData
from torch import nn

from scdrugmap.embedder._attention import (
    MHAEmbedder,
    RaggedTokens,
    counts_csr,
    encoder_stack,
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
from scdrugmap.store.errors import CheckpointError, InputError

__all__ = ["ScFoundationEmbedder", "ScFoundationModel", "build_module", "flat_config"]

CKPT = "models/models.ckpt"
PANEL = "OS_scRNA_gene_index.19264.tsv"
EXPECTED = (CKPT, f"{PANEL} (optional: the released panel is bundled)")
#: scFoundation's released panel, shipped with this package (Apache-2.0; embedder/data/NOTICE.md)
BUNDLED_PANEL = Path(__file__).resolve().parent / "data" / PANEL
VERSIONS = {"ce": "cell", "rde": "rde"}


class AutoBinEmbedding(nn.Module):
    """``AutoDiscretizationEmbedding2``: a value → soft assignment over ``bins`` learned bin embeddings."""

    def __init__(self, dim: int, bins: int, alpha: float, mask_id: float, pad_id: float) -> None:
        super().__init__()
        self.mlp = nn.Linear(1, bins)
        self.mlp2 = nn.Linear(bins, bins)
        self.emb = nn.Embedding(bins, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)
        self.alpha, self.mask_id, self.pad_id = alpha, mask_id, pad_id

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` values → ``(B, L, dim)``; values equal to the mask/pad ids get those embeddings."""
        h = F.leaky_relu(self.mlp(values.unsqueeze(-1)), 0.1)
        h = self.alpha * h + self.mlp2(h)
        out = torch.softmax(h, dim=-1) @ self.emb.weight
        out = torch.where((values == self.mask_id).unsqueeze(-1), self.emb_mask.weight[0], out)
        return torch.where((values == self.pad_id).unsqueeze(-1), self.emb_pad.weight[0], out)


class _Encoder(nn.Module):
    """``pytorchTransformerModule``: layers ``transformer_encoder.<i>`` then a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, norm_first: bool) -> None:
        super().__init__()
        self.transformer_encoder = encoder_stack(depth, dim, heads, 4 * dim, 0.1, norm_first=norm_first)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.transformer_encoder:
            x = layer(x, pad_mask)
        return self.norm(x)


def _performer_decoder(dim: int, depth: int, heads: int, dim_head: int) -> nn.Module:
    """The MAE decoder's parameters (``PerformerModule`` names); never run for cell embeddings."""
    inner, features = heads * dim_head, int(dim_head * math.log(dim_head))
    layers = []
    for _ in range(depth):
        attn = nn.Module()
        attn.norm, attn.fn = nn.LayerNorm(dim), nn.Module()
        attn.fn.fast_attention = nn.Module()
        attn.fn.fast_attention.register_buffer("projection_matrix", torch.zeros(features, dim_head))
        for name in ("to_q", "to_k", "to_v"):
            setattr(attn.fn, name, nn.Linear(dim, inner))
        attn.fn.to_out = nn.Linear(inner, dim)
        ff = nn.Module()
        ff.norm, ff.fn, ff.fn.fn = nn.LayerNorm(dim), nn.Module(), nn.Module()
        ff.fn.fn.w1, ff.fn.fn.w2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        layers.append(nn.ModuleList([attn, ff]))
    decoder = nn.Module()
    decoder.performer = nn.Module()
    decoder.performer.register_buffer("calls_since_last_redraw", torch.tensor(0))
    decoder.performer.net = nn.Module()
    decoder.performer.net.layers = nn.ModuleList(layers)
    decoder.norm = nn.LayerNorm(dim)
    return decoder


class ScFoundationModel(nn.Module):
    """``MaeAutobin`` with a transformer encoder; keys = released keys without ``model.``.

    Parameters
    ----------
    config
        The flat config of :func:`flat_config`.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        enc, dec = config["encoder"], config["decoder"]
        dim = int(enc["hidden_dim"])
        self.token_emb = AutoBinEmbedding(
            dim,
            int(config["bin_num"]),
            float(config["bin_alpha"]),
            config["mask_token_id"],
            config["pad_token_id"],
        )
        self.pos_emb = nn.Embedding(int(config["seq_len"]) + 1, dim)
        self.encoder = _Encoder(dim, int(enc["depth"]), int(enc["heads"]), bool(enc.get("norm_first", False)))
        self.decoder = _performer_decoder(
            int(dec["hidden_dim"]), int(dec["depth"]), int(dec["heads"]), int(dec["dim_head"])
        )
        self.decoder_embed = nn.Linear(dim, int(dec["hidden_dim"]))
        self.norm = nn.LayerNorm(int(dec["hidden_dim"]))
        self.to_final = nn.Linear(int(dec["hidden_dim"]), 1)

    def forward(self, values: torch.Tensor, positions: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """Encoder output ``(B, L, hidden)`` for values ``(B, L)``, position ids ``(B, L)``, pad mask ``(B, L)``."""
        return self.encoder(self.token_emb(values) + self.pos_emb(positions), pad_mask)


def flat_config(entry: Any, *, source: Path) -> dict[str, Any]:
    """``convertconfig``: merge ``model_config[model]`` and ``dataset_config['rnaseq']``; check support.

    Raises
    ------
    CheckpointError
        When the entry is not ``{'config', 'state_dict'}`` or describes an unsupported model.
    """
    try:
        cfg = entry["config"]
        flat = {**cfg["model_config"][cfg["model"]], **cfg["dataset_config"]["rnaseq"]}
        encoder, decoder = flat["encoder"], flat["decoder"]
        missing = [
            k for k in ("seq_len", "bin_num", "bin_alpha", "pad_token_id", "mask_token_id") if k not in flat
        ]
        if missing:
            raise KeyError(missing[0])
    except (KeyError, TypeError) as exc:
        msg = f"{source}: not a scFoundation checkpoint entry {{'config': {{model, model_config, dataset_config}}, 'state_dict'}} ({exc!r})"
        raise CheckpointError(msg) from exc
    if cfg["model"] != "mae_autobin" or encoder.get("module_type") != "transformer":
        msg = f"{source}: model {cfg['model']!r} with a {encoder.get('module_type')!r} encoder is not supported (mae_autobin + transformer)"
        raise CheckpointError(msg)
    if decoder.get("module_type") != "performer":
        msg = (
            f"{source}: decoder {decoder.get('module_type')!r} is not supported (the release uses performer)"
        )
        raise CheckpointError(msg)
    return flat


def build_module(config: Mapping[str, Any]) -> ScFoundationModel:
    """:class:`ScFoundationModel` from a flat config (works under ``torch.device('meta')``)."""
    return ScFoundationModel(config)


def _read_panel(path: Path, expected: int) -> list[str]:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except OSError as exc:
        msg = f"cannot read the gene panel {path}: {exc.strerror}"
        raise CheckpointError(msg) from exc
    if not rows or "gene_name" not in rows[0] or len(rows) != expected:
        msg = f"{path} must be a tab-separated panel with a 'gene_name' column and {expected} genes (got {len(rows)})"
        raise CheckpointError(msg)
    return [r["gene_name"] for r in rows]


@register
class ScFoundationEmbedder(MHAEmbedder):
    """scFoundation cell embeddings.

    Options (``load``): ``device``, ``batch_size`` (32), ``precision``, ``pooling`` —
    ``"all"`` (default, concat(S, T, max, mean), 4 × hidden) or ``"max"`` (max over all
    tokens, hidden) — ``version`` (``"ce"`` → ckpt key ``cell``, default; ``"rde"`` → ``rde``),
    ``tgthighres`` (``"t4"``), ``gene_panel`` (path of the panel TSV when not in the directory).

    LoRA: :attr:`lora_targets` ``("out_proj",)`` plus :attr:`lora_target_parameters`
    ``("in_proj_weight",)`` (the encoder's attention; the Performer decoder is unused).
    """

    name = "scfoundation"

    def __init__(self, module: ScFoundationModel, files, options, config: dict[str, Any], panel: list[str]):
        super().__init__(module, files, options)
        self.config = config
        self.panel = panel
        self.vocab = Vocabulary(panel, kind="symbol")
        self.tgthighres = str(options["tgthighres"])
        self.version = str(options["version"])
        self.hidden = int(config["encoder"]["hidden_dim"])

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, **options: Any) -> ScFoundationEmbedder:
        """Read ``models/models.ckpt`` and the gene panel.

        Raises
        ------
        CheckpointError
            Missing files (named), an unsupported or mismatching checkpoint.
        InputError
            Unknown or bad options.
        """
        opts = parse_options(
            cls.name,
            options,
            {"pooling": "all", "version": "ce", "tgthighres": "t4", "gene_panel": None},
            {"pooling": ("all", "max"), "version": tuple(VERSIONS)},
        )
        if not re.fullmatch(r"[tfa]\d+(\.\d+)?", str(opts["tgthighres"])):
            msg = f"option tgthighres={opts['tgthighres']!r} must be t<N>, f<N> or a<N> (e.g. 't4')"
            raise InputError(msg)
        directory = require_dir(checkpoint, model=cls.name, expected=EXPECTED)
        require_files(directory, [CKPT], model=cls.name, expected=EXPECTED)
        panel_path = Path(opts["gene_panel"]) if opts["gene_panel"] else directory / PANEL
        if not opts["gene_panel"] and not panel_path.is_file():
            panel_path = BUNDLED_PANEL
        if not panel_path.is_file():
            msg = (
                f"gene panel {str(panel_path)!r} for 'scfoundation' is missing: give the path of {PANEL} "
                f"(the scFoundation repository's model/ folder) with gene_panel=PATH; expected: {', '.join(EXPECTED)}"
            )
            raise CheckpointError(msg)
        weights = directory / CKPT
        ckpt = load_state_dict(weights)
        key = VERSIONS[opts["version"]]
        if not isinstance(ckpt, Mapping) or key not in ckpt:
            msg = f"{weights} has no {key!r} entry (expected keys 'gene', 'cell', 'rde' as released)"
            raise CheckpointError(msg)
        config = flat_config(ckpt[key], source=weights)
        state = {
            k.split("model.", 1)[1] if "model." in k else k: v for k, v in ckpt[key]["state_dict"].items()
        }
        # the config sits inside the checkpoint: its shapes are checked on the meta device before allocating
        check_state_shapes(lambda: build_module(config), state, source=f"{weights}['{key}']['config']",
                           what="scFoundation model")  # fmt: skip
        module = build_module(config)
        load_strict(module, state, source=f"{weights}['{key}']")
        panel = _read_panel(panel_path, int(config["seq_len"]) - 2)
        return cls(module, [weights, panel_path], opts, config, panel)

    @property
    def dim(self) -> int:
        """4 × hidden for ``"all"``, hidden for ``"max"``."""
        return 4 * self.hidden if self.pooling == "all" else self.hidden

    def _panel_columns(self, var: Any) -> np.ndarray:
        """Panel position of each gene (-1 when unmatched): the file's symbol exactly, as
        ``main_gene_selection`` re-indexes, then renamed genes (:mod:`embedder.vocab`)."""
        return self.match_genes(var).index

    def _vocab_symbols(self) -> list[str]:
        return list(self.panel)

    def _t_value(self, total: float) -> float:
        kind, n = self.tgthighres[0], float(self.tgthighres[1:])
        if kind == "t":
            return n
        return float(np.log10(total) + n) if kind == "a" else float(np.log10(total * n))

    def tokenize(self, adata: AnnData) -> RaggedTokens:
        """Per cell ``values`` (float32; genes, T, S) and ``positions`` (int64), see module docstring.

        Raises
        ------
        InputError
            When ``adata.X`` holds negative values or ``var`` lacks ``symbol``.
        """
        cols = self._panel_columns(adata.var)
        keep = cols >= 0
        X = counts_csr(adata, self.name)[:, keep].astype(np.float64)
        to_panel = sp.csr_matrix(
            (np.ones(keep.sum()), (np.arange(keep.sum()), cols[keep])), shape=(keep.sum(), len(self.panel))
        )
        Y = sp.csr_matrix(X @ to_panel)
        Y.sum_duplicates()
        Y.eliminate_zeros()
        Y.sort_indices()
        n = len(self.panel)
        values, positions, n_genes = [], [], np.zeros(Y.shape[0], dtype=np.int64)
        for i in range(Y.shape[0]):
            idx, cnt = Y.indices[Y.indptr[i] : Y.indptr[i + 1]], Y.data[Y.indptr[i] : Y.indptr[i + 1]]
            total = float(cnt.sum())
            n_genes[i] = len(idx) if total > 0 else 0
            if n_genes[i] == 0:
                values.append(np.zeros(2, dtype=np.float32))
                positions.append(np.array([n, n + 1], dtype=np.int64))
                continue
            x = np.log1p(cnt / total * 1e4)
            values.append(np.concatenate([x, [self._t_value(total), np.log10(total)]]).astype(np.float32))
            positions.append(np.concatenate([idx, [n, n + 1]]).astype(np.int64))
        pad = {"values": 0.0, "positions": int(self.config["seq_len"])}
        return RaggedTokens({"values": values, "positions": positions}, pad, n_genes)

    def hidden_states(self, tokens: RaggedTokens) -> torch.Tensor:
        """Differentiable encoder output ``(n_cells, max_length, hidden)`` (final LayerNorm applied)."""
        p = tokens.padded()
        return self._module(
            self._tensor(p["values"]), self._tensor(p["positions"]), self._tensor(p["pad_mask"])
        )

    def pool_torch(self, hidden: torch.Tensor, tokens: RaggedTokens) -> torch.Tensor:
        """concat(S, T, max over genes, mean over genes) per cell, or max over all tokens."""
        hidden = hidden.float()
        lengths = self._tensor(tokens.lengths)
        pos = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        real = pos < lengths[:, None]
        if self.pooling == "max":
            return hidden.masked_fill(~real.unsqueeze(-1), float("-inf")).amax(dim=1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        s_tok, t_tok = hidden[rows, lengths - 1], hidden[rows, lengths - 2]
        genes = pos < (lengths - 2)[:, None]
        gmax = hidden.masked_fill(~genes.unsqueeze(-1), float("-inf")).amax(dim=1)
        return torch.cat([s_tok, t_tok, gmax, masked_mean(hidden, genes)], dim=1)

    def _tokenizer_spec(self) -> dict[str, Any]:
        return {
            "gene_key": "symbol",
            "panel_size": len(self.panel),
            "input": "log1p(counts / panel total * 1e4), expressed panel genes, panel order; duplicates summed",
            "tgthighres": self.tgthighres,
            "version": self.version,
            "tokens": "genes, T, S",
        }
