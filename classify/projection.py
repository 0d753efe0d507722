"""Expression PCA and 2-D UMAP projections (scanpy) for the web page, the report and the biology views.

:func:`pca_pipeline` is the one normalise → HVG → scale → PCA recipe on an AnnData, each step a
scanpy function (the service projection and the pseudotime view use it). The ``pca``/``hvg``
embedding baselines (:mod:`embedder.baselines`) share its normalisation only: they fit HVGs,
z-scores and PCA once on a seeded subsample of backed data and apply the saved state to every shard
bit-identically, which scanpy's in-place ``scale``/``pca`` do not offer.
"""

from __future__ import annotations

import numpy as np

__all__ = ["expression_pcs", "pca_pipeline", "umap_2d"]


def pca_pipeline(
    adata,
    *,
    n_comps: int,
    seed: int = 0,
    normalise: bool = False,
    n_top_genes: int | None = None,
    scale: bool = False,
) -> int:
    """In place: [CP10k + log1p] → [highly variable genes] → [z-score] → PCA, with scanpy.

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)`` AnnData; X float32 (dense or sparse).
    n_comps
        Components wanted; at most ``min(n_cells, n_genes) - 1`` are computed.
    seed
        ``random_state`` of :func:`scanpy.pp.pca`.
    normalise
        X holds raw counts: :func:`scanpy.pp.normalize_total` to 10,000 and :func:`scanpy.pp.log1p`
        first.
    n_top_genes
        Keep only this many highly variable genes (``seurat`` flavour on log data; ``subset=True``)
        when the data has more; ``None``: all genes.
    scale
        :func:`scanpy.pp.scale` (unit variance, zero mean, clipped at 10) before the PCA.

    Returns
    -------
    int
        The number of components computed (``adata.obsm['X_pca']`` ``(n_cells, k)``).
    """
    import scanpy as sc

    if normalise:  # as embedder.baselines.normalise_log, keeping X dense or sparse
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
    if n_top_genes is not None and adata.n_vars > n_top_genes:
        adata.uns["log1p"] = {"base": None}  # natural-log data (seurat flavour reads it)
        sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat", subset=True)
    if scale:
        sc.pp.scale(adata, max_value=10)
    k = max(1, int(min(n_comps, adata.n_obs - 1, adata.n_vars - 1)))
    sc.pp.pca(adata, n_comps=k, random_state=seed)
    return k


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
    import scipy.sparse as sp

    data = X.data if sp.issparse(X) else np.asarray(X)
    adata = ad.AnnData(X=X.astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32))
    counts = bool(data.size and np.nanmin(data) >= 0 and np.allclose(data, np.round(data)))
    pca_pipeline(adata, n_comps=n_comps, seed=0, normalise=counts)
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
