"""``scdrugmap report --out DIR``: the paper's figures from the catalog, as PNG + SVG and an offline index.html.

Figures (one set per protocol × category found in ``eval_runs``): fold bars (mean per
model/head and category value, with the per-fold points), radar charts over the category's
values, ROC and precision-recall curves of every run (pooled out-of-fold predictions), and a
UMAP of each model's embeddings coloured by label and by dataset; plus a scalability table
(embedding size, embedding and head-training throughput from the catalog's timestamps and
durations). The index links only local files, so the folder works offline.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import click
import numpy as np
import pandas as pd

from classify.service import queries
from store.catalog import Store
from store.errors import InputError, StoreError

__all__ = ["Report", "report", "scalability_tables", "write_report"]

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf"]  # fmt: skip
_RC = {"svg.fonttype": "none", "svg.hashsalt": "scdrugmap", "font.size": 9}
_METRIC_NAMES = {"f1": "F1", "auroc": "AUROC", "auprc": "AUPRC", "accuracy": "Accuracy", "mcc": "MCC",
                 "balanced_accuracy": "Balanced accuracy", "precision": "Precision", "recall": "Recall"}  # fmt: skip


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote.

    Attributes
    ----------
    index
        ``DIR/index.html``.
    figures
        ``(title, stem)`` of each figure; ``DIR/<stem>.png`` and ``DIR/<stem>.svg`` exist.
    tables
        CSV files written (scalability).
    """

    index: Path
    figures: list[tuple[str, str]] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)


def _slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9]+", "-", str(p)).strip("-").lower() for p in parts)


def _run_label(row: pd.Series) -> str:
    strategy = "" if row["strategy"] in ("frozen", None) else f" ({row['strategy']})"
    return f"{row['model']} · {row['head']}{strategy}"


def _save(fig, out: Path, stem: str) -> None:
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig.savefig(out / f"{stem}.png", dpi=130, bbox_inches="tight")
        fig.savefig(out / f"{stem}.svg", bbox_inches="tight")


def _fold_bars(folds: pd.DataFrame, metrics: Sequence[str], title: str):
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
            color = _PALETTE[j % len(_PALETTE)]
            for i, value in enumerate(values):
                pts = sub[(sub["label"] == label) & (sub["value"] == value)]["score"].dropna().to_numpy()
                if not pts.size:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                ax.bar(x, pts.mean(), width * 0.9, color=color, alpha=0.55, label=label if i == 0 else None)
                ax.scatter(x + rng.uniform(-0.25, 0.25, pts.size) * width, pts, s=9, color=color,
                           edgecolors="black", linewidths=0.4, zorder=3)  # fmt: skip
        ax.set_xticks(range(len(values)), [v if len(v) < 30 else v[:29] + "…" for v in values], rotation=15)
        ax.set_ylabel(_METRIC_NAMES.get(metric, metric))
        ax.set_ylim(-1.05 if metric == "mcc" else 0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(title)
    axes[0].legend(fontsize=7, ncol=min(4, len(labels)), loc="lower right")
    fig.tight_layout()
    return fig


def _radar(summary: pd.DataFrame, metrics: Sequence[str], title: str):
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
            color = _PALETTE[j % len(_PALETTE)]
            ax.plot(np.append(angles, angles[:1]), np.append(r, r[:1]), color=color, lw=1.6, label=label)
            ax.fill(np.append(angles, angles[:1]), np.append(r, r[:1]), color=color, alpha=0.1)
        ax.set_xticks(angles, [v if len(v) < 22 else v[:21] + "…" for v in values], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(_METRIC_NAMES.get(metric, metric), pad=14)
    fig.suptitle(title)
    fig.axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(-0.25, 1.15))
    fig.tight_layout()
    return fig


def _curves(store: Store, runs: pd.DataFrame, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.4))
    roc_ax, pr_ax = fig.subplots(1, 2)
    drawn = 0
    for k, (_, run) in enumerate(runs.iterrows()):
        try:
            c = queries.run_curves(store, run["run_id"], max_points=400)
        except (InputError, StoreError):  # a run without predictions, or with one class only
            continue
        color = _PALETTE[k % len(_PALETTE)]
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


