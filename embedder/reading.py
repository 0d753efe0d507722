"""Reading the store's dataset copies with bounded memory (the embedding runner and its workers).

A dataset is opened backed (``anndata.read_h5ad(path, backed="r")``): only the rows of the chunk
being embedded are read into memory (:func:`rows_in_memory`), and the per-gene sums the coverage
report needs are computed block by block (:func:`abs_column_sums`). At scale 2.4 of scDrugMap's
catalogue (1.15 M cells; largest dataset 151 k cells) reading whole datasets held the largest one
and its copies in memory at once (``benchmarks/bench_catalogue.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from scdrugmap.store.errors import StoreError

__all__ = ["BLOCK_ROWS", "abs_column_sums", "read_dataset", "rows_in_memory"]

#: rows read at a time when summing over a backed matrix
BLOCK_ROWS = 20_000


def read_dataset(path: str | Path, dataset_id: str, *, backed: bool = False) -> ad.AnnData:
    """Open the store's copy of a dataset.

    Parameters
    ----------
    path
        ``<store>/datasets/<id>.h5ad``.
    dataset_id
        For the error message.
    backed
        Open read-only backed (``X`` stays on disk) instead of reading it whole.

    Raises
    ------
    StoreError
        When the copy is missing.
    """
    path = Path(path)
    if not path.exists():
        msg = f"the store's copy of dataset {dataset_id!r} is missing ({path}); re-ingest it into a new store"
        raise StoreError(msg)
    return ad.read_h5ad(path, backed="r") if backed else ad.read_h5ad(path)


def rows_in_memory(adata: ad.AnnData, rows: np.ndarray) -> ad.AnnData:
    """Rows ``rows`` (ascending positions) of ``adata`` as an in-memory AnnData (a view when
    ``adata`` is in memory, so the embedders see exactly what they saw before)."""
    sub = adata[np.asarray(rows)]
    return sub.to_memory() if adata.isbacked else sub


def abs_column_sums(X: Any, *, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """Per-column sums of ``|X|`` without copying ``X``.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)``: numpy array, scipy sparse matrix, or a backed AnnData's ``X``
        (read ``block_rows`` rows at a time).

    Returns
    -------
    numpy.ndarray
        float64 ``(n_genes,)``.
    """
    n_rows, n_cols = X.shape
    if sp.issparse(X):
        return _block_sums(X, n_cols)
    out = np.zeros(n_cols, dtype=np.float64)
    for start in range(0, n_rows, block_rows):
        out += _block_sums(X[start : start + block_rows], n_cols)
    return out


def _block_sums(X: Any, n_cols: int) -> np.ndarray:
    if sp.issparse(X):
        return np.asarray(abs(X).sum(axis=0), dtype=np.float64).ravel()  # scipy: faster than bincount here
    return np.abs(np.asarray(X, dtype=np.float64)).sum(axis=0)
