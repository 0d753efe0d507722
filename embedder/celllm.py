"""CellLM adapter: expressed genes as tokens (CLS first, PAD to 6,000), Performer encoder.

Follows ``PharMolix/OpenBioMed@ce3ccab76f5dd3a48a02298f3c4c61bfb9b2501c``
``open_biomed/models/cell/performer_celllm.py`` (``PerformerLM_CellLM.forward`` builds the
tokens: the genes with value > 0 in panel order, value clipped at ``cls_token − 1`` = 5 and
truncated to int, a CLS token (id ``num_tokens − 2``, gene ``gene_num``) in front, PAD tokens (id
``num_tokens − 1``, gene ``gene_num + 1``) up to ``max_seq_len``; ``mask`` zeroes the *values*
of PAD positions only) and ``configs/ctc/cellLM.json``. Expression is normalised with scBERT's
recipe (panel re-index, ``normalize_total(1e4)``, ``log1p(base=2)``), which the fixtures assume
(OpenBioMed reads already-normalised files).

Exact shortcut: PAD positions carry identical inputs, so they stay identical in every layer;
their keys still enter the linear-attention normaliser and the key stabiliser. Instead of
running ``max_seq_len`` positions, each cell runs its CLS + gene tokens plus **one** PAD
representative whose key counts ``max_seq_len − length`` times (``key_weight``). Results equal
the original run one cell per forward (the original's batch-wide key stabiliser is made per
cell, see :mod:`embedder._performer`).

Pooling: ``"cls"`` (default, position 0), ``"masked_mean"`` (mean over the gene positions,
CLS excluded) or ``"masked_mean_with_cls"``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
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

__all__ = ["CellLMEmbedder", "CellLMTokens"]

log = logging.getLogger(__name__)

CONFIG = "cellLM.json"
GENE_LIST = "gene_list.txt"
DEFAULTS = {"weights": "checkpoint4_fixed.pth", "gene2vec": "gene2vec_19379_512.npy", "max_seq_len": 6000}
EXPECTED = (
    f"{GENE_LIST} (panel symbols, one per line, in gene-id order)",
    f"{DEFAULTS['weights']} (or the ckpt_path named in {CONFIG})",
    f"{DEFAULTS['gene2vec']} (or the gene2vec_path named in {CONFIG})",
    f"optional {CONFIG} (OpenBioMed config; network.structure is read)",
)
POOLINGS = ("cls", "masked_mean", "masked_mean_with_cls")


@dataclass
class CellLMTokens:
    """Cells on the panel: ``values`` CSR ``(n, gene_num)`` log2-normalised; token ids follow from it."""

    values: sp.csr_matrix
    num_tokens: int
    max_seq_len: int

    def __len__(self) -> int:
        return self.values.shape[0]

    def subset(self, idx: np.ndarray) -> CellLMTokens:
        """Tokens of the cells ``idx``."""
        return CellLMTokens(self.values[idx], self.num_tokens, self.max_seq_len)

    @property
    def lengths(self) -> np.ndarray:
        """Valid tokens per cell (CLS + expressed genes, truncated to ``max_seq_len``), ``(n,)``."""
        return np.minimum(1 + np.diff(self.values.indptr), self.max_seq_len)

    def _cells(self):
        cls_token, gene_num = self.num_tokens - 2, self.values.shape[1]
        for i, length in enumerate(self.lengths):
            lo = self.values.indptr[i]
            genes = self.values.indices[lo : lo + length - 1].astype(np.int64)
            vals = np.minimum(self.values.data[lo : lo + length - 1], cls_token - 1).astype(np.int64)
            yield i, np.concatenate([[cls_token], vals]), np.concatenate([[gene_num], genes])

    def original_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The original's padded inputs: token ids, gene ids, mask, each ``(n, max_seq_len)``."""
        n, gene_num = len(self), self.values.shape[1]
        ids = np.full((n, self.max_seq_len), self.num_tokens - 1, dtype=np.int64)
        pos = np.full((n, self.max_seq_len), gene_num + 1, dtype=np.int64)
        mask = np.zeros((n, self.max_seq_len), dtype=bool)
        for i, tok, gene in self._cells():
            ids[i, : len(tok)], pos[i, : len(tok)], mask[i, : len(tok)] = tok, gene, True
        return ids, pos, mask

    def compact(self) -> dict[str, np.ndarray]:
        """Batch inputs ``(n, L + 1)``, ``L`` = longest cell: valid tokens, batch padding, PAD representative.

        Returns
        -------
        dict
            ``tokens``, ``positions`` (int64), ``key_weight`` (float32: 1 valid, 0 batch padding,
            ``max_seq_len − length`` for the last column) and ``value_mask`` (bool, valid only).
        """
        n, gene_num = len(self), self.values.shape[1]
        width = int(self.lengths.max()) + 1
        ids = np.full((n, width), self.num_tokens - 1, dtype=np.int64)
        pos = np.full((n, width), gene_num + 1, dtype=np.int64)
        weight = np.zeros((n, width), dtype=np.float32)
        valid = np.zeros((n, width), dtype=bool)
        for i, tok, gene in self._cells():
            ids[i, : len(tok)], pos[i, : len(tok)], valid[i, : len(tok)] = tok, gene, True
            weight[i, : len(tok)] = 1.0
            weight[i, -1] = self.max_seq_len - len(tok)
        return {"tokens": ids, "positions": pos, "key_weight": weight, "value_mask": valid}