def _umap(store: Store, model: str, revision: str, *, max_cells: int, seed: int):
    from matplotlib.figure import Figure

    from classify.service.projection import umap_2d
    from store.embeddings import open_array, read_rows

    cells = store.query(
        "SELECT c.cell_uid, c.dataset_id, c.label FROM embedded_cells e JOIN cells c USING (cell_uid) "
        "WHERE e.revision = ? ORDER BY c.cell_uid",
        [revision],
    )
    if len(cells) < 3:
        return None
    if len(cells) > max_cells:
        cells = cells.iloc[np.sort(np.random.default_rng(seed).choice(len(cells), max_cells, replace=False))]
    X = read_rows(open_array(store, model, revision), cells["cell_uid"].to_numpy())
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
        ax_ds.scatter(xy[m, 0], xy[m, 1], s=4, color=_PALETTE[j % len(_PALETTE)], label=d, rasterized=True)
    for ax, what in ((ax_label, "label"), (ax_ds, "dataset")):
        ax.set(xticks=[], yticks=[], xlabel="UMAP 1", ylabel="UMAP 2", title=f"{model} embedding by {what}")
        ax.legend(fontsize=6, markerscale=2, loc="best", ncol=1 if what == "label" else 2)
    fig.suptitle(f"{model} (revision {revision[:10]}; {len(cells)} cells)")
    fig.tight_layout()
    return fig


