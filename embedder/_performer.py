"""What scBERT and CellLM share besides the model: checkpoint reading, panel preprocessing, the base class.

Both adapters load a ``PerformerLM`` from a released state dict, place a cell's genes on a fixed
panel matched on symbols and run length-sorted batches; :class:`PerformerEmbedder` is the adapter
base they derive from. The model itself (FAVOR+ attention, the transformer blocks and the two
deliberate deviations from the originals: per-cell key stabiliser, weighted keys) lives in
:mod:`embedder._performer_blocks`; ``PerformerLM`` is re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scdrugmap.embedder._checkpoint import check_state_shapes, load_strict
from scdrugmap.embedder._performer_blocks import (
    FastAttention,
    FeedForward,
    Performer,
    PerformerLM,
    PreLayerNorm,
    SelfAttention,
)
from scdrugmap.embedder._torch import PaddingReport, autocast_context, embed_length_sorted, pick_device
from scdrugmap.embedder.base import Embedder, hash_files
from scdrugmap.embedder.vocab import Vocabulary, check_gene_matching
from scdrugmap.store.errors import CheckpointError, InputError

__all__ = [
    "FastAttention",
    "FeedForward",
    "Performer",
    "PerformerEmbedder",
    "PerformerLM",
    "PreLayerNorm",
    "SelfAttention",
    "build_performer",
    "check_position_table",
    "embed_in_batches",
    "infer_performer_config",
    "load_gene2vec",
    "log2_normalise_on_panel",
    "require_counts",
    "unwrap_state_dict",
    "validate_options",
]

log = logging.getLogger(__name__)


def infer_performer_config(state: dict, *, source: str | Path) -> dict[str, int]:
    """Read a PerformerLM's architecture from its released state dict.

    Returns
    -------
    dict
        ``num_tokens, num_positions, dim, depth, heads, dim_head, nb_features, ff_mult``.

    Raises
    ------
    CheckpointError
        When a key the architecture is read from is absent.
    """
    try:
        num_tokens, dim = state["token_emb.weight"].shape
        num_positions = state["pos_emb.emb.weight"].shape[0]
        nb_features, dim_head = state["performer.net.layers.0.0.fn.fast_attention.projection_matrix"].shape
        inner = state["performer.net.layers.0.0.fn.to_q.weight"].shape[0]
        hidden = state["performer.net.layers.0.1.fn.fn.w1.weight"].shape[0]
    except KeyError as exc:
        msg = f"{source} is not a PerformerLM state dict: key {exc.args[0]!r} is missing"
        raise CheckpointError(msg) from None
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("performer.net.layers."))
    return {
        "num_tokens": int(num_tokens),
        "num_positions": int(num_positions),
        "dim": int(dim),
        "depth": depth,
        "heads": int(inner) // int(dim_head),
        "dim_head": int(dim_head),
        "nb_features": int(nb_features),
        "ff_mult": int(hidden) // int(dim),
    }


def unwrap_state_dict(obj: object, *, key: str, source: str | Path) -> dict:
    """Return ``obj[key]`` (the releases wrap the state dict), stripping a DataParallel ``module.`` prefix."""
    if isinstance(obj, dict) and key in obj:
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        msg = f"{source} holds no state dict under {key!r}"
        raise CheckpointError(msg)
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_gene2vec(path: Path, *, rows: int, dim: int) -> np.ndarray:
    """Read a gene2vec ``.npy`` (``allow_pickle=False``) and check it is ``(rows, dim)``.

    Raises
    ------
    CheckpointError
        When unreadable or of another shape.
    """
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        msg = f"cannot read gene2vec array {path}: {exc}"
        raise CheckpointError(msg) from exc
    if arr.shape != (rows, dim):
        msg = f"gene2vec array {path} has shape {arr.shape}; the checkpoint needs ({rows}, {dim})"
        raise CheckpointError(msg)
    return arr


def check_position_table(model: PerformerLM, gene2vec: np.ndarray, path: Path) -> None:
    """Warn when the checkpoint's position rows differ from the gene2vec file (the checkpoint wins)."""
    table = model.pos_emb.emb.weight.detach()[: gene2vec.shape[0]].cpu().numpy()
    if not np.allclose(table, gene2vec, atol=1e-6):
        log.warning(
            "position table in the checkpoint differs from %s; using the checkpoint's (as the original)", path
        )


