"""UCE's ``TransformerModel`` (plus its token table) and how its size is read from a state dict.

Follows ``snap-stanford/UCE@8ead6e07af0c80f75653598138bb704e865b45c8`` ``model.py``
(``TransformerModel``) and ``evaluate.py`` (``run_eval``: the ``pe_embedding`` table, ``nhead``).
Token table → L2-normalise → Linear/GELU/LayerNorm × √d_model → + sinusoidal positions →
post-norm transformer (:mod:`embedder._attention_blocks`) → decoder MLP; cell embedding =
decoder output at CLS, L2-normalised. The adapter (checkpoint files, cell sentences) is
:mod:`embedder.uce`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scdrugmap.embedder._attention_blocks import TransformerEncoder
from scdrugmap.store.errors import CheckpointError, InputError

__all__ = ["UCEModel", "build_module"]


def _full_block(n_in: int, n_out: int, p: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.LayerNorm(n_out), nn.GELU(), nn.Dropout(p))


class UCEModel(nn.Module):
    """UCE ``TransformerModel`` plus the ``pe_embedding`` token table ``run_eval`` attaches.

    Parameters
    ----------
    token_dim, d_model, nhead, d_hid, nlayers, output_dim
        As ``TransformerModel`` (real 4-layer model: 5120, 1280, 20, 5120, 4, 1280).
    n_tokens
        Rows of the token table.
    max_len
        Rows of the sinusoidal position buffer ``pos_encoder.pe`` (1536).
    dropout
        0.05 as ``run_eval``.
    """

    def __init__(
        self, token_dim, d_model, nhead, d_hid, nlayers, output_dim, n_tokens, max_len=1536, dropout=0.05
    ):
        super().__init__()
        self.d_model = d_model
        self.pos_encoder = nn.Module()
        self.pos_encoder.register_buffer("pe", torch.zeros(max_len, 1, d_model))
        self.pos_dropout = nn.Dropout(dropout)
        self.encoder = nn.Sequential(nn.Linear(token_dim, d_model), nn.GELU(), nn.LayerNorm(d_model))
        self.transformer_encoder = TransformerEncoder(nlayers, d_model, nhead, d_hid, dropout)
        self.decoder = nn.Sequential(
            _full_block(d_model, 1024, dropout),
            _full_block(1024, output_dim, dropout),
            _full_block(output_dim, output_dim, dropout),
            nn.Linear(output_dim, output_dim),
        )
        self.binary_decoder = nn.Sequential(  # gene-expression head, unused for embeddings
            _full_block(output_dim + 1280, 2048, dropout),
            _full_block(2048, 512, dropout),
            _full_block(512, 128, dropout),
            nn.Linear(128, 1),
        )
        self.gene_embedding_layer = nn.Sequential(
            nn.Linear(token_dim, d_model), nn.GELU(), nn.LayerNorm(d_model)
        )
        self.pe_embedding = nn.Embedding(n_tokens, token_dim)
        self.pe_embedding.weight.requires_grad_(False)  # from_pretrained(freeze=True)

    def forward(self, ids: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, L)`` and pad mask ``(B, L)`` → transformer output ``(B, L, d_model)``."""
        x = F.normalize(self.pe_embedding(ids), dim=-1)
        x = self.encoder(x) * math.sqrt(self.d_model)
        x = self.pos_dropout(x + self.pos_encoder.pe[: x.shape[1], 0].unsqueeze(0))
        return self.transformer_encoder(x, pad_mask)

    def cell_embedding(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder MLP at CLS (position 0), L2-normalised: ``(B, L, d_model)`` → ``(B, output_dim)``.

        The decoder acts per token, so applying it to CLS only equals the original's
        ``decoder(output)[0]``.
        """
        return F.normalize(self.decoder(hidden[:, 0]), dim=1)


def build_module(state: Mapping[str, Any], n_tokens: int, nhead: int) -> UCEModel:
    """:class:`UCEModel` with dimensions read from a state dict's shapes (works on ``meta``).

    Raises
    ------
    CheckpointError
        When a key needed to infer a dimension is missing.
    """
    need = (
        "encoder.0.weight",
        "transformer_encoder.layers.0.linear1.weight",
        "decoder.3.weight",
        "pos_encoder.pe",
    )
    missing = [k for k in need if k not in state]
    if missing:
        msg = f"not a UCE model state dict: lacks {', '.join(missing)}"
        raise CheckpointError(msg)
    d_model, token_dim = state["encoder.0.weight"].shape
    nlayers = len({k.split(".")[2] for k in state if k.startswith("transformer_encoder.layers.")})
    if d_model % nhead:
        ok = ", ".join(str(h) for h in range(1, d_model + 1) if d_model % h == 0 and h <= 64)
        msg = (
            f"nhead={nhead} does not divide the model width {d_model} (UCE checkpoints do not record it); "
            f"pass the nhead the model was trained with, --option nhead=N, one of: {ok} (the release uses 20)"
        )
        raise InputError(msg)
    return UCEModel(
        token_dim=int(token_dim),
        d_model=int(d_model),
        nhead=nhead,
        d_hid=int(state["transformer_encoder.layers.0.linear1.weight"].shape[0]),
        nlayers=nlayers,
        output_dim=int(state["decoder.3.weight"].shape[0]),
        n_tokens=n_tokens,
        max_len=int(state["pos_encoder.pe"].shape[0]),
    )
