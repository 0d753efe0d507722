"""The figures of ``scdrugmap report``, drawn from catalog data (matplotlib, no display needed).

Fold bars (mean per model/head and category value, with the per-fold points), radar charts over
a category's values, ROC and precision-recall curves of runs (pooled out-of-fold predictions)
and a UMAP of a model's embeddings coloured by label and by dataset. Each returns a matplotlib
``Figure`` (or None when there is nothing to draw); :func:`save_figure` writes PNG + SVG.
:mod:`classify.report` lays them out with the index page and the scalability tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from scdrugmap.classify import queries
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError, StoreError

__all__ = ["METRIC_NAMES", "PALETTE", "embedding_umap", "fold_bars", "radar", "roc_pr_curves", "save_figure"]

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf"]  # fmt: skip
_RC = {"svg.fonttype": "none", "svg.hashsalt": "scdrugmap", "font.size": 9}
METRIC_NAMES = {"f1": "F1", "auroc": "AUROC", "auprc": "AUPRC", "accuracy": "Accuracy", "mcc": "MCC",
                 "balanced_accuracy": "Balanced accuracy", "precision": "Precision", "recall": "Recall"}  # fmt: skip


def save_figure(fig, out: Path, stem: str) -> None:
    """Write ``out/<stem>.png`` (130 dpi) and ``out/<stem>.svg`` with reproducible SVG ids."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig.savefig(out / f"{stem}.png", dpi=130, bbox_inches="tight")
        fig.savefig(out / f"{stem}.svg", bbox_inches="tight")


def fold_bars(folds: pd.DataFrame, metrics: Sequence[str], title: str):
    """One panel per metric: a bar per (run label, category value) at the fold mean, fold scores as points.

    ``folds`` has columns ``label, value, metric, score`` (one row per fold). Returns a ``Figure``.
    """
    from matplotlib.figure import Figure

    values = sorted(folds["value"].unique())
    labels = sorted(folds["label"].unique())
    fig = Figure(figsize=(max(6.0, 1.6 * len(values) * max(1, len(labels)) ** 0.5), 3.2 * len(metrics)))
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(labels))
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes, metrics, strict=True):
        sub = folds[folds["metric"] == metric]
        for j, label in enumerate(labels):
            color = PALETTE[j % len(PALETTE)]
            for i, value in enumerate(values):
                pts = sub[(sub["label"] == label) & (sub["value"] == value)]["score"].dropna().to_numpy()
                if not pts.size:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                ax.bar(x, pts.mean(), width * 0.9, color=color, alpha=0.55, label=label if i == 0 else None)
                ax.scatter(x + rng.uniform(-0.25, 0.25, pts.size) * width, pts, s=9, color=color,
                           edgecolors="black", linewidths=0.4, zorder=3)  # fmt: skip
        ax.set_xticks(range(len(values)), [v if len(v) < 30 else v[:29] + "…" for v in values], rotation=15)
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.set_ylim(-1.05 if metric == "mcc" else 0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(title)
    axes[0].legend(fontsize=7, ncol=min(4, len(labels)), loc="lower right")
    fig.tight_layout()
    return fig


def radar(summary: pd.DataFrame, metrics: Sequence[str], title: str):
    """One polar panel per metric over the category values; ``summary``: ``label, value, metric, mean``.

    Means are clipped to [0, 1] (NaN drawn as 0). Returns a ``Figure``.
    """
    from matplotlib.figure import Figure

    values = sorted(summary["value"].unique())
    labels = sorted(summary["label"].unique())
    angles = np.linspace(0, 2 * np.pi, len(values), endpoint=False)
    fig = Figure(figsize=(4.6 * len(metrics), 4.8))
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1, projection="polar")
        sub = summary[summary["metric"] == metric]
        for j, label in enumerate(labels):
            means = (
                sub[sub["label"] == label].set_index("value")["mean"].reindex(values).to_numpy(dtype=float)
            )
            r = np.clip(np.nan_to_num(means, nan=0.0), 0, 1)
            color = PALETTE[j % len(PALETTE)]
            ax.plot(np.append(angles, angles[:1]), np.append(r, r[:1]), color=color, lw=1.6, label=label)
            ax.fill(np.append(angles, angles[:1]), np.append(r, r[:1]), color=color, alpha=0.1)
        ax.set_xticks(angles, [v if len(v) < 22 else v[:21] + "…" for v in values], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(METRIC_NAMES.get(metric, metric), pad=14)
    fig.suptitle(title)
    fig.axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(-0.25, 1.15))
    fig.tight_layout()
    return fig


