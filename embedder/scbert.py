"""scBERT adapter: binned log2 expression over a fixed 16,906-gene panel, Performer encoder.

Follows ``TencentAILabHealthcare/scBERT@262fd4b91f3f1c21a6e595d03d4ef423e16ffc99``:
``preprocess.py`` (re-index counts to the ``panglao_10000.h5ad`` panel, ``normalize_total(1e4)``,
``log1p(base=2)``), the tokenisation lines of ``predict.py`` (clip at ``bin_num``, truncate to
int, append one ``0`` token) and ``performer_pytorch.PerformerLM`` (see :mod:`embedder._performer`).

Differences from the original, on purpose:

- ``sc.pp.filter_cells(min_genes=200)`` is not applied: every cell gets a row (a cell with no
  expressed panel gene gets NaN and a warning).
- The key stabiliser is per cell (the original's is batch-wide); results equal the original run
  one cell per forward, as ``predict.py`` does, and do not depend on batch size.
- scBERT defines no cell embedding. ``pooling="masked_mean"`` (default) averages the final
  LayerNorm encodings over the positions of genes with non-zero expression; ``"mean"`` over all
  16,907 positions; ``"last"`` takes the appended position.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp
import torch

from scdrugmap.embedder._checkpoint import load_state_dict, require_dir, require_files
from scdrugmap.embedder._performer import (
    PerformerEmbedder,
    build_performer,
    embed_in_batches,
    infer_performer_config,
    load_gene2vec,
    performer_options,
    unwrap_state_dict,
    validate_options,
)
from scdrugmap.embedder.base import register
from scdrugmap.store.errors import CheckpointError

__all__ = ["ScBertEmbedder", "ScBertTokens"]

log = logging.getLogger(__name__)

WEIGHTS = "panglao_pretrain.pth"
GENE2VEC = "gene2vec_16906.npy"
PANEL = "panglao_10000.h5ad"
CONFIG = "model_config.json"
EXPECTED = (
    f"{WEIGHTS} (or one other *.pth in the scBERT release format)",
    f"{GENE2VEC} (gene2vec rows of the panel genes)",
    f"{PANEL} (its var_names are the gene panel)",
    f"optional {CONFIG}",
)
POOLINGS = ("masked_mean", "mean", "last")


@dataclass
class ScBertTokens:
    """Cells placed on the panel: ``values`` = log2-normalised expression, CSR ``(n, gene_num)``."""

    values: sp.csr_matrix
    bin_num: int
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.values.shape[0]

    def subset(self, idx: np.ndarray) -> ScBertTokens:
        """Tokens of the cells ``idx``."""
        return ScBertTokens(self.values[idx], self.bin_num)

    @property
    def n_expressed(self) -> np.ndarray:
        """Expressed panel genes per cell, int ``(n,)``."""
        return np.diff(self.values.indptr)

    def token_ids(self) -> np.ndarray:
        """int64 ``(n, gene_num + 1)``: ``int(min(value, bin_num))`` per gene, then the appended 0."""
        n, g = self.values.shape
        out = np.zeros((n, g + 1), dtype=np.int64)
        coo = self.values.tocoo()
        out[coo.row, coo.col] = np.minimum(coo.data, self.bin_num).astype(np.int64)
        return out

    def expressed(self) -> np.ndarray:
        """bool ``(n, gene_num)``: the gene's normalised expression is > 0."""
        out = np.zeros(self.values.shape, dtype=bool)
        coo = self.values.tocoo()
        out[coo.row, coo.col] = coo.data > 0
        return out


