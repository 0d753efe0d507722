"""The store: DuckDB catalog + Zarr embeddings + ingested datasets (owns every byte on disk).

Names are imported on first use, so ``scdrugmap.store.errors`` (and the command line) stay light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "DEFAULT_STORE",
    "CheckpointError",
    "InputError",
    "ScDrugMapError",
    "Store",
    "StoreError",
    "default_store_path",
    "export_obsm",
    "open_embeddings",
]

_WHERE = {
    "DEFAULT_STORE": "catalog",
    "Store": "catalog",
    "default_store_path": "catalog",
    "export_obsm": "embeddings",
    "open_embeddings": "embeddings",
    "CheckpointError": "errors",
    "InputError": "errors",
    "ScDrugMapError": "errors",
    "StoreError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"scdrugmap.store.{_WHERE[name]}"), name)
    msg = f"module 'scdrugmap.store' has no attribute {name!r}"
    raise AttributeError(msg)
