"""The store: DuckDB catalog + Zarr embeddings + ingested datasets (owns every byte on disk)."""

from __future__ import annotations

from store.catalog import DEFAULT_STORE, Store, default_store_path
from store.embeddings import export_obsm, open_embeddings
from store.errors import CheckpointError, InputError, ScDrugMapError, StoreError

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
