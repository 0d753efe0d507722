"""The report's honest-evaluation parts: results beside their baselines, and the leakage figure.

:func:`baseline_table` is one row per run with each metric next to its constant-classifier baseline
and the degenerate flag (:func:`classify.summary.summarise`); :func:`leakage_figure` draws the latest
stored leakage reports (table ``leakage``): each grouping's AUROC, AUPRC and F1 per category value.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from scdrugmap.store.catalog import Store

__all__ = ["baseline_table", "leakage_figure"]

_ORDER = ("cell", "sample", "patient", "study")


def baseline_table(store: Store) -> pd.DataFrame:
    """One row per complete run: metrics, their baselines, folds counted and flags.

    Returns
    -------
    pandas.DataFrame
        ``run_id, model, head, protocol, value, positive, prevalence, f1, f1_baseline, auroc, auprc,
        auprc_baseline, balanced_accuracy, mcc, folds, flag`` (empty without runs).
    """
    from scdrugmap.classify.summary import summarise

    df = summarise(store, where="status = 'complete' AND strategy <> 'predict'")
    if df.empty:
        return pd.DataFrame()
    rows = []
    for run_id, g in df.groupby("run_id", sort=False):
        m = g.set_index("metric")
        r = g.iloc[0]

        def get(metric: str, col: str = "mean", m: pd.DataFrame = m) -> Any:
            return m.loc[metric, col] if metric in m.index else None

        one = int(r["n_one_class_folds"])
        rows.append({
            "run_id": run_id, "model": r["model"], "head": r["head"], "protocol": r["protocol"], "value": r["value"],
            "positive": r["positive_class"], "prevalence": get("f1", "prevalence"), "f1": get("f1"),
            "f1_baseline": get("f1", "baseline"), "auroc": get("auroc"), "auprc": get("auprc"),
            "auprc_baseline": get("auprc", "baseline"), "balanced_accuracy": get("balanced_accuracy"),
            "mcc": get("mcc"), "folds": f"{int(get('auroc', 'n_folds') or 0)}/{int(r['n_folds_total'])}",
            "flag": "degenerate" if r["degenerate"] else (f"{one} fold(s) one class" if one else ""),
        })  # fmt: skip
    return pd.DataFrame(rows)


def leakage_figure(store: Store) -> Any:
    """Grouped bars of AUROC / AUPRC / F1 per grouping for each stored leakage report (None if none)."""
    import matplotlib.pyplot as plt

    tables = set(store.query("SELECT table_name FROM information_schema.tables")["table_name"])
    if "leakage" not in tables:
        return None
    df = store.query(
        "SELECT * FROM leakage WHERE metric IN ('auroc', 'auprc', 'f1') "
        "QUALIFY created_at = MAX(created_at) OVER (PARTITION BY report_id) ORDER BY model, head, value"
    )
    if df.empty:
        return None
    reports = df.drop_duplicates("report_id")
    fig, axes = plt.subplots(1, len(reports), figsize=(4.2 * len(reports), 3.4), squeeze=False, sharey=True)
    for ax, (_, rep) in zip(axes[0], reports.iterrows(), strict=True):
        sub = df[df["report_id"] == rep["report_id"]]
        for j, metric in enumerate(("auroc", "auprc", "f1")):
            part = sub[sub["metric"] == metric].set_index("grouping").reindex(list(_ORDER))
            xs = [i + (j - 1) * 0.27 for i in range(len(_ORDER))]
            ax.bar(xs, part["mean"].fillna(0), width=0.27, label=metric.upper() if metric != "f1" else "F1")
        ax.set_xticks(range(len(_ORDER)), _ORDER)
        ax.set_title(
            f"{rep['model']}/{rep['head']} · {rep['value']}\n(strictest: {rep['reference']})", fontsize=9
        )
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="#999", lw=0.8, ls="--")
    axes[0][0].set_ylabel("mean over folds")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Leakage: the same cells split by cell, sample, patient and study", fontsize=10)
    fig.tight_layout()
    return fig
