"""Attention blocks of the scGPT, scFoundation and UCE releases, LoRA-ready.

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

The adapter-side machinery the three models share is :mod:`embedder._attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LORA_TARGET_MODULES",
    "LORA_TARGET_PARAMETERS",
    "EncoderLayer",
    "PackedSelfAttention",
    "TransformerEncoder",
    "encoder_stack",
]

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
