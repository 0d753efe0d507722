"""``scdrugmap report --out DIR``: the paper's figures from the catalog, as PNG + SVG and an offline index.html.

Figures (one set per protocol × category found in ``eval_runs``): fold bars (mean per
model/head and category value, with the per-fold points), radar charts over the category's
values, ROC and precision-recall curves of every run (pooled out-of-fold predictions), and a
UMAP of each model's embeddings coloured by label and by dataset; plus a scalability table
(embedding size, embedding and head-training throughput from the catalog's timestamps and
durations). The index links only local files, so the folder works offline. The figures are drawn by
:mod:`classify.report_figures`.
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

from scdrugmap.classify import queries
from scdrugmap.classify.recommend import report_table
from scdrugmap.classify.report_figures import (
    METRIC_NAMES,
    embedding_umap,
    fold_bars,
    radar,
    roc_pr_curves,
    save_figure,
)
from scdrugmap.classify.report_honest import baseline_table, leakage_figure
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError
from scdrugmap.store.progress import progress

__all__ = ["Report", "report", "scalability_tables", "write_report"]


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
        f"{tables}</body></html>"
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
    bad = [m for m in metrics if m not in METRIC_NAMES]
    if bad:
        msg = f"unknown metric(s) {', '.join(bad)}; use {', '.join(METRIC_NAMES)}"
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
    sections: dict[str, list[tuple[str, str]]] = {
        "Fold bars": [], "Radar": [], "ROC and PR": [], "Leakage": [], "UMAP": []
    }  # fmt: skip
    groups = list(folds.groupby(["protocol", "category"], sort=True))
    emb = (
        store.query(
            "SELECT model, revision FROM embeddings WHERE rows_done > 0 QUALIFY row_number() OVER "
            "(PARTITION BY model ORDER BY updated_at DESC) = 1 ORDER BY model"
        )
        if umap
        else pd.DataFrame(columns=["model", "revision"])
    )
    with progress("report", 2 + len(groups) + len(emb), unit="steps") as bar:
        bar.set_stage("leakage figure")
        fig = leakage_figure(store)
        if fig is not None:
            save_figure(fig, out, "leakage")
            sections["Leakage"].append(
                ("Leakage — metrics of the same cells under each split grouping", "leakage")
            )
        bar.update()
        for (protocol, category), sub in groups:
            what = f"{protocol} · {category}"
            bar.set_stage(what)
            figs = {
                "Fold bars": (f"Fold bars — {what}", "bars", fold_bars(sub, metrics, what)),
                "Radar": (f"Radar — {what}", "radar", radar(_means(sub), metrics, what)),
                "ROC and PR": (
                    f"ROC and PR — {what}",
                    "curves",
                    roc_pr_curves(
                        store, runs[(runs["protocol"] == protocol) & (runs["category"] == category)], what
                    ),
                ),
            }
            for section, (title, kind, fig) in figs.items():
                if fig is not None:
                    stem = _slug(kind, protocol, category)
                    save_figure(fig, out, stem)
                    sections[section].append((title, stem))
            bar.update()
        for model, revision in emb.itertuples(index=False):
            bar.set_stage(f"UMAP of {model}")
            fig = embedding_umap(store, model, revision, max_cells=umap_cells, seed=seed)
            if fig is not None:
                stem = _slug("umap", model)
                save_figure(fig, out, stem)
                sections["UMAP"].append((f"UMAP — {model} embeddings by label and by dataset", stem))
            bar.update()
        from scdrugmap.classify.analyze.context_plots import report_figures as context_figures

        for title, stem, fig in context_figures(store):  # cell types and cell–cell communication (issue 21)
            save_figure(fig, out, stem)
            sections.setdefault("Cell context", []).append((title, stem))
        bar.set_stage("tables and index.html")
        for figs in sections.values():
            rep.figures.extend(figs)
        if not rep.figures:
            msg = f"nothing to draw in {store.path}: no evaluation runs or embeddings (run `scdrugmap evaluate` first)"
            raise InputError(msg)
        tables = _tables(store, out, rep)
        rep.index.write_text(_index(store, rep, list(sections.items()), tables), encoding="utf-8")
        bar.update()
    return rep


def _tables(store: Store, out: Path, rep: Report) -> str:
    """Write the scalability CSVs (listed in ``rep.tables``); the HTML of the index's tables."""
    emb_table, head_table = scalability_tables(store)
    for name, df in (("scalability_embeddings", emb_table), ("scalability_heads", head_table)):
        df.to_csv(out / f"{name}.csv", index=False)
        rep.tables.append(out / f"{name}.csv")
    baselines = baseline_table(store)
    recommendation = report_table(store)
    recommendation.to_csv(out / "recommendation.csv", index=False)
    rep.tables.append(out / "recommendation.csv")
    return (
        "<h2>Which model to pick</h2><p>Per category value and scenario, the model/head with the highest mean "
        "AUROC, recommended only with ≥ 3 seeds, a 95 % interval over seeds above the baseline and apart from the "
        "next model's; otherwise <i>not enough evidence</i> and why (<code>scdrugmap recommend</code>).</p>"
        f"{_html_table(recommendation)}"
        "<h2>Results beside their baselines</h2><p>Means over folds; baseline = constant classifier at each "
        "fold's prevalence of the positive class (F1 = 2p/(1+p), AUPRC = p; AUROC and balanced accuracy 0.5, "
        "MCC 0). Degenerate: every fold called one class, or |MCC| &lt; 0.05.</p>"
        f"{_html_table(baselines)}<h2>Scalability</h2>"
        "<h3>Embeddings</h3><p>Throughput = cells embedded / wall time between the revision's first and last write.</p>"
        f"{_html_table(emb_table)}<h3>Heads</h3><p>Cells per second of training + scoring over all folds of all "
        f"runs (eval_runs.duration_s).</p>{_html_table(head_table)}"
    )


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
