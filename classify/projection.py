"""2-D UMAP projections (scanpy: PCA → kNN graph → UMAP) for the web page and the report."""

from __future__ import annotations

import numpy as np

__all__ = ["expression_pcs", "umap_2d"]


def expression_pcs(X, *, n_comps: int = 30) -> np.ndarray:
    """Principal components of an expression matrix, normalised as scanpy does for counts.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)`` dense or sparse. Non-negative integers are treated as raw counts
        (library size → 10,000, ``log1p``); anything else (log-normalised, scaled) is used as is.
    n_comps
        Components kept (at most ``min(n_cells, n_genes) - 1``).

    Returns
    -------
    numpy.ndarray
        float32 ``(n_cells, k)``.
    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    data = X.data if sp.issparse(X) else np.asarray(X)
    adata = ad.AnnData(X=X.astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32))
    if data.size and np.nanmin(data) >= 0 and np.allclose(data, np.round(data)):
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
    k = max(1, min(n_comps, min(adata.shape) - 1))
    sc.pp.pca(adata, n_comps=k, random_state=0)
    return adata.obsm["X_pca"].astype(np.float32)


def umap_2d(X: np.ndarray, *, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """UMAP coordinates of the rows of ``X`` (an embedding or PCs).

    Parameters
    ----------
    X
        ``(n, d)`` float; rows with NaN must be removed first.
    seed
        Random state of the layout.
    n_neighbors
        kNN graph size (capped at ``n - 1``).

    Returns
    -------
    numpy.ndarray
        float32 ``(n, 2)``; fewer than 3 rows get a trivial layout.
    """
    import anndata as ad
    import scanpy as sc

    X = np.asarray(X, dtype=np.float32)
    n = X.shape[0]
    if n < 3:
        return np.column_stack([np.arange(n), np.zeros(n)]).astype(np.float32)
    adata = ad.AnnData(X=X)
    # exact kNN from scikit-learn (a csr_matrix): scanpy's pynndescent path (used above 8,192 cells)
    # fails with pynndescent ≥ 0.7, whose csr_array lacks the getnnz scanpy 1.11 calls
    k = max(2, min(n_neighbors, n - 1))
    sc.pp.neighbors(adata, n_neighbors=k, use_rep="X", random_state=seed, transformer="sklearn")
    sc.tl.umap(adata, random_state=seed)
    return adata.obsm["X_umap"].astype(np.float32)
