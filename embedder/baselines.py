"""Baseline embedders without a checkpoint: ``pca`` and ``hvg``.

Both work in the genes shared by the selected datasets (Ensembl ids from the store's
harmonisation), normalise raw counts to CP10k + log1p (log-normalised and scaled input are
used as they are — never log-transformed again), select highly variable genes with
:func:`scanpy.pp.highly_variable_genes` (Seurat flavour) and standardise each gene (clipped
at ±10, as :func:`scanpy.pp.scale`). ``pca`` then projects on the first 50 principal
components (scikit-learn ``PCA`` with its seeded randomized solver at every size, sign fixed by
``svd_flip``: deterministic; expression stays sparse until the HVG block, so the fit's memory is
bounded by ``max_fit_cells`` × ``n_top_genes``); ``hvg`` returns the standardised HVG expression.
Fitted once per embedding run on (a seeded subsample of) the selection; the fitted state is
saved in the store so a resumed run does not refit.

Why the fit is not :func:`classify.projection.pca_pipeline` (scanpy's ``scale``/``pca``): those
work in place on one in-memory AnnData, while here the HVGs, z-scores and components are fitted
once on a bounded subsample of backed datasets, saved with the revision, and applied to every shard
with a float64 projection so that shards embedded by any executor are bit-identical
(tests/test_executor.py). Normalisation and HVG selection are scanpy's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scdrugmap.embedder.base import Embedder, register
from scdrugmap.store.errors import InputError, StoreError

__all__ = ["HVGEmbedder", "PCAEmbedder", "normalise_log"]

log = logging.getLogger(__name__)


def normalise_log(X, x_kind: str) -> sp.csr_matrix | np.ndarray:
    """CP10k + log1p for raw counts (:func:`scanpy.pp.normalize_total` with ``target_sum=1e4``,
    then :func:`scanpy.pp.log1p`); other input unchanged.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)`` dense or CSR.
    x_kind
        ``"counts"``, ``"lognorm"`` or ``"scaled"``.

    Returns
    -------
    scipy.sparse.csr_matrix or numpy.ndarray
        float32, same shape (CSR for counts). Cells without counts stay all-zero.
    """
    import scanpy as sc

    if x_kind != "counts":
        return X.astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    tmp = AnnData(X=sp.csr_matrix(X, dtype=np.float32))
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    return sp.csr_matrix(tmp.X, dtype=np.float32)


def _stack_csr(blocks: list[sp.csr_matrix], *, n_cols: int) -> sp.csr_matrix:
    """Stack CSR blocks row-wise like ``scipy.sparse.vstack``, emptying ``blocks`` as it goes, so the
    stacked matrix and the blocks are never both whole in memory.

    Parameters
    ----------
    blocks
        float32 CSR matrices with ``n_cols`` columns each (the list is emptied).

    Returns
    -------
    scipy.sparse.csr_matrix
        float32 ``(sum of rows, n_cols)``, equal to ``sp.vstack(blocks, format="csr")``.
    """
    n_rows = sum(b.shape[0] for b in blocks)
    nnz = sum(b.nnz for b in blocks)
    idx_dtype = np.int64 if max(nnz, n_cols) > np.iinfo(np.int32).max else np.int32
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=idx_dtype)
    indptr = np.zeros(n_rows + 1, dtype=np.int64 if idx_dtype is np.int64 else np.int32)
    row = pos = 0
    blocks.reverse()
    while blocks:
        b = blocks.pop()
        b.sort_indices()
        data[pos : pos + b.nnz] = b.data
        indices[pos : pos + b.nnz] = b.indices
        indptr[row + 1 : row + b.shape[0] + 1] = b.indptr[1:] + pos
        row, pos = row + b.shape[0], pos + b.nnz
        del b
    return sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols))


def _x_kind(adata: AnnData) -> str:
    return str(adata.uns.get("scdrugmap", {}).get("x_kind", "counts"))


class _HVGBase(Embedder):
    """Shared fitting for ``pca`` and ``hvg``: shared genes → normalise → HVG → standardise."""

    requires_fit = True

    def __init__(self, *, n_top_genes: int = 2000, max_fit_cells: int = 100_000, seed: int = 0) -> None:
        if n_top_genes < 2:
            msg = f"n_top_genes must be ≥ 2, got {n_top_genes}"
            raise InputError(msg)
        self.n_top_genes = int(n_top_genes)
        self.max_fit_cells = int(max_fit_cells)
        self.seed = int(seed)
        self.genes: np.ndarray | None = None  # Ensembl ids of the selected HVGs, fitted order
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    @classmethod
    def _parse(cls, checkpoint: Any, options: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
        if checkpoint is not None:
            msg = f"model {cls.name!r} has no checkpoint; drop --checkpoint"
            raise InputError(msg)
        unknown = sorted(set(options) - allowed - {"device", "batch_size", "precision"})
        if unknown:
            msg = f"unknown option(s) {unknown} for model {cls.name!r}; allowed: {sorted(allowed)}"
            raise InputError(msg)
        return {k: options[k] for k in allowed if k in options}

    def spec(self) -> dict[str, Any]:
        """Settings hashed into the revision."""
        return {
            "n_top_genes": self.n_top_genes,
            "max_fit_cells": self.max_fit_cells,
            "seed": self.seed,
            "normalise": "scanpy normalize_total(1e4) + log1p for counts; lognorm/scaled as is",
            "fit": "sparse until the HVG block",
            "hvg": "scanpy seurat",
            "scale": "z-score, clip 10",
        }

    def in_vocabulary(self, var) -> np.ndarray:
        """Genes with an Ensembl id (after fitting: the fitted HVGs)."""
        ens = var["ensembl_id"].astype(str).to_numpy()
        if self.genes is None:
            return ens != ""
        return np.isin(ens, self.genes)

    def coverage(self, adata: AnnData) -> dict[str, float]:
        """Once fitted: fraction of the fitted genes present in ``adata`` (``genes``) and
        fraction of its expression on them (``counts``); before fitting: the base rule."""
        if self.genes is None:
            return super().coverage(adata)
        ens = pd.Index(adata.var["ensembl_id"].astype(str))
        on = ens.isin(self.genes)
        from scdrugmap.embedder.reading import abs_column_sums

        col = abs_column_sums(adata.X)
        total = float(col.sum())
        return {
            "genes": float(pd.Index(self.genes).isin(ens).mean()),
            "counts": float(col[on].sum() / total) if total > 0 else 0.0,
        }

    def _on_genes(self, adata: AnnData, genes: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        """Normalised expression on ``genes`` (CSR, absent genes all-zero) and a bool mask of the
        genes the data has."""
        ens = adata.var["ensembl_id"].astype(str).to_numpy()
        pos = {g: i for i, g in enumerate(ens) if g}
        cols = np.array([pos.get(g, -1) for g in genes], dtype=np.int64)
        present = cols >= 0
        Xn = sp.csr_matrix(normalise_log(adata.X, _x_kind(adata)), dtype=np.float32)
        # a 0/1 selection matrix keeps it sparse: (n_genes_data, n_genes) with one 1 per present gene
        pick = sp.csr_matrix(
            (np.ones(int(present.sum()), np.float32), (cols[present], np.flatnonzero(present))),
            shape=(adata.n_vars, genes.size),
        )
        return sp.csr_matrix(Xn @ pick), present

    def _dense_on_genes(self, adata: AnnData, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_on_genes` as a dense float32 array."""
        X, present = self._on_genes(adata, genes)
        return X.toarray().astype(np.float32), present

    def fit(self, adatas: Sequence[AnnData]) -> None:
        """Fit shared-gene HVG selection and standardisation (and PCA) on the selection.

        Memory-bounded: ``adatas`` may be backed (the runner opens them with ``backed="r"``), and
        only the subsampled rows of one dataset at a time are read; expression stays sparse until
        the HVGs are chosen; only the ``(n_fit_cells, n_top_genes)`` HVG block is made dense (with
        ``max_fit_cells`` 100,000 and 2,000 genes: 0.8 GB).

        Raises
        ------
        InputError
            When the datasets share fewer than 2 mapped genes.
        """
        import scanpy as sc

        kinds = {_x_kind(a) for a in adatas}
        if "scaled" in kinds and len(kinds) > 1:
            log.warning(
                "%s: the selection mixes raw counts/log-normalised with scaled data (%s); "
                "their values are not comparable — consider embedding them separately",
                self.name,
                ", ".join(sorted(kinds)),
            )
        shared: set[str] | None = None
        for a in adatas:
            g = set(a.var["ensembl_id"].astype(str)) - {""}
            shared = g if shared is None else shared & g
        genes = np.array(sorted(shared or ()))
        if genes.size < 2:
            msg = f"the selected datasets share {genes.size} mapped genes; {self.name} needs at least 2"
            raise InputError(msg)
        rng = np.random.default_rng(self.seed)
        n_total = sum(a.n_obs for a in adatas)
        keep_frac = min(1.0, self.max_fit_cells / max(1, n_total))
        blocks = []
        for a in adatas:
            rows = np.arange(a.n_obs)
            if keep_frac < 1.0:
                rows = np.sort(rng.choice(a.n_obs, size=max(1, round(a.n_obs * keep_frac)), replace=False))
            sub = a[rows].to_memory() if a.isbacked else a[rows]  # one dataset's rows in memory at a time
            blocks.append(self._on_genes(sub, genes)[0])
            del sub
        X = _stack_csr(blocks, n_cols=genes.size)  # frees each block as it is copied: peak 1× not 2×
        n_top = min(self.n_top_genes, genes.size)
        if n_top < genes.size:
            hv = sc.pp.highly_variable_genes(AnnData(X=X), n_top_genes=n_top, flavor="seurat", inplace=False)
            order = np.argsort(-hv["dispersions_norm"].fillna(-np.inf).to_numpy(), kind="stable")[:n_top]
            sel = np.sort(order)
        else:
            sel = np.arange(genes.size)
        self.genes = genes[sel]
        X = X[:, sel]
        dense = np.empty(X.shape, dtype=np.float32)  # the one dense block of the fit, filled in place
        X.toarray(out=dense)
        del X
        self.mean = dense.mean(axis=0)
        std = dense.std(axis=0)
        self.std = np.where(std > 0, std, 1.0).astype(np.float32)
        self._fit_extra(self._standardise_dense(dense, inplace=True))

    def _standardise_dense(self, X: np.ndarray, *, inplace: bool = False) -> np.ndarray:
        """z-score with the fitted mean/std, clipped at ±10 (as scanpy.pp.scale); float32."""
        Z = X if inplace and X.dtype == np.float32 else X.astype(np.float32)
        Z -= self.mean
        Z /= self.std
        np.clip(Z, -10.0, 10.0, out=Z)
        return Z

    def _fit_extra(self, Z: np.ndarray) -> None:
        """Hook for subclasses (PCA)."""

    def _standardised(self, adata: AnnData) -> np.ndarray:
        if self.genes is None:
            msg = f"{self.name} embedder is not fitted; the runner fits it on the selection first"
            raise StoreError(msg)
        X, present = self._dense_on_genes(adata, self.genes)
        Z = self._standardise_dense(X)
        Z[:, ~present] = 0.0  # a gene the data lacks sits at the fitted mean (z = 0); see coverage()
        return Z

    def get_state(self) -> dict[str, np.ndarray]:
        """Fitted arrays (genes as unicode, no pickles)."""
        return {"genes": self.genes.astype(str), "mean": self.mean, "std": self.std}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore fitted arrays."""
        self.genes = np.asarray(state["genes"]).astype(str)
        self.mean = np.asarray(state["mean"], dtype=np.float32)
        self.std = np.asarray(state["std"], dtype=np.float32)


@register
class HVGEmbedder(_HVGBase):
    """Standardised expression of the highly variable genes shared by the selection.

    Output ``(n_cells, n_top_genes)`` (fewer when fewer genes are shared).
    """

    name = "hvg"

    @classmethod
    def load(cls, checkpoint=None, **options: Any) -> HVGEmbedder:
        """Options: ``n_top_genes`` (2000), ``max_fit_cells`` (100,000), ``seed`` (0)."""
        return cls(**cls._parse(checkpoint, options, {"n_top_genes", "max_fit_cells", "seed"}))

    @property
    def dim(self) -> int:
        """Number of HVGs (known after fitting)."""
        return int(self.genes.size) if self.genes is not None else self.n_top_genes

    def embed(self, adata: AnnData) -> np.ndarray:
        """float32 ``(n_cells, dim)`` standardised HVG expression."""
        return self._standardised(adata)


@register
class PCAEmbedder(_HVGBase):
    """CP10k + log1p → 2,000 HVGs → z-score → 50 principal components.

    Output ``(n_cells, n_comps)`` with ``n_comps = min(50, n_genes, n_fit_cells - 1)``.
    """

    name = "pca"

    def __init__(self, *, n_comps: int = 50, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n_comps < 1:
            msg = f"n_comps must be ≥ 1, got {n_comps}"
            raise InputError(msg)
        self.n_comps = int(n_comps)
        self.components: np.ndarray | None = None

    @classmethod
    def load(cls, checkpoint=None, **options: Any) -> PCAEmbedder:
        """Options: ``n_comps`` (50), ``n_top_genes`` (2000), ``max_fit_cells``, ``seed``."""
        return cls(**cls._parse(checkpoint, options, {"n_comps", "n_top_genes", "max_fit_cells", "seed"}))

    @property
    def dim(self) -> int:
        """Number of principal components (known after fitting)."""
        return int(self.components.shape[0]) if self.components is not None else self.n_comps

    def spec(self) -> dict[str, Any]:
        """Settings hashed into the revision."""
        return {
            **super().spec(),
            "n_comps": self.n_comps,
            "pca": "sklearn PCA, seeded",
            "solver": "randomized (full when n_comps = min(cells, genes))",
        }

    def _fit_extra(self, Z: np.ndarray) -> None:
        from sklearn.decomposition import PCA

        k = min(self.n_comps, Z.shape[1], max(1, Z.shape[0] - 1))
        # a seeded randomised solver at every size: deterministic, and far cheaper than a full SVD of
        # cells × 2,000 genes (63 % of `embed pca` at 15 k cells with the full solver)
        solver = "randomized" if k < min(Z.shape) else "full"
        pca = PCA(n_components=k, svd_solver=solver, random_state=self.seed, copy=False).fit(Z)  # Z is ours
        self.components = pca.components_.astype(np.float32)
        self.pca_mean = pca.mean_.astype(np.float32)

    def get_state(self) -> dict[str, np.ndarray]:
        """Fitted arrays incl. PCA components."""
        return {**super().get_state(), "components": self.components, "pca_mean": self.pca_mean}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore fitted arrays."""
        super().set_state(state)
        self.components = np.asarray(state["components"], dtype=np.float32)
        self.pca_mean = np.asarray(state["pca_mean"], dtype=np.float32)

    def embed(self, adata: AnnData) -> np.ndarray:
        """float32 ``(n_cells, n_comps)`` PCA scores."""
        Z = self._standardised(adata)
        # float64 product: the float32 result does not depend on the BLAS thread count, so shards
        # embedded by workers with other thread settings give the same array (embedder.executor)
        centred = (Z - self.pca_mean).astype(np.float64)
        return (centred @ self.components.T.astype(np.float64)).astype(np.float32)
