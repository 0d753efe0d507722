"""scdrugmap: drug sensitive/resistant single cancer cells from scRNA-seq with foundation-model embeddings.

The Python API, as scanpy users expect (each name is imported on first use, so ``import scdrugmap``
stays light):

- :class:`Store` — the store (DuckDB catalog + Zarr embeddings + ingested datasets).
- :func:`ingest` — an h5ad file or in-memory AnnData into the store (QC, labels, gene identity).
- :func:`embed` — embed the selected datasets with a model (resumable; executors for scale-out).
- :func:`evaluate` — a head on frozen embeddings, pooled / cross-data / external, into the catalog.
- :func:`predict` — per-cell calls of a trained head for an AnnData or h5ad (QC, calibration).
- :func:`export` — a dataset's embeddings into ``obsm['X_scdrugmap_<model>']``.

Layout: :mod:`scdrugmap.store` (every byte on disk), :mod:`scdrugmap.embedder` (AnnData → embeddings),
:mod:`scdrugmap.classify` (heads, folds, evaluation, prediction; the web service and the biology views
in ``classify.service`` / ``classify.analyze``), :mod:`scdrugmap.cli` (the ``scdrugmap`` command).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["Store", "embed", "evaluate", "export", "ingest", "predict"]

_API = {
    "Store": ("scdrugmap.store.catalog", "Store"),
    "ingest": ("scdrugmap.store.ingest", "ingest_h5ad"),
    "embed": ("scdrugmap.embedder.runner", "embed_datasets"),
    "evaluate": ("scdrugmap.classify.evaluate", "evaluate"),
    "predict": ("scdrugmap.classify.predict", "predict"),
    "export": ("scdrugmap.store.embeddings", "export_obsm"),
}


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    msg = f"module 'scdrugmap' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
