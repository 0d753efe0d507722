"""Performer (FAVOR+ linear attention) modules shared by scBERT and CellLM: the ``PerformerLM``.

Both models are a ``PerformerLM``: token embedding + a frozen gene2vec position table, a stack
of pre-LayerNorm [linear self-attention, GELU feed-forward] blocks, a final LayerNorm and an
(unused here) token head. The module and parameter names reproduce the released checkpoints'
keys (``performer.net.layers.N.0.fn.to_q.weight``, ``...N.1.fn.fn.w1.weight``, ...).

Follows ``TencentAILabHealthcare/scBERT@262fd4b`` ``performer_pytorch/performer_pytorch.py`` and
``PharMolix/OpenBioMed@ce3ccab`` ``open_biomed/models/cell/performer_celllm.py`` (both derived
from lucidrains' performer-pytorch), with two deliberate changes:

- **Per-cell key stabiliser.** The originals subtract ``torch.max`` over the *whole* key-feature
  tensor (all cells of the batch) before ``exp`` and then add ``eps=1e-4``, so the stabiliser
  does not cancel and a cell's output depends on its batch-mates. Here the maximum is taken per
  cell (over heads, positions and features), which equals the original run with one cell per
  forward (as scBERT's ``predict.py`` does) and makes results batch invariant.
- **Weighted keys.** ``key_weight`` (``(batch, seq)``) multiplies each key's feature vector in
  the attention sums. Weight 0 removes batch padding exactly; a weight ``w > 1`` stands for
  ``w`` identical keys, which lets CellLM replace its run of identical padding tokens by one
  representative (see :mod:`embedder.celllm`).

The projection matrices are buffers loaded from the checkpoint; they are never redrawn
(inference and LoRA fine-tuning keep them fixed). Checkpoint reading, panel preprocessing and
the shared adapter base are in :mod:`embedder._performer`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FastAttention", "FeedForward", "Performer", "PerformerLM", "PreLayerNorm", "SelfAttention"]

_KERNEL_EPS = 1e-4  # added after exp in the originals' softmax_kernel


def _softmax_features(
    x: torch.Tensor, projection: torch.Tensor, *, is_query: bool, key_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Positive random features of queries/keys, ``(b, h, n, d)`` → ``(b, h, n, m)``.

    ``exp(x·ω/d^¼ − |x|²/(2√d) − stabiliser) + eps``. The originals' constant factor
    ``m^-½`` is left out: it cancels exactly between numerator and normaliser.
    """
    normaliser = x.shape[-1] ** -0.25
    dash = torch.matmul(normaliser * x, projection.to(x.dtype).t())
    diag = (x**2).sum(dim=-1, keepdim=True) / 2.0 * normaliser**2
    if is_query:
        stab = dash.amax(dim=-1, keepdim=True)
    else:
        seen = dash
        if key_weight is not None:
            seen = dash.masked_fill((key_weight <= 0)[:, None, :, None], float("-inf"))
        stab = seen.amax(dim=(1, 2, 3), keepdim=True)  # one stabiliser per cell
    if torch.is_grad_enabled() and (dash.requires_grad or diag.requires_grad):
        return torch.exp(dash - (diag + stab)) + _KERNEL_EPS
    return dash.sub_(diag + stab).exp_().add_(_KERNEL_EPS)  # in place: inference is memory bound


class FastAttention(nn.Module):
    """Non-causal FAVOR+ attention with a fixed ``projection_matrix`` buffer ``(m, dim_head)``."""

    def __init__(self, dim_head: int, nb_features: int):
        super().__init__()
        self.register_buffer("projection_matrix", torch.zeros(nb_features, dim_head))

    def forward(self, q, k, v, key_weight=None):
        """``q, k, v``: ``(b, h, n, d)``; ``key_weight``: ``(b, n)`` or None. Returns ``(b, h, n, d)``.

        Runs in float32 even under autocast: the exp features and the sums over ~10⁴ keys
        lose too much in 16-bit formats.
        """
        with torch.autocast(q.device.type, enabled=False):
            return self._attend(q.float(), k.float(), v.float(), key_weight)

    def _attend(self, q, k, v, key_weight):
        qf = _softmax_features(q, self.projection_matrix, is_query=True)
        kf = _softmax_features(k, self.projection_matrix, is_query=False, key_weight=key_weight)
        if key_weight is not None:
            kf = kf * key_weight[:, None, :, None].to(kf.dtype)
        d_inv = 1.0 / torch.matmul(qf, kf.sum(dim=-2).unsqueeze(-1))  # (b, h, n, 1)
        context = torch.matmul(kf.transpose(-1, -2), v)  # (b, h, m, d)
        return torch.matmul(qf, context) * d_inv