@register
class CellLMEmbedder(PerformerEmbedder):
    """CellLM (``PerformerLM_CellLM``) over its gene panel.

    Load with :meth:`load`; the checkpoint directory holds ``checkpoint4_fixed.pth``
    (``{'model_state_dict': ...}``), ``gene2vec_19379_512.npy``, ``gene_list.txt`` and optionally
    OpenBioMed's ``cellLM.json`` (whose ``ckpt_path``/``gene2vec_path`` file names, ``max_seq_len``
    and ``param_key`` are then used).
    """

    name: ClassVar[str] = "celllm"

    @classmethod
    def load(
        cls,
        checkpoint: str | Path | None = None,
        *,
        device: str | None = None,
        batch_size: int = 32,
        precision: Literal["fp32", "bf16", "fp16"] = "fp32",
        pooling: Literal["cls", "masked_mean", "masked_mean_with_cls"] = "cls",
        seed: int = 0,
        gene_matching: Literal["best", "original"] = "best",
        **unknown: Any,
    ) -> CellLMEmbedder:
        """Read a CellLM checkpoint directory.

        Raises
        ------
        CheckpointError
            Missing files, unreadable or mismatching weights, gene list or gene2vec.
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
        layout = _read_layout(root)
        require_files(
            root, [GENE_LIST, layout["weights"], layout["gene2vec"]], model=cls.name, expected=EXPECTED
        )
        weights = root / layout["weights"]
        state = unwrap_state_dict(load_state_dict(weights), key=layout["param_key"], source=weights)
        config = infer_performer_config(state, source=weights)
        config_check = {k: v for k, v in layout["structure"].items() if k in config and v != config[k]}
        if config_check:
            msg = f"{root / CONFIG} disagrees with {weights.name}: {config_check} vs {dict((k, config[k]) for k in config_check)}"
            raise CheckpointError(msg)
        panel = [line.strip() for line in (root / GENE_LIST).read_text().splitlines() if line.strip()]
        if len(panel) + 2 != config["num_positions"]:
            msg = (
                f"{root / GENE_LIST} lists {len(panel)} genes but {weights.name} has "
                f"{config['num_positions']} positions (genes + CLS + PAD)"
            )
            raise CheckpointError(msg)
        gene2vec_path = root / layout["gene2vec"]
        gene2vec = load_gene2vec(gene2vec_path, rows=len(panel), dim=config["dim"])
        model, dev = build_performer(
            config, state, weights=weights, gene2vec=gene2vec, gene2vec_path=gene2vec_path, device=device
        )
        config = {**config, "max_seq_len": layout["max_seq_len"]}
        options = performer_options(
            dev,
            batch_size=batch_size,
            precision=precision,
            pooling=pooling,
            seed=seed,
            gene_matching=gene_matching,
        )
        files = [weights, root / layout["gene2vec"], root / GENE_LIST] + (
            [root / CONFIG] if (root / CONFIG).is_file() else []
        )
        return cls(model=model, config=config, panel=panel, files=files, options=options)

    def spec(self) -> dict[str, Any]:
        return self._spec(
            {
                "panel_genes": len(self.panel),
                "gene_key": "symbol",
                "normalise": "counts re-indexed to the panel; normalize_total(target_sum=1e4); log1p(base=2)",
                "tokens": "CLS + genes with value > 0 in panel order, min(value, 5) truncated to int",
                "max_seq_len": self.config["max_seq_len"],
            }
        )

    def tokenize(self, adata) -> CellLMTokens:
        """Place cells on the panel and log2-normalise them; token ids are built per batch."""
        values = self._panel_values(adata)
        return CellLMTokens(values, self.config["num_tokens"], self.config["max_seq_len"])

    def _tensors(self, tokens: CellLMTokens) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(self.device) for k, v in tokens.compact().items()}

    def pool_tensor(self, hidden: torch.Tensor, tokens: CellLMTokens) -> torch.Tensor:
        """Pool compact encodings → ``(n, dim)`` (differentiable)."""
        if self.options["pooling"] == "cls":
            return hidden[:, 0]
        lengths = torch.from_numpy(tokens.lengths).to(hidden.device)
        cols = torch.arange(hidden.shape[1], device=hidden.device)
        first = 1 if self.options["pooling"] == "masked_mean" else 0
        m = ((cols >= first) & (cols < lengths[:, None])).to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1)

    def embed(self, adata) -> np.ndarray:
        """Embed cells (float32 ``(n_obs, dim)``, input order; NaN rows for cells with no panel gene)."""
        tokens = self.tokenize(adata)
        return embed_in_batches(self, tokens, lengths=tokens.lengths, usable=tokens.lengths > 1)


def _read_layout(root: Path) -> dict[str, Any]:
    """File names and settings from ``cellLM.json`` when present, else the release defaults."""
    layout = {**DEFAULTS, "param_key": "model_state_dict", "structure": {}}
    path = root / CONFIG
    if not path.is_file():
        return layout
    try:
        structure = json.loads(path.read_text())["network"]["structure"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        msg = f"cannot read network.structure from {path}: {exc!r}"
        raise CheckpointError(msg) from exc
    if structure.get("local_attn_heads", 0) or not structure.get("g2v_position_emb", True):
        msg = f"{path}: only local_attn_heads=0 with g2v_position_emb=true is supported (the released CellLM)"
        raise CheckpointError(msg)
    layout["weights"] = Path(structure.get("ckpt_path", DEFAULTS["weights"])).name
    layout["gene2vec"] = Path(structure.get("gene2vec_path", DEFAULTS["gene2vec"])).name
    layout["param_key"] = structure.get("param_key", "model_state_dict")
    layout["max_seq_len"] = int(structure.get("max_seq_len", DEFAULTS["max_seq_len"]))
    layout["structure"] = {k: structure[k] for k in ("num_tokens", "dim", "depth", "heads") if k in structure}
    return layout