@register
class ScBertEmbedder(PerformerEmbedder):
    """scBERT (PerformerLM over the Panglao gene panel).

    Load with :meth:`load`; the checkpoint directory holds the release files
    ``panglao_pretrain.pth`` (``{'model_state_dict', ...}``), ``gene2vec_16906.npy`` and
    ``panglao_10000.h5ad``. The architecture is read from the weights (``model_config.json``,
    when present, must agree).
    """

    name: ClassVar[str] = "scbert"

    @classmethod
    def load(
        cls,
        checkpoint: str | Path | None = None,
        *,
        device: str | None = None,
        batch_size: int = 32,
        precision: Literal["fp32", "bf16", "fp16"] = "fp32",
        pooling: Literal["masked_mean", "mean", "last"] = "masked_mean",
        seed: int = 0,
        gene_matching: Literal["best", "original"] = "best",
        **unknown: Any,
    ) -> ScBertEmbedder:
        """Read a scBERT checkpoint directory.

        Raises
        ------
        CheckpointError
            Missing files, unreadable or mismatching weights, panel or gene2vec.
        InputError
            Unknown or bad options.
        """
        validate_options(
            cls.name,
            unknown=unknown,
            pooling=pooling,
            poolings=POOLINGS,
            precision=precision,
            batch_size=batch_size,
            gene_matching=gene_matching,
        )
        root = require_dir(checkpoint, model=cls.name, expected=EXPECTED)
        weights = _weights_file(root)
        require_files(root, [GENE2VEC, PANEL], model=cls.name, expected=EXPECTED)
        state = unwrap_state_dict(load_state_dict(weights), key="model_state_dict", source=weights)
        config = infer_performer_config(state, source=weights)
        if (root / CONFIG).is_file():
            _check_config(root / CONFIG, config)
        panel = _read_panel(root / PANEL)
        if len(panel) + 1 != config["num_positions"]:
            msg = f"{root / PANEL} lists {len(panel)} genes but {weights.name} has {config['num_positions']} positions (genes + 1)"
            raise CheckpointError(msg)
        gene2vec = load_gene2vec(root / GENE2VEC, rows=len(panel), dim=config["dim"])
        model, dev = build_performer(
            config, state, weights=weights, gene2vec=gene2vec, gene2vec_path=root / GENE2VEC, device=device
        )
        options = performer_options(
            dev,
            batch_size=batch_size,
            precision=precision,
            pooling=pooling,
            seed=seed,
            gene_matching=gene_matching,
        )
        files = [weights, root / GENE2VEC, root / PANEL] + (
            [root / CONFIG] if (root / CONFIG).is_file() else []
        )
        return cls(model=model, config=config, panel=panel, files=files, options=options)

    @property
    def bin_num(self) -> int:
        return self.config["num_tokens"] - 2

    def spec(self) -> dict[str, Any]:
        return self._spec(
            {
                "panel_genes": len(self.panel),
                "gene_key": "symbol",
                "normalise": "counts re-indexed to the panel; normalize_total(target_sum=1e4); log1p(base=2)",
                "tokens": f"min(value, {self.bin_num}) truncated to int; one 0 token appended",
                "filter_cells_min_genes": None,
            }
        )

    def tokenize(self, adata) -> ScBertTokens:
        """Place cells on the panel and log2-normalise them (``values`` CSR ``(n, gene_num)``)."""
        return ScBertTokens(self._panel_values(adata), self.bin_num)

    def _tensors(self, tokens: ScBertTokens) -> dict[str, torch.Tensor]:
        return {"tokens": torch.from_numpy(tokens.token_ids()).to(self.device)}

    def pool_tensor(self, hidden: torch.Tensor, tokens: ScBertTokens) -> torch.Tensor:
        """Pool encodings ``(n, gene_num + 1, dim)`` → ``(n, dim)`` (differentiable)."""
        pooling = self.options["pooling"]
        if pooling == "last":
            return hidden[:, -1]
        if pooling == "mean":
            return hidden.mean(dim=1)
        mask = torch.from_numpy(tokens.expressed()).to(hidden.device)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden[:, :-1] * m).sum(dim=1) / m.sum(dim=1)

    def embed(self, adata) -> np.ndarray:
        """Embed cells (float32 ``(n_obs, dim)``, input order; NaN rows for cells with no panel gene)."""
        tokens = self.tokenize(adata)
        n_tokens = np.full(len(tokens), len(self.panel) + 1)  # every cell has the panel's length
        return embed_in_batches(self, tokens, lengths=n_tokens, usable=tokens.n_expressed > 0)


def _weights_file(root: Path) -> Path:
    if (root / WEIGHTS).is_file():
        return root / WEIGHTS
    found = sorted(root.glob("*.pth"))
    if len(found) != 1:
        what = "no *.pth file" if not found else f"several *.pth files ({', '.join(p.name for p in found)})"
        msg = f"checkpoint {str(root)!r} for 'scbert' has {what}; expected: {', '.join(EXPECTED)}"
        raise CheckpointError(msg)
    return found[0]


def _read_panel(path: Path) -> list[str]:
    import anndata as ad

    try:
        ref = ad.read_h5ad(path, backed="r")
    except (OSError, KeyError, ValueError) as exc:
        msg = f"cannot read the gene panel {path}: {exc}"
        raise CheckpointError(msg) from exc
    try:
        return [str(g) for g in ref.var_names]
    finally:
        ref.file.close()


def _check_config(path: Path, config: dict) -> None:
    try:
        given = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"cannot read {path}: {exc}"
        raise CheckpointError(msg) from exc
    expect = {
        "num_tokens": config["num_tokens"],
        "dim": config["dim"],
        "depth": config["depth"],
        "heads": config["heads"],
        "dim_head": config["dim_head"],
        "max_seq_len": config["num_positions"],
    }
    bad = [f"{k}={given[k]} (weights: {v})" for k, v in expect.items() if k in given and given[k] != v]
    if bad:
        msg = f"{path} disagrees with the weights: {', '.join(bad)}"
        raise CheckpointError(msg)