def roc_pr_curves(store: Store, runs: pd.DataFrame, title: str):
    """ROC and precision-recall curves of ``runs`` (``run_id, value, label``) from their predictions.

    Runs without predictions or with one class only are skipped; returns None when none is left.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.4))
    roc_ax, pr_ax = fig.subplots(1, 2)
    drawn = 0
    for k, (_, run) in enumerate(runs.iterrows()):
        try:
            c = queries.run_curves(store, run["run_id"], max_points=400)
        except (InputError, StoreError):  # a run without predictions, or with one class only
            continue
        color = PALETTE[k % len(PALETTE)]
        name = f"{run['value']} · {run['label']}"
        roc_ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], color=color, lw=1.4, label=f"{name} ({c['auroc']:.2f})")
        pr_ax.plot(c["pr"]["recall"], c["pr"]["precision"], color=color, lw=1.4,
                   label=f"{name} ({c['average_precision']:.2f})")  # fmt: skip
        drawn += 1
    if not drawn:
        return None
    roc_ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    roc_ax.set(
        xlabel="False positive rate",
        ylabel="True positive rate",
        title="ROC (AUROC)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    pr_ax.set(xlabel="Recall", ylabel="Precision", title="Precision-recall (AP)", xlim=(0, 1), ylim=(0, 1.02))
    for ax in (roc_ax, pr_ax):
        ax.legend(fontsize=6, loc="lower right" if ax is roc_ax else "lower left")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def embedding_umap(store: Store, model: str, revision: str, *, max_cells: int, seed: int):
    """UMAP of a revision's embedded cells (seeded subsample of ``max_cells``) by label and by dataset.

    Returns None when fewer than 3 cells are embedded.
    """
    from matplotlib.figure import Figure

    from scdrugmap.classify.projection import umap_2d
    from scdrugmap.store.embeddings import read_embedding

    cells = store.query(
        "SELECT c.cell_uid, c.dataset_id, c.label FROM embedded_cells e JOIN cells c USING (cell_uid) "
        "WHERE e.revision = ? ORDER BY c.cell_uid",
        [revision],
    )
    if len(cells) < 3:
        return None
    if len(cells) > max_cells:
        cells = cells.iloc[np.sort(np.random.default_rng(seed).choice(len(cells), max_cells, replace=False))]
    X = read_embedding(store, model, revision, cells["cell_uid"].to_numpy())
    ok = np.isfinite(X).all(axis=1)
    cells, X = cells[ok], X[ok]
    xy = umap_2d(X, seed=seed)
    fig = Figure(figsize=(11, 4.6))
    ax_label, ax_ds = fig.subplots(1, 2)
    label = cells["label"].fillna("unlabelled").to_numpy()
    for name, color in (("sensitive", "#2a9d8f"), ("resistant", "#e76f51"), ("unlabelled", "#9ca3af")):
        m = label == name
        if m.any():
            ax_label.scatter(
                xy[m, 0], xy[m, 1], s=4, color=color, label=f"{name} ({m.sum()})", rasterized=True
            )
    datasets = sorted(cells["dataset_id"].unique())
    ds = cells["dataset_id"].to_numpy()
    for j, d in enumerate(datasets):
        m = ds == d
        ax_ds.scatter(xy[m, 0], xy[m, 1], s=4, color=PALETTE[j % len(PALETTE)], label=d, rasterized=True)
    for ax, what in ((ax_label, "label"), (ax_ds, "dataset")):
        ax.set(xticks=[], yticks=[], xlabel="UMAP 1", ylabel="UMAP 2", title=f"{model} embedding by {what}")
        ax.legend(fontsize=6, markerscale=2, loc="best", ncol=1 if what == "label" else 2)
    fig.suptitle(f"{model} (revision {revision[:10]}; {len(cells)} cells)")
    fig.tight_layout()
    return fig
