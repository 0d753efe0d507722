"""Geneformer (V1) adapter: rank-value encoding of Ensembl genes → BERT → mean of a hidden layer.

Follows ``jkobject/geneformer`` @ 95b63404eac211e8896068005866f5d3b76923cd (mirror of
HF ``ctheodoris/Geneformer``, upstream 1366905 of 2023-10-25): ``geneformer/tokenizer.py``
(``TranscriptomeTokenizer.tokenize_anndata`` / ``tokenize_cell``) and
``geneformer/emb_extractor.py`` (``EmbExtractor``, ``emb_layer=-1``, ``mean_pool``).

Checkpoint directory (the released layout)::

    config.json                      BertForMaskedLM config
    model.safetensors | pytorch_model.bin
    token_dictionary.pkl             Ensembl id → token id ("<pad>"=0, "<mask>"=1)
    gene_median_dictionary.pkl       Ensembl id → non-zero median expression (Genecorpus-30M)
    gene_name_id_dict.pkl            gene symbol → Ensembl id
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import pandas as pd
from anndata import AnnData

from scdrugmap.embedder._checkpoint import require_dir, require_files, safe_unpickle
from scdrugmap.embedder._hf import (
    HFEmbedder,
    TokenizedCells,
    build_model,
    iter_expressed,
    load_weights,
    parse_options,
    read_config,
    weight_files,
)
from scdrugmap.embedder.base import register
from scdrugmap.embedder.vocab import GENE_MATCHING, GeneMatch, Vocabulary, check_gene_matching
from scdrugmap.store.errors import CheckpointError, InputError
from scdrugmap.store.genes import file_identifiers

__all__ = ["GeneformerEmbedder", "Pooling"]

log = logging.getLogger(__name__)

#: ``penultimate_mean``: mean over real tokens of ``hidden_states[n_layers - 1]`` (EmbExtractor
#: ``emb_layer=-1``, the authors' recommendation); ``last_mean``: of the last layer (``emb_layer=0``,
#: what scDrugMap's fine-tuning pools).
Pooling = Literal["penultimate_mean", "last_mean"]

DICTIONARIES = ("token_dictionary.pkl", "gene_median_dictionary.pkl", "gene_name_id_dict.pkl")
EXPECTED = ("config.json", "model.safetensors or pytorch_model.bin", *DICTIONARIES)
#: persistent buffer written by transformers 4.x (the 2021 release); not part of the module now
LEGACY_KEYS = (r"bert\.embeddings\.position_ids",)
TARGET_SUM = 10_000


def _read_dict(path: Path, value_type: type | tuple[type, ...]) -> dict[str, Any]:
    data = safe_unpickle(path)
    if not isinstance(data, dict) or not data:
        msg = f"{path} must hold a non-empty dict, found {type(data).__name__}"
        raise CheckpointError(msg)
    bad = next((k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, value_type)), None)
    if bad is not None:
        msg = f"{path}: entry {bad!r} → {data[bad]!r} is not str → {value_type}"
        raise CheckpointError(msg)
    return data


@register
class GeneformerEmbedder(HFEmbedder):
    """Geneformer V1 cell embeddings (``BertForMaskedLM`` from ``transformers``).

    Tokenisation (``tokenize_anndata``): genes whose ``var['ensembl_id']`` is in
    ``gene_median_dictionary`` are kept; ``x / n_counts * 10000 / median`` per gene
    (``n_counts`` = ``obs['n_counts']`` when present, else the row sum of ``X``); the
    non-zero genes are ordered by ``np.argsort(-x_norm)`` (numpy's default, unstable sort,
    as the original) and truncated to ``max_position_embeddings`` (2048). No special tokens.

    Embedding (``EmbExtractor``): right-padded batches with ``<pad>``, attention mask on real
    tokens, mean over real tokens of ``hidden_states[num_hidden_layers - 1]``
    (``pooling="penultimate_mean"``) or of the last layer (``"last_mean"``).

    Load options: ``device``, ``batch_size`` (32), ``precision`` (``"fp32"``), ``pooling``
    (``"penultimate_mean"``), ``gene_matching`` (``"best"``: renamed genes recovered through HGNC,
    :mod:`embedder.vocab`; ``"original"``: the file's Ensembl ids only), ``symbol_fallback``
    (False; True also maps unmatched genes through ``gene_name_id_dict`` — not in the original).
    """

    name: ClassVar[str] = "geneformer"
    input_kind: ClassVar[Literal["counts", "any"]] = "counts"
    lora_targets: ClassVar[tuple[str, ...]] = ("query", "key", "value")
    pooling_choices: ClassVar[tuple[str, ...]] = get_args(Pooling)

    def __init__(
        self,
        module: Any,
        files: Sequence[Path],
        options: Mapping[str, Any],
        device: Any,
        *,
        tokens: Mapping[str, Any],
        medians: Mapping[str, Any],
        name_to_id: Mapping[str, str],
    ) -> None:
        super().__init__(module, files, options, device)
        self.symbol_fallback = bool(options["symbol_fallback"])
        self.gene_matching = check_gene_matching(self.name, options["gene_matching"])
        self.max_length = int(module.config.max_position_embeddings)
        self._tokens = {k: int(v) for k, v in tokens.items()}
        self._medians = {k: float(v) for k, v in medians.items() if k in self._tokens}
        self._name_to_id = dict(name_to_id)
        self.vocab = Vocabulary(sorted(self._medians), kind="ensembl")
        self.pad_id = self._tokens["<pad>"]

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, **options: Any) -> GeneformerEmbedder:
        """Load a Geneformer checkpoint directory (see the module docstring for its layout).

        Raises
        ------
        CheckpointError
            Missing files, a non-BERT config, bad dictionaries, or weights that do not match.
        InputError
            Unknown or invalid options.
        """
        from transformers import BertConfig, BertForMaskedLM

        opts = parse_options(
            cls.name,
            options,
            {"pooling": "penultimate_mean", "symbol_fallback": False, "gene_matching": "best"},
            {
                "pooling": cls.pooling_choices,
                "symbol_fallback": (False, True),
                "gene_matching": GENE_MATCHING,
            },
        )
        directory = require_dir(checkpoint, model=cls.name, expected=EXPECTED)
        require_files(directory, ("config.json", *DICTIONARIES), model=cls.name, expected=EXPECTED)
        weights = weight_files(directory, model=cls.name, expected=EXPECTED)
        config = read_config(directory, BertConfig.from_json_file, model=cls.name, model_types=("bert",))
        tokens = _read_dict(directory / DICTIONARIES[0], (int, np.integer))
        medians = _read_dict(directory / DICTIONARIES[1], (float, int, np.floating, np.integer))
        name_to_id = _read_dict(directory / DICTIONARIES[2], str)
        if "<pad>" not in tokens or max(int(v) for v in tokens.values()) >= config.vocab_size:
            msg = (
                f"{directory / DICTIONARIES[0]} does not fit config.json: it needs '<pad>' and token ids "
                f"below vocab_size={config.vocab_size}"
            )
            raise CheckpointError(msg)
        device = cls.resolve_device(opts["device"])
        module = build_model(BertForMaskedLM, config, device)
        load_weights(module, weights, legacy=LEGACY_KEYS)
        files = [directory / "config.json", *weights, *(directory / n for n in DICTIONARIES)]
        return cls(module, files, opts, device, tokens=tokens, medians=medians, name_to_id=name_to_id)

    # -- vocabulary ---------------------------------------------------------------------
    def match_genes(self, var: Any) -> GeneMatch:
        """Vocabulary entry of each gene (:mod:`embedder.vocab`, Ensembl ids as the original reads
        ``var['ensembl_id']``); with ``symbol_fallback`` genes still unmatched are looked up in the
        checkpoint's ``gene_name_id_dict`` by the file's symbol (route ``crossmap``)."""
        match = super().match_genes(var)
        assert match is not None
        if not self.symbol_fallback:
            return match
        index, route = match.index.copy(), match.route.copy()
        taken = set(index[index >= 0].tolist())
        symbols = file_identifiers(var)["file_symbol"].to_numpy()
        for i in np.flatnonzero(index < 0):
            ens = self._name_to_id.get(str(symbols[i]), "")
            pos = self.vocab.position(ens) if ens else -1
            if pos >= 0 and pos not in taken:
                index[i], route[i] = pos, "crossmap"
                taken.add(pos)
        return GeneMatch(index, route)

    def _gene_ids(self, var: Any) -> np.ndarray:
        """The vocabulary's Ensembl id of each gene, ``""`` when unmatched."""
        tokens = self.vocab.tokens
        return np.array([tokens[i] if i >= 0 else "" for i in self.match_genes(var).index], dtype=object)

    def vocabulary(self) -> pd.DataFrame:
        """The model's genes: columns ``ensembl_id`` and ``symbol`` (``""`` when unknown)."""
        symbol = {e: s for s, e in self._name_to_id.items()}
        ens = sorted(self._medians)
        return pd.DataFrame({"ensembl_id": ens, "symbol": [symbol.get(e, "") for e in ens]})

    # -- tokenisation -------------------------------------------------------------------
    def tokenize(self, adata: AnnData) -> TokenizedCells:
        """Rank-value encode each cell (see the class docstring).

        Returns
        -------
        TokenizedCells
            Token ids per cell (no special tokens, ≤ ``max_position_embeddings``).

        Raises
        ------
        InputError
            When ``X`` is not raw counts or a cell with expressed genes has ``n_counts`` ≤ 0.
        """
        x_kind = adata.uns.get("scdrugmap", {}).get("x_kind", "counts")
        if x_kind != "counts":
            msg = f"geneformer needs raw counts; this dataset's X is {x_kind!r} (re-ingest the raw counts)"
            raise InputError(msg)
        genes = self._gene_ids(adata.var)
        keep = genes != ""
        token_col = np.array(
            [self._tokens[e] if k else -1 for e, k in zip(genes, keep, strict=True)], np.int64
        )
        median_col = np.array([self._medians[e] if k else np.nan for e, k in zip(genes, keep, strict=True)])
        if "n_counts" in adata.obs:
            n_counts = adata.obs["n_counts"].to_numpy(dtype=np.float64)
        else:
            n_counts = np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
        ids: list[np.ndarray] = []
        n_genes = np.zeros(adata.n_obs, dtype=np.int64)
        for i, idx, val in iter_expressed(adata.X, keep):
            if len(idx) and not n_counts[i] > 0:
                msg = f"cell {adata.obs_names[i]!r} has expressed genes but n_counts={n_counts[i]}"
                raise InputError(msg)
            norm = val / n_counts[i] * TARGET_SUM / median_col[idx]
            order = np.argsort(-norm)  # numpy default (unstable) sort, as tokenize_cell
            ids.append(token_col[idx[order]][: self.max_length])
            n_genes[i] = len(idx)
        return TokenizedCells(ids, n_genes, self.pad_id)

    def _hidden_index(self) -> int | None:
        if self.pooling == "penultimate_mean":
            return int(self._module.config.num_hidden_layers) - 1
        return None

    def lora_layers(self) -> list[int] | None:
        """Encoder layers whose output reaches the pooled state (LoRA elsewhere would be inert).

        With the default penultimate-layer pooling the last layer is skipped.
        """
        idx = self._hidden_index()
        return None if idx is None else list(range(idx))

    def _tokenizer_spec(self) -> dict[str, Any]:
        return {
            "scheme": "rank_value",
            "gene_key": "ensembl_id",
            "symbol_fallback": self.symbol_fallback,
            "target_sum": TARGET_SUM,
            "max_length": self.max_length,
            "special_tokens": [],
        }