def require_counts(adata, model: str) -> None:
    """Raise InputError unless ``adata`` holds raw counts (``uns['scdrugmap']['x_kind']``)."""
    kind = adata.uns.get("scdrugmap", {}).get("x_kind", "counts")
    if kind != "counts":
        msg = f"model {model!r} needs raw counts but this dataset's X is {kind!r}; ingest its raw counts"
        raise InputError(msg)


def log2_normalise_on_panel(x, columns: np.ndarray, n_panel: int) -> sp.csr_matrix:
    """Re-index counts onto the panel, ``normalize_total(1e4)`` then ``log1p(base=2)``.

    Reproduces scBERT's ``preprocess.py`` (scanpy arithmetic in float32; the library size is
    the sum over *panel* genes, as the original normalises after re-indexing).

    Parameters
    ----------
    x
        Counts ``(n_cells, n_genes)``, dense or sparse.
    columns
        panel position of each dataset gene (-1 when absent), :meth:`Embedder.match_genes`.
    n_panel
        Panel size.

    Returns
    -------
    scipy.sparse.csr_matrix
        float32 ``(n_cells, n_panel)`` with sorted indices and no stored zeros.
    """
    keep = np.flatnonzero(columns >= 0)
    sub = sp.csr_matrix(x, dtype=np.float32)[:, keep].tocoo()
    out = sp.csr_matrix(
        (sub.data, (sub.row, columns[keep][sub.col])), shape=(sub.shape[0], n_panel), dtype=np.float32
    )
    out.sum_duplicates()
    out.eliminate_zeros()
    out.sort_indices()
    lengths = np.diff(out.indptr)
    totals = np.zeros(out.shape[0], dtype=np.float64)
    nz = lengths > 0
    totals[nz] = np.add.reduceat(out.data.astype(np.float64), out.indptr[:-1][nz])
    size = totals.astype(np.float32) / np.float32(1e4)
    data = out.data / np.repeat(size, lengths)
    data = np.log1p(data)
    out.data = (data / np.log(2.0)).astype(np.float32)
    return out


def validate_options(
    model: str,
    *,
    unknown: dict,
    pooling: str,
    poolings: Sequence[str],
    precision: str,
    batch_size: int,
    gene_matching: str = "best",
) -> None:
    """Raise InputError naming unknown options or bad values of the standard ones."""
    check_gene_matching(model, gene_matching)
    if unknown:
        msg = f"unknown {model} option(s): {', '.join(sorted(unknown))}"
        raise InputError(msg)
    if pooling not in poolings:
        msg = f"{model} pooling {pooling!r} is not one of {', '.join(poolings)}"
        raise InputError(msg)
    if precision not in ("fp32", "bf16", "fp16"):
        msg = f"{model} precision {precision!r} is not one of fp32, bf16, fp16"
        raise InputError(msg)
    if not isinstance(batch_size, int) or batch_size < 1:
        msg = f"{model} batch_size must be a positive integer, got {batch_size!r}"
        raise InputError(msg)