def scalability_tables(store: Store) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Embedding and head-training throughput from the catalog.

    Returns
    -------
    tuple of pandas.DataFrame
        Embeddings: ``model, revision, parameters, dim, cells_embedded, embed_wall_s,
        cells_per_s`` (wall time from ``created_at`` to ``updated_at``: an upper bound when a
        run was resumed later; ``parameters`` from the spec when an adapter recorded it).
        Heads: ``model, head, strategy, runs, cells, train_eval_s, cells_per_s`` (sums over runs
        of ``n_cells`` and ``duration_s``; every fold's training and scoring included).
    """
    import json

    emb = store.query(
        "SELECT model, revision, dim, rows_done AS cells_embedded, spec, "
        "date_diff('millisecond', created_at, updated_at) / 1000.0 AS embed_wall_s FROM embeddings ORDER BY model"
    )

    def params(spec: str | None) -> float | None:
        try:
            d = json.loads(spec or "{}")
        except ValueError:
            return None
        for key in ("n_parameters", "n_params", "parameters"):
            for holder in (d, d.get("spec") or {}):
                if isinstance(holder.get(key), int | float):
                    return holder[key]
        return None

    emb.insert(2, "parameters", [params(s) for s in emb.pop("spec")])
    emb["cells_per_s"] = emb["cells_embedded"] / emb["embed_wall_s"].where(emb["embed_wall_s"] > 0)
    heads = store.query(
        "SELECT model, head, strategy, COUNT(*) AS runs, SUM(n_cells) AS cells, SUM(duration_s) AS train_eval_s "
        "FROM eval_runs WHERE status = 'complete' AND strategy <> 'predict' GROUP BY ALL ORDER BY ALL"
    )
    heads["cells_per_s"] = heads["cells"] / heads["train_eval_s"].where(heads["train_eval_s"] > 0)
    return emb, heads


def _html_table(df: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "—"
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in df.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _index(store: Store, rep: Report, sections: list[tuple[str, list[tuple[str, str]]]], tables: str) -> str:
    parts = []
    for heading, figs in sections:
        if not figs:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for title, stem in figs:
            parts.append(
                f'<figure><img src="{stem}.svg" alt="{html.escape(title)}"><figcaption>{html.escape(title)} '
                f'— <a href="{stem}.png">PNG</a> · <a href="{stem}.svg">SVG</a></figcaption></figure>'
            )
    style = (
        "body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#1d2330}"
        "img{max-width:100%;border:1px solid #e5e7eb}figure{margin:16px 0}figcaption{color:#555}"
        "table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}"
        "th{background:#f3f4f6}td:first-child,th:first-child{text-align:left}"
    )
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>scdrugmap report</title>'
        f"<style>{style}</style></head><body><h1>scdrugmap report</h1>"
        f"<p>Store <code>{html.escape(str(store.path))}</code>, generated {when}. "
        f"{len(rep.figures)} figures (SVG shown; PNG linked).</p>{''.join(parts)}"
        f"<h2>Scalability</h2>{tables}</body></html>"
    )


def write_report(
    store: Store,
    out: str | Path,
    *,
    metrics: Sequence[str] = ("f1", "auroc"),
    umap_cells: int = 5000,
    umap: bool = True,
    seed: int = 0,
) -> Report:
    """Write every figure as PNG + SVG, the scalability tables as CSV, and ``index.html``.

    Parameters
    ----------
    store
        The store (read only).
    out
        Output folder (created; files in it are overwritten).
    metrics
        Metrics of the fold bars and radars.
    umap_cells
        Cells per model UMAP (seeded subsample above this).
    umap
        Draw the embedding UMAPs (the slowest part).
    seed
        Subsampling and UMAP seed.

    Raises
    ------
    InputError
        Unknown metric, or no evaluation runs and no embeddings to draw.
    """
    bad = [m for m in metrics if m not in _METRIC_NAMES]
    if bad:
        msg = f"unknown metric(s) {', '.join(bad)}; use {', '.join(_METRIC_NAMES)}"
        raise InputError(msg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(index=out / "index.html")
    folds = queries.fold_metrics(store, {"metric": list(metrics)})
    folds = folds[folds["strategy"] != "predict"].copy()
    folds["label"] = folds.apply(_run_label, axis=1) if len(folds) else []
    runs = queries.list_runs(store, {"status": ["complete"]}, limit=100_000)[1]
    runs = runs[runs["strategy"] != "predict"].copy()
    runs["label"] = runs.apply(_run_label, axis=1) if len(runs) else []
    sections: dict[str, list[tuple[str, str]]] = {"Fold bars": [], "Radar": [], "ROC and PR": [], "UMAP": []}
    for (protocol, category), sub in folds.groupby(["protocol", "category"], sort=True):
        what = f"{protocol} · {category}"
        figs = {
            "Fold bars": (f"Fold bars — {what}", "bars", _fold_bars(sub, metrics, what)),
            "Radar": (f"Radar — {what}", "radar", _radar(_means(sub), metrics, what)),
            "ROC and PR": (
                f"ROC and PR — {what}",
                "curves",
                _curves(store, runs[(runs["protocol"] == protocol) & (runs["category"] == category)], what),
            ),
        }
        for section, (title, kind, fig) in figs.items():
            if fig is not None:
                stem = _slug(kind, protocol, category)
                _save(fig, out, stem)
                sections[section].append((title, stem))
    if umap:
        emb = store.query(
            "SELECT model, revision FROM embeddings WHERE rows_done > 0 QUALIFY row_number() OVER "
            "(PARTITION BY model ORDER BY updated_at DESC) = 1 ORDER BY model"
        )
        for model, revision in emb.itertuples(index=False):
            fig = _umap(store, model, revision, max_cells=umap_cells, seed=seed)
            if fig is not None:
                stem = _slug("umap", model)
                _save(fig, out, stem)
                sections["UMAP"].append((f"UMAP — {model} embeddings by label and by dataset", stem))
    for figs in sections.values():
        rep.figures.extend(figs)
    if not rep.figures:
        msg = f"nothing to draw in {store.path}: no evaluation runs or embeddings (run `scdrugmap evaluate` first)"
        raise InputError(msg)
    emb_table, head_table = scalability_tables(store)
    for name, df in (("scalability_embeddings", emb_table), ("scalability_heads", head_table)):
        df.to_csv(out / f"{name}.csv", index=False)
        rep.tables.append(out / f"{name}.csv")
    tables = (
        "<h3>Embeddings</h3><p>Throughput = cells embedded / wall time between the revision's first and last write.</p>"
        f"{_html_table(emb_table)}<h3>Heads</h3><p>Cells per second of training + scoring over all folds of all "
        f"runs (eval_runs.duration_s).</p>{_html_table(head_table)}"
    )
    rep.index.write_text(_index(store, rep, list(sections.items()), tables), encoding="utf-8")
    return rep


def _means(folds: pd.DataFrame) -> pd.DataFrame:
    return (
        folds.groupby(["label", "value", "metric"], as_index=False)["score"]
        .mean()
        .rename(columns={"score": "mean"})
    )


@click.command("report", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--metric", "metrics", multiple=True, default=("f1", "auroc"), show_default=True,
              help="Metric of the bars and radars (repeatable).")  # fmt: skip
@click.option("--umap-cells", default=5000, show_default=True, help="Cells per embedding UMAP.")
@click.option("--no-umap", is_flag=True, help="Skip the embedding UMAPs.")
@click.option("--seed", default=0, show_default=True)
@click.pass_context
def report(
    ctx: click.Context, out_dir: Path, metrics: tuple[str, ...], umap_cells: int, no_umap: bool, seed: int
) -> None:
    """Write the benchmark figures (PNG + SVG) and an offline index.html into --out."""
    rep = write_report(
        Store.open(ctx.obj["store"]),
        out_dir,
        metrics=metrics,
        umap_cells=umap_cells,
        umap=not no_umap,
        seed=seed,
    )
    click.echo(f"wrote {len(rep.figures)} figures (PNG + SVG), {len(rep.tables)} tables and {rep.index}")
