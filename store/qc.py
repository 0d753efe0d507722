"""Expression-matrix checks and cell QC at ingest.

QC follows the scDrugMap paper (Methods, "Data preprocessing"): with raw counts, keep cells
with more than 500 detected genes and less than 10 % mitochondrial counts (both thresholds
are options). Non-count input (log-normalised or z-scored) is detected and QC that needs
counts is skipped with a warning. QC metrics are computed with
:func:`scanpy.pp.calculate_qc_metrics`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from scdrugmap.store.errors import InputError

__all__ = ["QCResult", "XKind", "check_finite", "detect_x_kind", "expression_matrix", "qc_reasons", "run_qc"]

log = logging.getLogger(__name__)

XKind = Literal["counts", "lognorm", "scaled"]


def _values(X) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def expression_matrix(adata, layer: str | None, *, name: str):
    """``adata.layers[layer]`` (or ``X``), refusing an absent layer or an absent ``X`` with one line.

    Raises
    ------
    InputError
        The layer is not in the file, or the file has no ``X`` (say which layers it has).
    """
    layers = list(adata.layers.keys())
    if layer:
        if layer not in adata.layers:
            msg = f"{name}: --layer {layer!r} not found; layers: {layers or 'none'}"
            raise InputError(msg)
        return adata.layers[layer]
    if adata.X is None:
        hint = (
            f"choose one of its layers with --layer (e.g. --layer {layers[0]})"
            if layers
            else "it holds no layers"
        )
        msg = f"{name}: the file has no X matrix; {hint}"
        raise InputError(msg)
    return adata.X


def check_finite(X, *, name: str) -> None:
    """Raise when ``X`` holds NaN or ±inf.

    Raises
    ------
    InputError
        Naming the file and the number of bad entries.
    """
    vals = _values(X)
    bad = ~np.isfinite(vals)
    if bad.any():
        msg = (
            f"{name}: X has {int(bad.sum())} NaN/inf values; fix or drop those cells/genes "
            "(e.g. adata.X = np.nan_to_num(adata.X)) before ingesting"
        )
        raise InputError(msg)


def detect_x_kind(X, *, declared: Literal["auto", "counts", "lognorm", "scaled"], name: str) -> XKind:
    """Decide whether ``X`` holds raw counts, log-normalised or scaled values.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)`` dense or sparse.
    declared
        ``"auto"`` to detect (negative values → scaled; all non-negative integers → counts;
        otherwise lognorm), or the user's declaration, which is checked.
    name
        File name for messages.

    Raises
    ------
    InputError
        When counts are declared but ``X`` has negative or non-integer values.
    """
    vals = _values(X)
    has_neg = bool(vals.size and vals.min() < 0)
    is_int = bool(np.all(np.equal(np.mod(vals, 1), 0))) if vals.size else True
    if declared == "counts":
        if has_neg:
            msg = (
                f"{name}: declared as raw counts but X has negative values (min {vals.min():.3g}); "
                "it looks scaled/z-scored — use --input-type scaled (or auto), or give the raw counts layer with --layer"
            )
            raise InputError(msg)
        if not is_int:
            msg = (
                f"{name}: declared as raw counts but X has non-integer values; "
                "use --input-type lognorm (or auto), or give the raw counts layer with --layer"
            )
            raise InputError(msg)
        return "counts"
    if declared != "auto":
        return declared
    if has_neg:
        return "scaled"
    return "counts" if is_int else "lognorm"


@dataclass(frozen=True)
class QCResult:
    """Per-cell QC metrics and the keep mask.

    Attributes
    ----------
    keep
        bool ``(n_cells,)``.
    n_counts, n_genes, pct_mito
        ``(n_cells,)``; ``n_counts`` and ``pct_mito`` are NaN for non-count input.
    applied
        True when the count-based filters ran.
    """

    keep: np.ndarray
    n_counts: np.ndarray
    n_genes: np.ndarray
    pct_mito: np.ndarray
    applied: bool


def run_qc(
    adata: AnnData,
    *,
    x_kind: XKind,
    mito: np.ndarray,
    min_genes: int = 500,
    max_pct_mito: float = 10.0,
    name: str,
) -> QCResult:
    """Compute QC metrics and (for counts) the paper's filter.

    Parameters
    ----------
    adata
        Cells × genes.
    x_kind
        From :func:`detect_x_kind`.
    mito
        bool ``(n_genes,)``: mitochondrial genes (HGNC symbol starting with ``MT-``).
    min_genes
        Keep cells with strictly more detected genes than this.
    max_pct_mito
        Keep cells with strictly less mitochondrial percentage than this.
    name
        File name for messages.

    Raises
    ------
    InputError
        When no cell passes QC (the message gives the thresholds and how to change them).
    """
    import scanpy as sc

    n = adata.n_obs
    if x_kind != "counts":
        X = adata.X
        n_genes = np.asarray((X != 0).sum(axis=1)).ravel().astype(np.int64)
        log.warning("%s: X is %s, not raw counts: QC filters that need counts are skipped", name, x_kind)
        nan = np.full(n, np.nan)
        return QCResult(np.ones(n, dtype=bool), nan, n_genes, nan, applied=False)
    tmp = AnnData(X=adata.X)
    tmp.var["mt"] = np.asarray(mito, dtype=bool)
    metrics, _ = sc.pp.calculate_qc_metrics(tmp, qc_vars=["mt"], percent_top=None, log1p=False, inplace=False)
    n_counts = metrics["total_counts"].to_numpy(dtype=float)
    n_genes = metrics["n_genes_by_counts"].to_numpy(dtype=np.int64)
    pct = metrics["pct_counts_mt"].to_numpy(dtype=float)
    keep = qc_reasons(n_genes, pct, min_genes=min_genes, max_pct_mito=max_pct_mito) == ""
    if not keep.any():
        msg = (
            f"{name}: no cell passes QC (> {min_genes} detected genes and < {max_pct_mito} % mitochondrial "
            f"counts; max detected genes is {int(n_genes.max()) if n else 0}); lower --min-genes / raise --max-pct-mito"
        )
        raise InputError(msg)
    return QCResult(keep, n_counts, n_genes, pct, applied=True)


def qc_reasons(
    n_genes: np.ndarray, pct_mito: np.ndarray, *, min_genes: int = 500, max_pct_mito: float = 10.0
) -> np.ndarray:
    """Why each cell fails the count QC of :func:`run_qc` (``""`` = passes).

    Parameters
    ----------
    n_genes, pct_mito
        ``(n_cells,)`` detected genes and mitochondrial percentage (NaN percentage = no counts: passes
        the mitochondrial filter).
    min_genes, max_pct_mito
        The thresholds (keep > ``min_genes`` genes and < ``max_pct_mito`` %).

    Returns
    -------
    numpy.ndarray
        object ``(n_cells,)``: ``""`` or e.g. ``"120 detected genes (≤ 500)"``, ``"12.5 % mitochondrial (≥ 10)"``,
        joined by ``"; "`` when both fail.
    """
    n_genes = np.asarray(n_genes)
    pct = np.nan_to_num(np.asarray(pct_mito, dtype=float), nan=0.0)
    few = n_genes <= min_genes
    mito = pct >= max_pct_mito
    out = np.full(n_genes.shape, "", dtype=object)
    for i in np.flatnonzero(few | mito):
        parts = [f"{int(n_genes[i])} detected genes (≤ {min_genes})"] if few[i] else []
        if mito[i]:
            parts.append(f"{pct[i]:.1f} % mitochondrial (≥ {max_pct_mito:g})")
        out[i] = "; ".join(parts)
    return out
