"""Embedder stage: AnnData cells → float32 ``(n_cells, dim)`` embeddings, written to the store.

One module per model registers its adapter with :func:`~scdrugmap.embedder.base.register`; the
registry imports them on first lookup (:data:`~scdrugmap.embedder.base.ADAPTER_MODULES`), so importing
this package (or :mod:`~scdrugmap.embedder.vocab`, :mod:`~scdrugmap.embedder.executor`) loads no model
code and no torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["Embedder", "available_models", "get_embedder_class", "load_embedder", "register"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("scdrugmap.embedder.base"), name)
    msg = f"module 'scdrugmap.embedder' has no attribute {name!r}"
    raise AttributeError(msg)