def embed_in_batches(adapter, tokens, *, lengths: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Run ``adapter.forward`` / ``adapter.pool`` over length-sorted batches with OOM back-off.

    Parameters
    ----------
    adapter
        An embedder with ``dim``, ``name``, ``batch_size``, ``padding_report``, ``forward`` and
        ``pool``; ``tokens`` must offer ``subset(indices)``.
    lengths
        Token length of every cell ``(n,)``.
    usable
        bool ``(n,)``; False rows (no in-vocabulary gene expressed) are NaN and logged.

    Returns
    -------
    numpy.ndarray
        float32 ``(n, adapter.dim)`` in input order.
    """
    return embed_length_sorted(
        adapter,
        tokens,
        lengths=lengths,
        usable=usable,
        logger=log,
        warning="%(name)s: %(missing)d cell(s) express no in-vocabulary gene; their rows are NaN",
    )


def build_performer(
    config: dict, state: dict, *, weights: Path, gene2vec: np.ndarray, gene2vec_path: Path, device: str | None
) -> tuple[PerformerLM, torch.device]:
    """Build a :class:`PerformerLM`, load ``state`` strictly, check its position table, move it to ``device``.

    Returns
    -------
    tuple
        ``(model in eval mode, torch.device)``.
    """
    check_state_shapes(lambda: PerformerLM(**config), state, source=weights, what="PerformerLM")
    model = PerformerLM(**config)
    load_strict(model, state, source=weights)
    check_position_table(model, gene2vec, gene2vec_path)
    dev = pick_device(device)
    model.to(dev).eval()
    return model, dev


def performer_options(
    dev, *, batch_size: int, precision: str, pooling: str, seed: int, gene_matching: str = "best"
) -> dict[str, Any]:
    """The ``options`` dict of a :class:`PerformerEmbedder`."""
    return {
        "device": dev,
        "batch_size": batch_size,
        "precision": precision,
        "pooling": pooling,
        "seed": seed,
        "gene_matching": gene_matching,
    }


class PerformerEmbedder(Embedder):
    """What scBERT and CellLM share: a :class:`PerformerLM` over a gene panel matched on symbols.

    Subclasses set ``name``, implement ``load``, ``spec``, ``tokenize``, ``_tensors`` (model
    inputs of a token batch), ``pool_tensor`` and ``embed``.
    """

    input_kind: ClassVar[Literal["counts", "any"]] = "counts"
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v")

    def __init__(
        self, *, model: PerformerLM, config: dict, panel: list[str], files: list[Path], options: dict
    ):
        self.model = model
        self.config = config
        self.panel = panel
        self.vocab = Vocabulary(panel, kind="symbol")
        self.gene_matching = str(options.get("gene_matching", "best"))
        self.files = files
        self.options = options
        self.device = options["device"]
        self.batch_size = options["batch_size"]
        self.padding_report = PaddingReport()

    @property
    def dim(self) -> int:
        return self.config["dim"]

    def _spec(self, tokenizer: dict[str, Any]) -> dict[str, Any]:
        return {
            "files": hash_files(self.files),
            "config": self.config,
            "tokenizer": tokenizer,
            "attention": "FAVOR+ with per-cell key stabiliser (= original run one cell per forward)",
            "pooling": self.options["pooling"],
            "precision": self.options["precision"],
            "seed": self.options["seed"],
            "gene_matching": self.gene_matching,
        }

    def vocabulary(self) -> pd.DataFrame:
        """The genes the model knows: columns ``symbol`` and ``ensembl_id`` (one row per gene)."""
        return pd.DataFrame({"symbol": self.panel, "ensembl_id": ""})

    def torch_module(self) -> torch.nn.Module:
        """The PerformerLM (LoRA targets: ``to_q``, ``to_k``, ``to_v``)."""
        return self.model

    def _panel_values(self, adata) -> sp.csr_matrix:
        """Cells placed on the panel and log2-normalised, CSR ``(n, gene_num)``."""
        require_counts(adata, self.name)
        cols = self.match_genes(adata.var).index  # the file's symbols, then renamed genes (embedder.vocab)
        return log2_normalise_on_panel(adata.X, cols, len(self.panel))

    def _tensors(self, tokens) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pool_tensor(self, hidden: torch.Tensor, tokens) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, tokens) -> torch.Tensor:
        """Final-norm encodings ``(n, positions, dim)`` of the batch's model inputs (no gradients)."""
        with torch.no_grad(), autocast_context(self.device, self.options["precision"]):
            return self.model(**self._tensors(tokens))

    def embed_tensor(self, tokens) -> torch.Tensor:
        """Cell embeddings ``(n, dim)`` with gradients enabled (for LoRA fine-tuning)."""
        return self.pool_tensor(self.model(**self._tensors(tokens)), tokens)

    def pool(self, hidden: torch.Tensor, tokens) -> np.ndarray:
        return self.pool_tensor(hidden, tokens).float().cpu().numpy()
