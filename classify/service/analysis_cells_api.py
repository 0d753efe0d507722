"""Read-only endpoints of the cell- and embedding-level biology views (``scdrugmap analyze``):
label separation of embeddings, Harmony corrections (uncorrected vs corrected metrics), diffusion
pseudotime, label confidence, and the figure gallery.

Like :mod:`classify.service.analysis_api` (DE, enrichment, biomarkers, gene views, and the shared
helpers), nothing here writes: before the first analysis every list is empty and no table or
folder is created. Per-cell pseudotime is read from the Parquet file its ``pseudotime_runs`` row
names, which must lie in ``<store>/analysis/pseudotime``. Figures are served from the default
report folder ``<store>/analysis/figures`` (the one ``scdrugmap analyze`` writes without
``--out``), listed by its ``index.md``. A figure name must look like
``[A-Za-z0-9._-]+.(png|svg)`` and name a regular file directly inside that folder; anything else
is 404, so no path can leave the folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from scdrugmap.classify.analyze.tables import existing_tables
from scdrugmap.classify.queries import to_records
from scdrugmap.classify.service.analysis_api import Metric, not_found, parse_json, store_of
from scdrugmap.classify.service.errors import ApiError

__all__ = ["FIGURE_NAME", "figures_dir", "parse_index", "router", "thin_by_rank"]

router = APIRouter(prefix="/analysis", tags=["analysis"])

#: the only figure names served (besides being a regular file inside the report folder)
FIGURE_NAME = re.compile(r"[A-Za-z0-9._-]+\.(png|svg)")
_INDEX_LINE = re.compile(
    r"^- \[(?P<stem>[^\]]+)\]\((?P<png>[^)\s]+)\) \(\[svg\]\((?P<svg>[^)\s]+)\)\):\s?(?P<cap>.*)$"
)
_MEDIA = {"png": "image/png", "svg": "image/svg+xml"}
#: served figures may not run scripts or load anything (an SVG is a document)
_FIGURE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


# ---- embedding separation ---------------------------------------------------------------------
_SEPARATION_SCORES = ["silhouette", "silhouette_shuffled", "knn_purity", "knn_purity_expected"]


@router.get("/separation")
def separation(
    request: Request,
    model: str | None = None,
    metric: Annotated[Metric, Query(description="Head metric shown beside the scores.")] = "auroc",
) -> dict[str, Any]:
    """Label separation of each model's embedding (no head) per dataset and category value.

    ``items``: one row per revision × scope × value with the silhouette of the label, kNN label
    purity (and their shuffled-label baselines) and ``head_metrics``: ``{head: mean metric}`` of the
    complete pooled runs on the same revision and value. ``models``: per revision, the mean of the
    scores over the per-dataset rows. The same query as ``scdrugmap analyze separation``
    (:func:`classify.analyze.separation.separation_rows`)."""
    from scdrugmap.classify.analyze.separation import separation_rows

    sep, heads = separation_rows(store_of(request), model=model, metric=metric)
    by_key: dict[tuple, dict] = {}
    for r in to_records(heads):
        by_key.setdefault((r["revision"], r["scope"], r["value"]), {})[r["head"]] = r["mean"]
    items = to_records(sep)
    for item in items:
        item["head_metrics"] = by_key.get((item["revision"], item["scope"], item["value"]), {})
    per_dataset = sep[sep["scope"] == "dataset"]
    models = (
        per_dataset.groupby(["model", "revision"], sort=True)[_SEPARATION_SCORES]
        .mean()
        .assign(n_datasets=per_dataset.groupby(["model", "revision"], sort=True).size())
        .reset_index()
        if len(per_dataset)
        else pd.DataFrame()
    )
    return {"metric": metric, "models": to_records(models), "items": items}


# ---- Harmony corrections ----------------------------------------------------------------------
_CORRECTION = (
    "SELECT c.revision, c.model, c.source_model, c.source_revision, c.method, c.batch_key, c.n_cells, "
    "c.n_batches, c.params, c.created_at{pairs} FROM corrections c{join}"
)
_PAIRS = (
    ", COALESCE(p.n_comparisons, 0) AS n_comparisons",
    " LEFT JOIN (SELECT revision, COUNT(DISTINCT (run_uncorrected, run_corrected)) AS n_comparisons "
    "FROM correction_metrics GROUP BY revision) p USING (revision)",
)


def _corrections(store, tables: set[str], where: str = "", params: list | None = None) -> list[dict]:
    if "corrections" not in tables:
        return []
    pairs, join = _PAIRS if "correction_metrics" in tables else ("", "")
    sql = _CORRECTION.format(pairs=pairs, join=join) + where + " ORDER BY c.created_at DESC, c.revision"
    items = to_records(store.query(sql, params or []))
    for item in items:
        item["params"] = parse_json(item["params"])
        item.setdefault("n_comparisons", 0)
    return items


@router.get("/corrections")
def corrections(request: Request) -> dict[str, Any]:
    """Harmony-corrected embeddings (``corrections``), newest first: source model and revision,
    batch key, cells, batches, Harmony parameters and ``n_comparisons`` (pairs of uncorrected /
    corrected runs in ``correction_metrics``)."""
    store = store_of(request)
    items = _corrections(store, existing_tables(store))
    return {"n": len(items), "items": items}


@router.get("/corrections/{revision}/metrics")
def correction_metrics(
    request: Request,
    revision: str,
    metric: Annotated[Metric, Query(description="Metric compared.")] = "auroc",
) -> dict[str, Any]:
    """Uncorrected vs corrected ``metric`` of a correction's paired runs (same folds).

    ``items``: one row per run pair × fold — ``fold`` is the held-out study of a cross-data run
    (the fold's name) and ``mean`` the mean over the folds where the metric is defined, last in
    each pair — with ``uncorrected``, ``corrected`` and ``difference`` (corrected − uncorrected).
    404 for a revision that is not a correction."""
    store = store_of(request)
    tables = existing_tables(store)
    found = _corrections(store, tables, " WHERE c.revision = ?", [revision])
    if not found:
        raise not_found("corrected revision", revision, "/analysis/corrections")
    rows = (
        store.query(
            "SELECT category, value, protocol, head, fold, uncorrected, corrected, difference, run_uncorrected, "
            "run_corrected FROM correction_metrics WHERE revision = ? AND metric = ? "
            "ORDER BY category, value, protocol, head, run_uncorrected, run_corrected, fold = 'mean', fold",
            [revision, metric],
        )
        if "correction_metrics" in tables
        else pd.DataFrame()
    )
    return {"correction": found[0], "metric": metric, "n": len(rows), "items": to_records(rows)}


# ---- pseudotime -------------------------------------------------------------------------------
_PT_RUN = (
    "SELECT pt_id, dataset_id, run_id, root_obs_name, root_rule, n_cells, spearman_label, auroc_label, "
    "spearman_probability, created_at{} FROM pseudotime_runs"
)


def thin_by_rank(values: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` of the ``(n,)`` finite ``values``, evenly spaced in sorted
    order (all when fewer): keeps the quantiles and extremes, unlike a random subset. Ascending."""
    order = np.argsort(values, kind="stable")
    if len(order) <= max_points:
        return order
    return order[np.linspace(0, len(order) - 1, max_points).round().astype(np.int64)]


def _cells_file(store_path: Path, cells_path: str | None) -> Path | None:
    """The run's Parquet file when it is a regular file inside ``<store>/analysis/pseudotime``."""
    folder = (store_path / "analysis" / "pseudotime").resolve()
    if not cells_path:
        return None
    try:
        path = (store_path / cells_path).resolve(strict=True)
    except OSError:
        return None
    return path if path.parent == folder and path.suffix == ".parquet" and path.is_file() else None


@router.get("/pseudotime")
def pseudotime_list(request: Request, dataset: str | None = None) -> dict[str, Any]:
    """Pseudotime runs (``pseudotime_runs``), newest first: dataset, run whose probabilities were
    correlated, root cell and rule, Spearman correlation of pseudotime with the label (resistant =
    1) and with the run's P(resistant), and the AUROC of pseudotime for resistant cells."""
    store = store_of(request)
    if "pseudotime_runs" not in existing_tables(store):
        return {"n": 0, "items": []}
    cond, params = (" WHERE dataset_id = ?", [dataset]) if dataset else ("", [])
    items = to_records(store.query(_PT_RUN.format("") + f"{cond} ORDER BY created_at DESC, pt_id", params))
    return {"n": len(items), "items": items}


@router.get("/pseudotime/{pt_id}")
def pseudotime_cells(
    request: Request,
    pt_id: str,
    max_points: Annotated[
        int, Query(ge=1, le=200_000, description="Most points (evenly spaced along pseudotime).")
    ] = 5000,
) -> dict[str, Any]:
    """One pseudotime run and its cells as points for a strip chart (pseudotime against label).

    ``points`` holds parallel arrays ``pseudotime, label`` (``unlabelled`` for cells without one)
    and, when the run was correlated with an evaluation run, ``probability`` (that run's predicted
    P(resistant); null for cells it did not score), over at most ``max_points`` cells with a finite
    pseudotime, evenly spaced in pseudotime order. ``labels``: per label, cells, cells with a
    finite pseudotime and their median and mean pseudotime (all cells, not thinned).
    ``n_unreachable``: cells without a finite pseudotime. 404 for an unknown id or a missing file."""
    store = store_of(request)
    has = "pseudotime_runs" in existing_tables(store)
    runs = (
        to_records(store.query(_PT_RUN.format(", cells_path") + " WHERE pt_id = ?", [pt_id])) if has else []
    )
    if not runs:
        raise not_found("pseudotime run", pt_id, "/analysis/pseudotime")
    run = runs[0]
    path = _cells_file(store.path, run.pop("cells_path"))
    if path is None:
        msg = (
            f"the per-cell table of pseudotime run {pt_id!r} is missing from <store>/analysis/pseudotime; "
            f"run again: scdrugmap analyze pseudotime --dataset {run['dataset_id']}"
        )
        raise ApiError(404, msg)
    cells = pd.read_parquet(path)
    label = cells["label"].astype(object).where(cells["label"].notna(), "unlabelled").astype(str)
    pt = cells["pseudotime"].to_numpy(dtype=float)
    finite = np.isfinite(pt)
    labels = [
        {"label": lab, "n_cells": int(m.sum()), "n_finite": int((m & finite).sum()),
         "median": float(np.median(pt[m & finite])) if (m & finite).any() else None,
         "mean": float(pt[m & finite].mean()) if (m & finite).any() else None}
        for lab in sorted(set(label)) for m in [(label == lab).to_numpy()]
    ]  # fmt: skip
    keep = np.flatnonzero(finite)[thin_by_rank(pt[finite], max_points)]
    points: dict[str, list] = {
        "pseudotime": [float(x) for x in pt[keep]],
        "label": label.to_numpy()[keep].tolist(),
    }
    if "p_resistant" in cells:
        prob = cells["p_resistant"].to_numpy(dtype=float)[keep]
        points["probability"] = [float(x) if np.isfinite(x) else None for x in prob]
    return {
        "run": run,
        "n_cells": len(cells),
        "n_unreachable": int((~finite).sum()),
        "n_points": len(keep),
        "labels": labels,
        "points": points,
    }


# ---- label confidence -------------------------------------------------------------------------


@router.get("/confidence")
def confidence(request: Request, run_id: str | None = None) -> dict[str, Any]:
    """Label confidence stars per dataset (a ``scdrugmap analyze confidence set`` row, else the
    ingest value) with their evidence; ``counts`` per stars (``none`` = no stars). With ``run_id``,
    also that run's metrics per confidence stratum (``confidence_metrics``; 0 = no stars)."""
    from scdrugmap.classify.analyze.confidence import dataset_confidence

    store = store_of(request)
    tables = existing_tables(store)
    meta = store.query("SELECT dataset_id, cancer_type, drug FROM datasets")
    df = meta.merge(dataset_confidence(store), on="dataset_id").sort_values("dataset_id")
    items = to_records(df)
    counts = {
        k: sum(i["stars"] == v for i in items) for k, v in (("1", 1), ("2", 2), ("3", 3), ("none", None))
    }
    out: dict[str, Any] = {"n": len(items), "counts": counts, "items": items}
    if run_id is not None:
        metrics = (
            store.query(
                "SELECT stars, metric, value, reason, n_cells, n_datasets FROM confidence_metrics "
                "WHERE run_id = ? ORDER BY stars, metric",
                [run_id],
            )
            if "confidence_metrics" in tables
            else pd.DataFrame()
        )
        out["run_id"], out["metrics"] = run_id, to_records(metrics)
    return out


# ---- figures ----------------------------------------------------------------------------------
def figures_dir(request: Request) -> Path:
    """The report folder served: ``<store>/analysis/figures``."""
    return Path(request.app.state.config.store_path) / "analysis" / "figures"


def parse_index(text: str) -> list[dict[str, str]]:
    """Figure lines of a report ``index.md``: ``[{stem, png, svg, caption}]`` (file names as written)."""
    out = []
    for line in text.splitlines():
        m = _INDEX_LINE.match(line.strip())
        if m:
            out.append({"stem": m["stem"], "png": m["png"], "svg": m["svg"], "caption": m["cap"].strip()})
    return out


def _figure_path(folder: Path, name: str) -> Path | None:
    """``folder/name`` when ``name`` is a safe figure name of a regular file directly inside ``folder``."""
    if not FIGURE_NAME.fullmatch(name) or name.startswith(".") or not folder.is_dir():
        return None
    path = folder / name
    try:
        resolved = path.resolve(strict=True)
    except OSError:
        return None
    return path if resolved.parent == folder.resolve() and resolved.is_file() else None


@router.get("/figures")
def figures(request: Request) -> dict[str, Any]:
    """The figures listed in the report folder's ``index.md``, with their captions and the URLs of
    their PNG and SVG (``null`` for a file that is missing or not a safe name)."""
    folder = figures_dir(request)
    index = folder / "index.md"
    if not index.is_file():
        return {"n": 0, "items": []}
    items = []
    for entry in parse_index(index.read_text(encoding="utf-8", errors="replace")):
        urls = {}
        for kind in ("png", "svg"):
            ok = _figure_path(folder, entry[kind]) is not None
            urls[kind] = f"/analysis/figures/{quote(entry[kind])}" if ok else None
        items.append({"stem": entry["stem"], "caption": entry["caption"], **urls})
    return {"n": len(items), "items": items}


@router.get("/figures/{name}", response_class=FileResponse)
def figure(request: Request, name: str) -> FileResponse:
    """One figure file (PNG or SVG) of the report folder; 404 for any other name."""
    path = _figure_path(figures_dir(request), name)
    if path is None:
        msg = f"no figure {name!r}; names come from GET /analysis/figures (letters, digits, '._-', .png or .svg)"
        raise ApiError(404, msg)
    return FileResponse(path, media_type=_MEDIA[path.suffix[1:]], headers=_FIGURE_HEADERS)
