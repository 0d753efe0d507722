"""Diffusion pseudotime toward resistance (scanpy DPT) on one dataset.

Pipeline on the analysed expression (see :mod:`classify.analyze.data`; scaled input is used as
given): 2,000 highly variable genes (counts/log-normalised; ``seurat`` flavour) → z-score (clipped
at 10; skipped for scaled input) → PCA (30) → kNN graph (15) → diffusion map → DPT.

Root: ``root_cell`` when given; else, among the first ``n_dcs`` non-trivial diffusion components,
the one most correlated (Spearman) with the label is oriented so that sensitive cells lie at its
low end, and the root is the sensitive cell nearest the 2 % quantile of sensitive cells along it
(robust to outlier cells at the very end); with one class only (e.g. a treated, all-resistant
sample) the cell nearest the 2 % quantile of DC1, noted in ``root_rule``. Reported: Spearman correlation of pseudotime with the label (resistant = 1) and its
AUROC for resistant cells; with ``run_id``, the Spearman correlation with the run's predicted
probability of resistance. Per-cell values are written to
``<store>/analysis/pseudotime/<pt_id>.parquet``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from scdrugmap.classify.analyze.data import load_expression, predicted_labels
from scdrugmap.classify.analyze.plots import LABEL_COLOURS, safe_stem, save_figure
from scdrugmap.classify.analyze.tables import analysis_dir, make_id, now, replace_rows
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError

__all__ = ["PseudotimeOutcome", "PseudotimeSpec", "run_pseudotime"]

ROOT_QUANTILE = 0.02  # root = cell nearest this quantile of the oriented component (not the extreme outlier)


@dataclass(frozen=True)
class PseudotimeSpec:
    """Settings of the DPT pipeline."""

    n_top_genes: int = 2000
    n_pcs: int = 30
    n_neighbors: int = 15
    n_dcs: int = 10
    max_cells: int = 20_000
    seed: int = 0


@dataclass(frozen=True)
class PseudotimeOutcome:
    """Summary statistics, per-cell table and figure paths."""

    pt_id: str
    summary: dict
    cells: pd.DataFrame
    figures: tuple[Path, ...]


def _embed(adata, spec: PseudotimeSpec) -> None:
    import scanpy as sc

    from scdrugmap.classify.projection import pca_pipeline

    kind = adata.uns["x_kind"]  # X is already the analysis view (log1p CP10k for counts)
    n_pcs = pca_pipeline(
        adata, n_comps=spec.n_pcs, seed=spec.seed,
        n_top_genes=spec.n_top_genes if kind in ("counts", "lognorm") else None, scale=kind != "scaled",
    )  # fmt: skip
    sc.pp.neighbors(adata, n_neighbors=int(min(spec.n_neighbors, adata.n_obs - 1)), n_pcs=n_pcs,
                    random_state=spec.seed)  # fmt: skip
    sc.tl.diffmap(adata, n_comps=int(min(spec.n_dcs + 1, adata.n_obs - 2)))


def _near_quantile(values: np.ndarray, cand: np.ndarray, q: float) -> int:
    """The candidate whose value is nearest the ``q`` quantile of the candidates (robust to outliers)."""
    target = np.quantile(values[cand], q)
    return int(cand[np.argmin(np.abs(values[cand] - target))])


def _root(adata, root_cell: str | None) -> tuple[int, str]:
    dcs = adata.obsm["X_diffmap"][:, 1:]
    lab = adata.obs["label"].to_numpy()
    if root_cell is not None:
        if root_cell not in adata.obs_names:
            msg = f"--root-cell {root_cell!r} is not a cell of the dataset"
            raise InputError(msg)
        return int(adata.obs_names.get_loc(root_cell)), "given"
    sens, res = lab == "sensitive", lab == "resistant"
    if sens.any() and res.any():
        y = res[sens | res].astype(float)
        corr = [abs(stats.spearmanr(dcs[sens | res, j], y).statistic) for j in range(dcs.shape[1])]
        j = int(np.nanargmax(corr))
        sign = 1.0 if dcs[sens, j].mean() <= dcs[res, j].mean() else -1.0
        root = _near_quantile(sign * dcs[:, j], np.flatnonzero(sens), ROOT_QUANTILE)
        return (
            root,
            f"sensitive cell at the sensitive end of DC{j + 1} (the component most correlated with the label)",
        )
    cand = np.flatnonzero(sens) if sens.any() else np.arange(len(lab))
    who = "sensitive cell" if sens.any() else "no resistant/sensitive contrast: cell"
    return _near_quantile(dcs[:, 0], cand, ROOT_QUANTILE), f"{who} at the low end of DC1"


def run_pseudotime(
    store: Store,
    dataset_id: str,
    *,
    run_id: str | None = None,
    root_cell: str | None = None,
    spec: PseudotimeSpec | None = None,
    figures_dir: Path | None = None,
) -> PseudotimeOutcome:
    """Diffusion pseudotime of a dataset rooted in sensitive cells; store, correlate and plot.

    Parameters
    ----------
    store
        The store.
    dataset_id
        Dataset with expression (unlabelled cells are kept).
    run_id
        Optional evaluation/prediction run whose probabilities are correlated with pseudotime.
    root_cell
        obs name of the root cell (default: see module docstring).
    spec
        Pipeline settings.
    figures_dir
        Report folder (default ``<store>/analysis/figures``).

    Returns
    -------
    PseudotimeOutcome

    Raises
    ------
    InputError
        Fewer than 20 cells, or a bad root cell / run.
    """
    import scanpy as sc

    spec = spec or PseudotimeSpec()
    adata = load_expression(store, dataset_id, labelled_only=False)
    if adata.n_obs < 20:
        msg = f"dataset {dataset_id!r} has {adata.n_obs} cells; pseudotime needs at least 20"
        raise InputError(msg)
    if adata.n_obs > spec.max_cells:
        keep = np.sort(np.random.default_rng(spec.seed).choice(adata.n_obs, spec.max_cells, replace=False))
        adata = adata[keep].copy()
    _embed(adata, spec)
    root, rule = _root(adata, root_cell)
    adata.uns["iroot"] = root
    sc.tl.dpt(adata, n_dcs=int(min(spec.n_dcs, adata.obsm["X_diffmap"].shape[1] - 1)))
    pt = adata.obs["dpt_pseudotime"].to_numpy(dtype=float)
    pt[~np.isfinite(pt)] = np.nan
    cells = pd.DataFrame({
        "cell_uid": adata.obs["cell_uid"].to_numpy(), "obs_name": adata.obs_names.astype(str),
        "label": adata.obs["label"].to_numpy(dtype=object), "pseudotime": pt,
        "dc1": adata.obsm["X_diffmap"][:, 1], "dc2": adata.obsm["X_diffmap"][:, 2],
    })  # fmt: skip
    summary: dict = {"n_cells": len(cells), "root_obs_name": str(adata.obs_names[root]), "root_rule": rule,
                     "spearman_label": None, "auroc_label": None, "spearman_probability": None}  # fmt: skip
    lab = cells.dropna(subset=["label", "pseudotime"])
    y = (lab["label"] == "resistant").to_numpy().astype(float)
    if np.unique(y).size == 2:
        from sklearn.metrics import roc_auc_score

        summary["spearman_label"] = float(stats.spearmanr(lab["pseudotime"], y).statistic)
        summary["auroc_label"] = float(roc_auc_score(y, lab["pseudotime"]))
    if run_id is not None:
        pred = predicted_labels(store, run_id).set_index("cell_uid")["p_resistant"]
        cells["p_resistant"] = cells["cell_uid"].map(pred)
        both = cells.dropna(subset=["p_resistant", "pseudotime"])
        if len(both) < 3:
            msg = f"run {run_id} has predictions for {len(both)} cells of {dataset_id!r}; need ≥ 3"
            raise InputError(msg)
        summary["spearman_probability"] = float(
            stats.spearmanr(both["pseudotime"], both["p_resistant"]).statistic
        )
    ident = {"dataset": dataset_id, "run": run_id, "root_cell": root_cell, "spec": asdict(spec)}
    pt_id = make_id("pt", ident)
    path = analysis_dir(store, "pseudotime") / f"{pt_id}.parquet"
    cells.to_parquet(path, index=False)
    row = pd.DataFrame([{"pt_id": pt_id, "dataset_id": dataset_id, "run_id": run_id, **summary,
                         "cells_path": str(path.relative_to(store.path)), "spec": json.dumps(ident),
                         "created_at": now()}])  # fmt: skip
    replace_rows(store, [("pseudotime_runs", row)], key={"pt_id": pt_id})
    fig = _figure(cells, dataset_id, summary)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    caption = (
        f"Diffusion pseudotime of {dataset_id} ({len(cells)} cells; root: {rule}): diffusion map coloured by "
        f"pseudotime and label, pseudotime by label; Spearman with label {fmt(summary['spearman_label'])}, "
        f"AUROC {fmt(summary['auroc_label'])}, Spearman with predicted P(resistant) "
        f"{fmt(summary['spearman_probability'])}; {pt_id}."
    )
    paths = save_figure(
        fig, figures_dir or analysis_dir(store, "figures"), safe_stem("pseudotime", dataset_id), caption
    )
    return PseudotimeOutcome(pt_id, summary, cells, tuple(paths))


def _figure(cells: pd.DataFrame, dataset_id: str, summary: dict):
    has_p = "p_resistant" in cells
    fig, axes = plt.subplots(1, 3 + has_p, figsize=(4.2 * (3 + has_p), 3.8))
    sc0 = axes[0].scatter(
        cells["dc1"], cells["dc2"], c=cells["pseudotime"], s=4, cmap="viridis", linewidths=0
    )
    fig.colorbar(sc0, ax=axes[0], shrink=0.8)
    axes[0].set_title("pseudotime", fontsize=9)
    labels = cells["label"].fillna("unlabelled").astype(str)
    for lab in sorted(set(labels)):
        m = (labels == lab).to_numpy()
        axes[1].scatter(cells.loc[m, "dc1"], cells.loc[m, "dc2"], s=4, label=lab, linewidths=0,
                        color=LABEL_COLOURS.get(lab, "#999999"))  # fmt: skip
        vals = cells.loc[m, "pseudotime"].dropna()
        if len(vals):
            axes[2].hist(vals, bins=30, alpha=0.6, label=lab, color=LABEL_COLOURS.get(lab, "#999999"))
    axes[1].legend(fontsize=7, markerscale=2)
    axes[1].set_title("label", fontsize=9)
    for ax in axes[:2]:
        ax.set_xlabel("DC1")
        ax.set_ylabel("DC2")
    axes[2].set_xlabel("pseudotime")
    axes[2].legend(fontsize=7)
    axes[2].set_title("pseudotime by label", fontsize=9)
    if has_p:
        axes[3].scatter(cells["pseudotime"], cells["p_resistant"], s=4, linewidths=0)
        axes[3].set_xlabel("pseudotime")
        axes[3].set_ylabel("predicted P(resistant)")
    fig.suptitle(f"{dataset_id}: diffusion pseudotime ({summary['root_rule']})", fontsize=10)
    fig.tight_layout()
    return fig
