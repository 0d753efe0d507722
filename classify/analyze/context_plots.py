"""Figures of the cell context views: CCC dot/heat plot and resistant/sensitive cells per cell type.

:func:`ccc_figure` draws a stored CCC run as scDrugAtlas and liana do: a heat map of the number of
specific interactions (specificity ≤ ``alpha``) per sender → receiver group, and a dot plot of the
strongest specific interactions (dot size = -log10 specificity, colour = magnitude).
:func:`proportions_figure` is scDrugAtlas Fig. 3g: per cell type, the resistant and sensitive share
of its labelled cells. :func:`report_figures` draws both for the report (latest run per dataset and grouping).
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from scdrugmap.classify.analyze.plots import LABEL_COLOURS, safe_stem
from scdrugmap.store.catalog import Store

__all__ = ["ccc_figure", "proportions_figure", "report_figures", "run_figure", "top_interactions"]


def top_interactions(
    table: pd.DataFrame, *, larger_is_stronger: bool, alpha: float = 0.05, n: int = 20
) -> pd.DataFrame:
    """The ``n`` ligand–receptor pairs with the strongest specific interaction in any group pair.

    Returns
    -------
    pandas.DataFrame
        Rows of ``table`` (specificity ≤ ``alpha``) whose ligand–receptor pair is among the top ``n``,
        strongest first.
    """
    sig = table[table["specificity"] <= alpha]
    if sig.empty:
        return sig
    best = sig.groupby(["ligand", "receptor"])["magnitude"].agg("max" if larger_is_stronger else "min")
    best = best.sort_values(ascending=not larger_is_stronger).head(n)
    keep = sig.set_index(["ligand", "receptor"]).index.isin(best.index)
    return sig[keep].sort_values("magnitude", ascending=not larger_is_stronger)


def ccc_figure(table: pd.DataFrame, *, title: str, larger_is_stronger: bool = True, alpha: float = 0.05,
               n: int = 20, max_pairs: int = 16) -> Figure:  # fmt: skip
    """Heat map of specific interactions per sender → receiver and dot plot of the top ``n`` pairs.

    The dot plot shows the ``max_pairs`` sender → receiver pairs with most of those interactions.

    Parameters
    ----------
    table
        ``source, target, ligand, receptor, magnitude, specificity`` (:func:`classify.analyze.ccc.communication`).
    larger_is_stronger
        Magnitude direction (True for CellPhoneDB means, False for ranks).
    """
    groups = sorted(set(table["source"]) | set(table["target"]))
    counts = (
        table[table["specificity"] <= alpha].groupby(["source", "target"]).size()
        .unstack(fill_value=0).reindex(index=groups, columns=groups, fill_value=0)
    )  # fmt: skip
    top = top_interactions(table, larger_is_stronger=larger_is_stronger, alpha=alpha, n=n)
    busiest = (
        top.groupby(["source", "target"]).size().sort_values(ascending=False, kind="stable").head(max_pairs)
    )
    top = top[top.set_index(["source", "target"]).index.isin(busiest.index)]
    pairs = [f"{s} → {t}" for s, t in sorted(set(zip(top["source"], top["target"], strict=True)))]
    lrs = list(
        dict.fromkeys(f"{lig} → {rec}" for lig, rec in zip(top["ligand"], top["receptor"], strict=True))
    )
    fig, (ax0, ax1) = plt.subplots(
        1, 2, figsize=(4.0 + 0.5 * len(groups) + 0.45 * max(len(pairs), 2), 2.2 + 0.28 * max(len(lrs), 4)),
        gridspec_kw={"width_ratios": [max(len(groups), 4), max(len(pairs), 3)]}, layout="constrained",
    )  # fmt: skip
    im = ax0.imshow(counts.to_numpy(), cmap="Reds")
    ax0.set_xticks(range(len(groups)), groups, rotation=60, ha="right", fontsize=7)
    ax0.set_yticks(range(len(groups)), groups, fontsize=7)
    ax0.set_xlabel("receiver (target)")
    ax0.set_ylabel("sender (source)")
    for (i, j), v in np.ndenumerate(counts.to_numpy()):
        dark = v > 0.6 * max(counts.to_numpy().max(), 1)
        ax0.text(j, i, str(v), ha="center", va="center", fontsize=6, color="white" if dark else "black")
    ax0.set_title(f"specific interactions\n(specificity ≤ {alpha})", fontsize=8)
    fig.colorbar(im, ax=ax0, shrink=0.4, location="bottom")
    if top.empty:
        ax1.set_axis_off()
        ax1.text(0.5, 0.5, f"no interaction with specificity ≤ {alpha}", ha="center", va="center", fontsize=8)
    else:
        x = [pairs.index(f"{s} → {t}") for s, t in zip(top["source"], top["target"], strict=True)]
        y = [lrs.index(f"{lig} → {rec}") for lig, rec in zip(top["ligand"], top["receptor"], strict=True)]
        size = -np.log10(np.clip(top["specificity"].to_numpy(dtype=float), 1e-4, 1.0))
        dots = ax1.scatter(x, y, s=15 + 30 * size, c=top["magnitude"], cmap="viridis" if larger_is_stronger
                           else "viridis_r", edgecolors="k", linewidths=0.3)  # fmt: skip
        ax1.set_xticks(range(len(pairs)), pairs, rotation=60, ha="right", fontsize=7)
        ax1.set_yticks(range(len(lrs)), lrs, fontsize=7)
        ax1.set_xlim(-0.6, len(pairs) - 0.4)
        ax1.invert_yaxis()
        fig.colorbar(dots, ax=ax1, shrink=0.6, label="magnitude")
        ax1.set_title(f"top {len(lrs)} ligand → receptor (size: -log10 specificity)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def proportions_figure(props: pd.DataFrame, *, title: str) -> Figure:
    """Stacked bars per dataset and cell type: resistant and sensitive shares of its labelled cells.

    Parameters
    ----------
    props
        :func:`classify.analyze.celltypes.cell_type_proportions` rows.
    """
    datasets = list(dict.fromkeys(props["dataset_id"]))
    ncols = min(4, len(datasets))
    nrows = -(-len(datasets) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.2 + 2.8 * ncols, 3.4 * nrows), squeeze=False, sharey=True,
                             layout="constrained")  # fmt: skip
    for ax in axes.ravel()[len(datasets) :]:
        ax.set_axis_off()
    for ax, d in zip(axes.ravel(), datasets, strict=False):
        part = props[props["dataset_id"] == d]
        labelled = (part["n_resistant"] + part["n_sensitive"]).clip(lower=1).to_numpy(dtype=float)
        res, sen = part["n_resistant"].to_numpy() / labelled, part["n_sensitive"].to_numpy() / labelled
        xs = np.arange(len(part))
        ax.bar(xs, res, color=LABEL_COLOURS["resistant"], label="resistant")
        ax.bar(xs, sen, bottom=res, color=LABEL_COLOURS["sensitive"], label="sensitive")
        ax.set_xticks(xs, [f"{t} ({n})" for t, n in zip(part["cell_type"], part["n_cells"], strict=True)],
                      rotation=60, ha="right", fontsize=7)  # fmt: skip
        ax.set_title(d, fontsize=8)
    for row in axes:
        row[0].set_ylabel("share of labelled cells")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=9)
    return fig


def report_figures(store: Store) -> list[tuple[str, str, Figure]]:
    """The cell-context figures of the report: the latest CCC run per dataset and groupby, and the
    resistant/sensitive shares per cell type (``markers`` annotation).

    Returns
    -------
    list of (title, stem, figure)
        Nothing when no CCC run and no cell types are stored.
    """
    from scdrugmap.classify.analyze.celltypes import cell_type_proportions

    done: list[tuple[str, str, Figure]] = []
    runs = store.query(
        "SELECT ccc_id, dataset_ids, groupby, method, spec, note FROM ccc_runs QUALIFY row_number() OVER "
        "(PARTITION BY dataset_ids, groupby ORDER BY created_at DESC) = 1 ORDER BY dataset_ids, groupby"
    )
    for r in runs.itertuples(index=False):
        table = store.query("SELECT * FROM ccc_results WHERE ccc_id = ?", [r.ccc_id])
        title, stem, fig = run_figure(table, ccc_id=r.ccc_id, datasets=json.loads(r.dataset_ids), groupby=r.groupby,
                                      method=r.method, spec=json.loads(r.spec))  # fmt: skip
        done.append((title + (f" — {r.note}" if r.note else ""), stem, fig))
    props = cell_type_proportions(store)
    if len(props):
        title = "Resistant and sensitive cells per cell type (marker annotation; scDrugAtlas Fig. 3g)"
        done.append((title, "celltype_proportions", proportions_figure(props, title=title)))
    return done


def run_figure(
    table: pd.DataFrame, *, ccc_id: str, datasets: list[str], groupby: str, method: str, spec: dict
) -> tuple[str, str, Figure]:
    """Title, file stem and :func:`ccc_figure` of one CCC run."""
    ds = "+".join(datasets)
    title = f"Cell–cell communication — {ds} by {groupby} ({method}, {ccc_id})"
    fig = ccc_figure(
        table, title=title, larger_is_stronger=bool(spec.get("larger_magnitude_is_stronger", True))
    )
    return title, safe_stem("ccc", ds, groupby.replace("+", "-")), fig