class SelfAttention(nn.Module):
    """Multi-head Performer self-attention (``to_q``/``to_k``/``to_v`` without bias, ``to_out``)."""

    def __init__(self, dim: int, heads: int, dim_head: int, nb_features: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.fast_attention = FastAttention(dim_head, nb_features)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x, key_weight=None, value_mask=None):
        b, n, _ = x.shape
        q, k, v = (
            t.view(b, n, self.heads, -1).transpose(1, 2) for t in (self.to_q(x), self.to_k(x), self.to_v(x))
        )
        if value_mask is not None:  # the originals zero the values of masked positions only
            v = v.masked_fill(~value_mask[:, None, :, None], 0.0)
        out = self.fast_attention(q, k, v, key_weight)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """``w2(GELU(w1(x)))``."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.w1 = nn.Linear(dim, dim * mult)
        self.act = nn.GELU()
        self.w2 = nn.Linear(dim * mult, dim)

    def forward(self, x):
        return self.w2(self.act(self.w1(x)))


class _Wrap(nn.Module):
    """Holds ``fn`` under the attribute name the checkpoints use (``Chunk`` with one chunk)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(x, **kwargs)


class PreLayerNorm(nn.Module):
    """``fn(LayerNorm(x))``."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class _Net(nn.Module):
    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers


class Performer(nn.Module):
    """``depth`` residual blocks; ``calls_since_last_redraw`` is kept only for key compatibility."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, nb_features: int, ff_mult: int):
        super().__init__()
        layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreLayerNorm(dim, SelfAttention(dim, heads, dim_head, nb_features)),
                    PreLayerNorm(dim, _Wrap(FeedForward(dim, ff_mult))),
                ]
            )
            for _ in range(depth)
        )
        self.net = _Net(layers)
        self.register_buffer("calls_since_last_redraw", torch.zeros((), dtype=torch.long))

    def forward(self, x, key_weight=None, value_mask=None):
        for attn, ff in self.net.layers:
            x = x + attn(x, key_weight=key_weight, value_mask=value_mask)
            x = x + ff(x)
        return x


class _PositionTable(nn.Module):
    def __init__(self, num_positions: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(num_positions, dim)
        self.emb.weight.requires_grad_(False)  # frozen, like nn.Embedding.from_pretrained


class PerformerLM(nn.Module):
    """Token + gene2vec position embedding → Performer → LayerNorm.

    Parameters
    ----------
    num_tokens
        Expression-token vocabulary size.
    num_positions
        Rows of the gene2vec position table.
    dim, depth, heads, dim_head, nb_features, ff_mult
        Architecture (the originals' defaults: ``dim_head=64``, ``nb_features=int(64·ln 64)=266``,
        ``ff_mult=4``).
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        num_positions: int,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int = 64,
        nb_features: int | None = None,
        ff_mult: int = 4,
    ):
        super().__init__()
        nb_features = nb_features or int(dim_head * math.log(dim_head))
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = _PositionTable(num_positions, dim)
        self.performer = Performer(dim, depth, heads, dim_head, nb_features, ff_mult)
        self.norm = nn.LayerNorm(dim)
        self.to_out = nn.Linear(dim, num_tokens)

    def forward(self, tokens, positions=None, key_weight=None, value_mask=None):
        """Final-LayerNorm encodings.

        Parameters
        ----------
        tokens
            int64 ``(b, n)`` expression tokens.
        positions
            int64 ``(b, n)`` rows of the position table; None → ``0..n-1`` (scBERT).
        key_weight
            float ``(b, n)`` multiplicity of each key (0 = padding) or None (all 1).
        value_mask
            bool ``(b, n)``; False zeroes that position's values (CellLM's mask) or None.

        Returns
        -------
        torch.Tensor
            ``(b, n, dim)``.
        """
        x = self.token_emb(tokens)
        if positions is None:
            pos = self.pos_emb.emb.weight[: tokens.shape[1]].unsqueeze(0)
        else:
            pos = self.pos_emb.emb(positions)
        x = self.performer(x + pos.to(x.dtype), key_weight=key_weight, value_mask=value_mask)
        return self.norm(x)
