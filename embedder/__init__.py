"""Embedder stage: AnnData cells → float32 ``(n_cells, dim)`` embeddings, written to the store.

Every module of this package whose name does not start with ``_`` is imported here, so each
adapter registers itself (see :func:`embedder.base.register`) just by existing as a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from embedder.base import Embedder, available_models, get_embedder_class, load_embedder, register

__all__ = ["Embedder", "available_models", "get_embedder_class", "load_embedder", "register"]

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_") and _mod.name not in {"base", "runner"}:
        importlib.import_module(f"{__name__}.{_mod.name}")
