"""Adapter machinery shared by the scGPT, scFoundation and UCE adapters (and their attention blocks).

:class:`RaggedTokens` (unpadded per-cell token arrays) and :class:`MHAEmbedder` (option
parsing, length-sorted mini-batching with CUDA OOM back-off, NaN rows for empty cells,
``spec()`` with checkpoint hashes) are the adapter-side machinery the three models share.
The attention blocks (``torch.nn.TransformerEncoderLayer``'s state-dict layout with a real
``out_proj`` module and boolean padding masks, so LoRA works and batch-mates do not matter)
are in :mod:`embedder._attention_blocks` and re-exported here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch import nn

from scdrugmap.embedder._attention_blocks import (
    LORA_TARGET_MODULES,
    LORA_TARGET_PARAMETERS,
    EncoderLayer,
    PackedSelfAttention,
    TransformerEncoder,
    encoder_stack,
)
from scdrugmap.embedder._torch import (
    PaddingReport,
    SortedBatchEmbedder,
    autocast_context,
    pick_device,
)
from scdrugmap.embedder.vocab import GENE_MATCHING
from scdrugmap.store.errors import InputError

__all__ = [
    "LORA_TARGET_MODULES",
    "LORA_TARGET_PARAMETERS",
    "EncoderLayer",
    "MHAEmbedder",
    "PackedSelfAttention",
    "RaggedTokens",
    "TransformerEncoder",
    "cell_seed",
    "check_int",
    "counts_csr",
    "encoder_stack",
    "parse_options",
    "var_symbols",
]

log = logging.getLogger(__name__)


def cell_seed(seed: int, *arrays: np.ndarray) -> np.random.SeedSequence:
    """A per-cell seed from the run seed and the cell's own content.

    Sampling seeded this way depends only on ``seed`` and the arrays (e.g. a cell's token
    ids and counts) — not on the cell's position, its batch-mates or the chunking.

    Returns
    -------
    numpy.random.SeedSequence
        ``SeedSequence([seed, h0, h1])`` with ``h`` = 128-bit BLAKE2b of the arrays' bytes.
    """
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(a.dtype.str.encode())
        h.update(a.tobytes())
    digest = h.digest()
    return np.random.SeedSequence(
        [seed, int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")]
    )


@dataclass
class RaggedTokens:
    """Unpadded per-cell model inputs.

    Attributes
    ----------
    fields
        ``{name: [1-D array per cell]}``; all fields of a cell have the same length.
    pad
        ``{name: value}`` used when padding each field.
    n_genes
        int64 ``(n_cells,)``: genes represented per cell; 0 → the cell's embedding is NaN.
    """

    fields: dict[str, list[np.ndarray]]
    pad: dict[str, float | int]
    n_genes: np.ndarray

    def __len__(self) -> int:
        return len(self.n_genes)

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``(n_cells,)`` token counts."""
        first = next(iter(self.fields.values()))
        return np.fromiter((len(x) for x in first), dtype=np.int64, count=len(first))

    def subset(self, idx: Sequence[int] | np.ndarray) -> RaggedTokens:
        """The cells ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        return RaggedTokens(
            {k: [v[i] for i in idx] for k, v in self.fields.items()},
            dict(self.pad),
            np.asarray(self.n_genes)[idx],
        )

    def padded(self) -> dict[str, np.ndarray]:
        """Right-padded fields ``(n_cells, max_length)`` plus ``pad_mask`` (bool, True = padding)."""
        lengths = self.lengths
        width = int(max(1, lengths.max(initial=0)))
        out: dict[str, np.ndarray] = {}
        for name, seqs in self.fields.items():
            dtype = seqs[0].dtype if seqs else np.float32
            arr = np.full((len(self), width), self.pad[name], dtype=dtype)
            for row, x in enumerate(seqs):
                arr[row, : len(x)] = x
            out[name] = arr
        out["pad_mask"] = np.arange(width)[None, :] >= lengths[:, None]
        return out


def var_symbols(var: Any) -> np.ndarray:
    """``var["symbol"]`` as a str array (``""`` where missing); :class:`InputError` if absent."""
    if "symbol" not in var:
        msg = "adata.var lacks the column 'symbol' required by the AnnData contract (see embedder.base)"
        raise InputError(msg)
    return np.asarray(var["symbol"].fillna("").astype(str).to_numpy(), dtype=object)


def counts_csr(adata: AnnData, model: str) -> sp.csr_matrix:
    """``adata.X`` as canonical float32 CSR; :class:`InputError` when it holds negative values."""
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    if X.nnz and X.data.min() < 0:
        msg = f"{model!r} needs raw counts but adata.X holds negative values (scaled data?); embed the counts"
        raise InputError(msg)
    return X


COMMON_DEFAULTS: dict[str, Any] = {
    "device": None,
    "batch_size": 32,
    "precision": "fp32",
    "gene_matching": "best",
}


def check_int(model: str, key: str, value: Any, *, minimum: int) -> int:
    """An integer option ≥ ``minimum``; raises :class:`InputError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        msg = f"option {key}={value!r} for model {model!r} must be an integer ≥ {minimum}"
        raise InputError(msg)
    return int(value)


def parse_options(
    model: str, options: Mapping[str, Any], defaults: Mapping[str, Any], choices: Mapping[str, Sequence[Any]]
) -> dict[str, Any]:
    """Merge ``options`` over the common (device/batch_size/precision) and model ``defaults``.

    Raises
    ------
    InputError
        Unknown option names, a value outside its ``choices``, or a bad batch size/device.
    """
    known = {**COMMON_DEFAULTS, **defaults}
    unknown = sorted(set(options) - set(known))
    if unknown:
        msg = f"unknown option(s) {', '.join(unknown)} for model {model!r}; valid: {', '.join(sorted(known))}"
        raise InputError(msg)
    out = {**known, **options}
    for key, allowed in {
        "precision": ("fp32", "bf16", "fp16"),
        "gene_matching": GENE_MATCHING,
        **choices,
    }.items():
        if out[key] not in allowed:
            msg = (
                f"option {key}={out[key]!r} for model {model!r} is not one of {', '.join(map(str, allowed))}"
            )
            raise InputError(msg)
    check_int(model, "batch_size", out["batch_size"], minimum=1)
    try:
        out["device"] = pick_device(out["device"])
    except (RuntimeError, ValueError) as exc:
        msg = f"option device={out['device']!r} for model {model!r} is not a torch device ('cpu', 'cuda')"
        raise InputError(msg) from exc
    return out


class MHAEmbedder(SortedBatchEmbedder):
    """Base of the scGPT/scFoundation/UCE adapters.

    Subclasses build their module in ``load`` and implement :meth:`tokenize` (→
    :class:`RaggedTokens`), :meth:`hidden_states` (differentiable), :meth:`pool_torch`,
    :meth:`in_vocabulary`, :attr:`dim` and :meth:`_tokenizer_spec`.

    Attributes
    ----------
    lora_targets
        Module names for ``peft``'s ``target_modules`` (the real ``out_proj`` modules).
    lora_target_parameters
        Parameter names for ``peft``'s ``target_parameters`` (the packed Q/K/V projection).
    padding_report
        :class:`~embedder._torch.PaddingReport` accumulated over :meth:`embed` calls.
    """

    input_kind: ClassVar = "counts"
    lora_targets: ClassVar[tuple[str, ...]] = LORA_TARGET_MODULES
    lora_target_parameters: ClassVar[tuple[str, ...]] = LORA_TARGET_PARAMETERS

    def __init__(self, module: nn.Module, files: Sequence[Path], options: Mapping[str, Any]) -> None:
        self.options = dict(options)
        self.device = options["device"]
        self.batch_size = int(options["batch_size"])
        self.precision = str(options["precision"])
        self.pooling = str(options["pooling"])
        self.gene_matching = str(options["gene_matching"])
        self._module = module.to(self.device).eval()
        self._files = sorted(Path(f) for f in files)
        self._hashes: dict[str, str] | None = None
        self.padding_report = PaddingReport()

    def vocabulary(self) -> pd.DataFrame:
        """The model's genes: columns ``symbol`` and ``ensembl_id`` (``""``: matched by symbol)."""
        symbols = list(self._vocab_symbols())
        return pd.DataFrame({"symbol": symbols, "ensembl_id": [""] * len(symbols)})

    def _vocab_symbols(self) -> list[str]:
        raise NotImplementedError

    def torch_module(self) -> nn.Module:
        """The model, with the release's parameter names (for LoRA and fine-tuning)."""
        return self._module

    def hidden_states(self, tokens: RaggedTokens) -> torch.Tensor:
        """Differentiable last hidden states ``(n_cells, max_length, width)``."""
        raise NotImplementedError

    def pool_torch(self, hidden: torch.Tensor, tokens: RaggedTokens) -> torch.Tensor:
        """Differentiable pooling ``(n_cells, max_length, width)`` → ``(n_cells, dim)``."""
        raise NotImplementedError

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def forward(self, tokens: RaggedTokens) -> torch.Tensor:
        """:meth:`hidden_states` in inference mode (autocast to ``precision`` on CUDA), as float32."""
        with torch.inference_mode(), autocast_context(self.device, self.precision):  # type: ignore[arg-type]
            return self.hidden_states(tokens).float()

    def pool(self, hidden: torch.Tensor, tokens: RaggedTokens) -> np.ndarray:
        """Pooled float32 ``(n_cells, dim)``; cells without genes are NaN."""
        with torch.inference_mode():
            out = self.pool_torch(hidden, tokens).float().cpu().numpy().astype(np.float32)
        out[np.asarray(tokens.n_genes) == 0] = np.nan
        return out
