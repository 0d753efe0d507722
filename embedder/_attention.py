"""Pieces shared by the scGPT, scFoundation and UCE adapters: attention blocks and a base class.

All three released checkpoints were trained with ``torch.nn.TransformerEncoderLayer``
(post-norm, ReLU feed-forward) whose attention is ``torch.nn.MultiheadAttention``. The
blocks here keep exactly those state-dict names and shapes::

    self_attn.in_proj_weight   (3·dim, dim)   packed Q/K/V projection (a Parameter)
    self_attn.in_proj_bias     (3·dim,)
    self_attn.out_proj.weight  (dim, dim)     a real ``nn.Linear`` module
    self_attn.out_proj.bias    (dim,)
    linear1.* / linear2.*                     feed-forward
    norm1.* / norm2.*                         LayerNorms (eps 1e-5)

so a released checkpoint loads with ``strict=True``, while two things differ from torch:

1. The output projection is *called* as a module (``self.out_proj(x)``). torch's
   ``nn.MultiheadAttention`` reads ``out_proj.weight`` inside a functional call, so a LoRA
   wrapper put on ``out_proj`` never runs (its adapters get no gradient). Here LoRA on
   ``out_proj`` works with ``peft``'s ``target_modules``; the packed input projection is a
   Parameter read as an attribute, which ``peft``'s ``target_parameters=["in_proj_weight"]``
   can wrap.
2. Padding is always a boolean key mask (True = padded key, never attended), so a cell's
   output does not depend on how much padding its batch-mates add.

:class:`RaggedTokens` (unpadded per-cell token arrays) and :class:`MHAEmbedder` (option
parsing, length-sorted mini-batching with CUDA OOM back-off, NaN rows for empty cells,
``spec()`` with checkpoint hashes) are the adapter-side machinery the three models share.
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
import torch.nn.functional as F
from anndata import AnnData
from torch import nn

from embedder._torch import (
    PaddingReport,
    SortedBatchEmbedder,
    autocast_context,
    pick_device,
)
from store.errors import InputError

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

# default LoRA targets of these blocks: the output projection as a module, and the packed
# Q/K/V projection as a parameter (peft `target_parameters`)
LORA_TARGET_MODULES: tuple[str, ...] = ("out_proj",)
LORA_TARGET_PARAMETERS: tuple[str, ...] = ("in_proj_weight",)


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names.

    Parameters
    ----------
    dim
        Model width.
    heads
        Number of heads (``dim`` must be divisible by it).
    dropout
        Attention-probability dropout (training only).

    Notes
    -----
    Same arithmetic as ``torch.nn.functional.multi_head_attention_forward`` (packed
    projection, scaled dot product per head, output projection), computed with
    :func:`torch.nn.functional.scaled_dot_product_attention` and a boolean mask.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            msg = f"model width {dim} is not divisible by {heads} heads"
            raise ValueError(msg)
        self.dim = dim
        self.heads = heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self.in_proj_weight.is_meta:
            return
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over the sequence.

        Parameters
        ----------
        x
            ``(batch, seq, dim)``.
        pad_mask
            bool ``(batch, seq)``, True where the token is padding (never attended).

        Returns
        -------
        torch.Tensor
            ``(batch, seq, dim)``.
        """
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        keep = None if pad_mask is None else (~pad_mask)[:, None, None, :]
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    """``torch.nn.TransformerEncoderLayer`` (ReLU, batch-first) with :class:`PackedSelfAttention`.

    Parameters
    ----------
    dim
        Model width.
    heads
        Attention heads.
    ff_dim
        Feed-forward width.
    dropout
        Dropout of attention, feed-forward and residual branches (training only).
    norm_first
        Pre-norm when True; post-norm (torch's default, used by all three releases) otherwise.
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float = 0.1, *, norm_first: bool = False):
        super().__init__()
        self.self_attn = PackedSelfAttention(dim, heads, dropout)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm_first = norm_first

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch, seq, dim)`` → ``(batch, seq, dim)``; ``pad_mask`` as in :class:`PackedSelfAttention`."""
        if self.norm_first:
            x = x + self.dropout1(self.self_attn(self.norm1(x), pad_mask))
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x, pad_mask)))
        return self.norm2(x + self._ff(x))


class TransformerEncoder(nn.Module):
    """``torch.nn.TransformerEncoder`` layout: ``layers.<i>.…`` (no final norm)."""

    def __init__(self, depth: int, dim: int, heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = encoder_stack(depth, dim, heads, ff_dim, dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch, seq, dim)`` through every layer."""
        for layer in self.layers:
            x = layer(x, pad_mask)
        return x


def encoder_stack(
    depth: int, dim: int, heads: int, ff_dim: int, dropout: float, *, norm_first: bool = False
) -> nn.ModuleList:
    """``depth`` :class:`EncoderLayer` blocks in an ``nn.ModuleList`` (keys ``0.…``, ``1.…``)."""
    return nn.ModuleList(
        EncoderLayer(dim, heads, ff_dim, dropout, norm_first=norm_first) for _ in range(depth)
    )


# -- adapter machinery ----------------------------------------------------------------------


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


COMMON_DEFAULTS: dict[str, Any] = {"device": None, "batch_size": 32, "precision": "fp32"}


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
    for key, allowed in {"precision": ("fp32", "bf16", "fp16"), **choices}.items():
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
