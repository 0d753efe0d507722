"""Read-only endpoints of the biology views (``scdrugmap analyze``) and their figure gallery.

The analysis tables (:data:`classify.analyze.tables.ANALYSIS_SCHEMA`) are created by the first
analysis; until then every list here is empty (never an error) and this module writes nothing —
it does not create the tables either. Figures are served from the default report folder
``<store>/analysis/figures`` (the one ``scdrugmap analyze`` writes without ``--out``), listed by
its ``index.md``. A figure name must look like ``[A-Za-z0-9._-]+.(png|svg)`` and name a regular
file directly inside that folder; anything else is 404, so no path can leave the folder.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import pandas as pd
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from classify.service.errors import ApiError
from classify.service.queries import to_records
from classify.service.state import LockedStore

__all__ = ["FIGURE_NAME", "figures_dir", "parse_index", "router"]

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
Metric = Literal["auroc", "auprc", "f1", "accuracy", "balanced_accuracy", "mcc", "precision", "recall"]


def _store(request: Request) -> LockedStore:
    return request.app.state.store


def _tables(store: LockedStore) -> set[str]:
    df = store.query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'")
    return set(df["table_name"])


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) and value else None


def _not_found(kind: str, ident: str, listing: str) -> ApiError:
    return ApiError(404, f"no {kind} {ident!r} in the store; list them with GET {listing}")


# ---- differential expression ------------------------------------------------------------------
_DE_RUN = (
    "SELECT r.de_id, r.dataset_ids, r.labels, r.method, r.effect_unit, r.alpha, r.min_log2fc, r.n_cells, "
    "r.n_resistant, r.n_sensitive, r.n_samples_resistant, r.n_samples_sensitive, r.n_genes, r.n_significant, "
    "json_extract_string(r.spec, '$.test') AS test, json_extract_string(r.spec, '$.cells') AS cells, "
    "r.created_at{overlap} FROM de_runs r{join}"
)
_OVERLAP = (
    ", o.truth_de_id, o.n_significant_truth, o.n_shared, o.jaccard, o.spearman_log2fc, o.missed_genes",
    " LEFT JOIN de_overlap o USING (de_id)",
)
_DE_COLUMNS = (
    "gene, log2fc, p, padj, mean_resistant, mean_sensitive, frac_resistant, frac_sensitive, significant"
)


def _de_runs(store: LockedStore, tables: set[str], where: str = "", params: list | None = None) -> list[dict]:
    overlap, join = _OVERLAP if "de_overlap" in tables else ("", "")
    df = store.query(
        _DE_RUN.format(overlap=overlap, join=join) + where + " ORDER BY r.created_at DESC, r.de_id",
        params or [],
    )
    items = to_records(df)
    for item in items:
        item["dataset_ids"] = _json(item["dataset_ids"]) or []
        if "missed_genes" in item:
            item["missed_genes"] = _json(item["missed_genes"])
    return items


@router.get("/de")
def de_list(
    request: Request,
    dataset: Annotated[
        str | None, Query(description="Only tables whose selection holds this dataset.")
    ] = None,
    method: Literal["wilcoxon", "pseudobulk"] | None = None,
) -> dict[str, Any]:
    """DE tables (``de_runs``), newest first, with the overlap with truth-based DE for run labels."""
    store = _store(request)
    tables = _tables(store)
    if "de_runs" not in tables:
        return {"n": 0, "items": []}
    items = _de_runs(store, tables, " WHERE r.method = ?" if method else "", [method] if method else [])
    if dataset:
        items = [i for i in items if dataset in i["dataset_ids"]]
    return {"n": len(items), "items": items}


@router.get("/de/{de_id}")
def de_table(
    request: Request,
    de_id: str,
    limit: Annotated[int, Query(ge=1, le=100_000, description="Table rows returned (by adjusted p).")] = 100,
    significant_only: bool = False,
    max_points: Annotated[
        int, Query(ge=1, le=200_000, description="Most volcano points (most significant first).")
    ] = 50_000,
) -> dict[str, Any]:
    """One DE table: its run, rows sorted by adjusted p, and the volcano's points.

    ``volcano`` holds parallel arrays ``gene, log2fc, neg_log10_padj, significant, direction``
    (``up`` / ``down`` for significant genes, ``ns`` otherwise) over genes with a finite effect and
    adjusted p (-log10 of adjusted p clipped at 1e-300). 404 for an unknown id."""
    store = _store(request)
    tables = _tables(store)
    runs = _de_runs(store, tables, " WHERE r.de_id = ?", [de_id]) if "de_runs" in tables else []
    if not runs:
        raise _not_found("DE table", de_id, "/analysis/de")
    cond = "de_id = ?" + (" AND significant" if significant_only else "")
    total = int(store.query(f"SELECT COUNT(*) AS n FROM de_results WHERE {cond}", [de_id])["n"].iloc[0])
    rows = store.query(
        f"SELECT {_DE_COLUMNS} FROM de_results WHERE {cond} ORDER BY padj ASC NULLS LAST, p ASC NULLS LAST, gene "
        "LIMIT ?",
        [de_id, limit],
    )
    pts = store.query(
        "SELECT gene, log2fc, padj, significant, COUNT(*) OVER () AS n FROM de_results "
        "WHERE de_id = ? AND isfinite(log2fc) AND isfinite(padj) ORDER BY padj, gene LIMIT ?",
        [de_id, max_points],
    )
    sig = pts["significant"].fillna(False).astype(bool)
    direction = [
        "ns" if not s else ("up" if x > 0 else "down") for s, x in zip(sig, pts["log2fc"], strict=True)
    ]
    volcano = {
        "n_points": len(pts),
        "n_eligible": int(pts["n"].iloc[0]) if len(pts) else 0,
        "gene": pts["gene"].astype(str).tolist(),
        "log2fc": [float(x) for x in pts["log2fc"]],
        "neg_log10_padj": [-math.log10(min(max(float(p), 1e-300), 1.0)) for p in pts["padj"]],
        "significant": sig.tolist(),
        "direction": direction,
    }
    return {"run": runs[0], "n_rows": total, "limit": limit, "rows": to_records(rows), "volcano": volcano}


# ---- enrichment -------------------------------------------------------------------------------
def _enrich_runs(store: LockedStore, where: str = "", params: list | None = None) -> list[dict]:
    df = store.query(
        "SELECT enrich_id, de_source, genesets, n_sets, n_universe, n_up, n_down, created_at FROM enrich_runs"
        f"{where} ORDER BY created_at DESC, enrich_id",
        params or [],
    )
    items = to_records(df)
    for item in items:  # the gene-set file's name only: server paths stay on the server
        item["genesets"] = Path(item["genesets"]).name if item["genesets"] else None
    return items


@router.get("/enrich")
def enrich_list(request: Request, de_id: str | None = None) -> dict[str, Any]:
    """Enrichment runs (``enrich_runs``), optionally those of one DE table (``de_source``)."""
    store = _store(request)
    if "enrich_runs" not in _tables(store):
        return {"n": 0, "items": []}
    items = _enrich_runs(store, " WHERE de_source = ?" if de_id else "", [de_id] if de_id else [])
    return {"n": len(items), "items": items}


@router.get("/enrich/{enrich_id}")
def enrich_table(
    request: Request,
    enrich_id: str,
    direction: Literal["up", "down"] | None = None,
    limit: Annotated[int, Query(ge=1, le=100_000, description="Terms per direction, by rank.")] = 50,
) -> dict[str, Any]:
    """One enrichment run and its top terms per direction (``up`` first, then by rank). 404 if unknown."""
    store = _store(request)
    runs = _enrich_runs(store, " WHERE enrich_id = ?", [enrich_id]) if "enrich_runs" in _tables(store) else []
    if not runs:
        raise _not_found("enrichment", enrich_id, "/analysis/enrich")
    cond, params = ("AND direction = ? ", [direction]) if direction else ("", [])
    rows = store.query(
        "SELECT direction, rank, term, description, set_size, n_query, n_hits, expected, fold_enrichment, p, "
        f"padj, genes FROM enrich_results WHERE enrich_id = ? {cond}"
        "QUALIFY row_number() OVER (PARTITION BY direction ORDER BY rank) <= ? "
        "ORDER BY direction = 'down', direction, rank",
        [enrich_id, *params, limit],
    )
    return {"run": runs[0], "rows": to_records(rows)}


# ---- biomarkers -------------------------------------------------------------------------------
_BM_RUN = (
    "SELECT bm_id, dataset_ids, labels, n_cells, n_genes, cv_auroc, cv_folds, created_at FROM biomarker_runs"
)
_BM_ROW = "rank, gene, mean_abs_shap, gain, gain_fraction, direction, mean_resistant, mean_sensitive"


def _biomarkers(store: LockedStore, where: str, params: list, limit: int) -> list[dict]:
    runs = to_records(store.query(f"{_BM_RUN}{where} ORDER BY created_at DESC, bm_id", params))
    for run in runs:
        run["dataset_ids"] = _json(run["dataset_ids"]) or []
        genes = store.query(
            f"SELECT {_BM_ROW} FROM biomarkers WHERE bm_id = ? ORDER BY rank LIMIT ?", [run["bm_id"], limit]
        )
        run["genes"] = to_records(genes)
    return runs


@router.get("/biomarkers")
def biomarker_list(
    request: Request, limit: Annotated[int, Query(ge=1, le=10_000, description="Genes per run.")] = 20
) -> dict[str, Any]:
    """Biomarker runs (LightGBM on expression), newest first, each with its top genes by mean |SHAP|."""
    store = _store(request)
    if not {"biomarker_runs", "biomarkers"} <= _tables(store):
        return {"n": 0, "items": []}
    items = _biomarkers(store, "", [], limit)
    return {"n": len(items), "items": items}


@router.get("/biomarkers/{bm_id}")
def biomarker_run(
    request: Request, bm_id: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
) -> dict[str, Any]:
    """One biomarker run with its stored genes (404 if unknown)."""
    store = _store(request)
    has = {"biomarker_runs", "biomarkers"} <= _tables(store)
    items = _biomarkers(store, " WHERE bm_id = ?", [bm_id], limit) if has else []
    if not items:
        raise _not_found("biomarker run", bm_id, "/analysis/biomarkers")
    return items[0]


# ---- embedding separation ---------------------------------------------------------------------
_SEPARATION_SCORES = ("silhouette", "silhouette_shuffled", "knn_purity", "knn_purity_expected")


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
    scores over the per-dataset rows."""
    store = _store(request)
    if "separation" not in _tables(store):
        return {"metric": metric, "models": [], "items": []}
    cond, params = (" WHERE model = ?", [model]) if model else ("", [])
    sep = store.query(
        "SELECT model, revision, scope, value, n_cells, n_resistant, n_sensitive, "
        f"{', '.join(_SEPARATION_SCORES)}, k, created_at FROM separation{cond} ORDER BY model, revision, scope, value",
        params,
    )
    heads = store.query(
        "SELECT r.revision, CASE WHEN r.category = 'dataset_id' THEN 'dataset' ELSE r.category END AS scope, "
        "r.value, r.head, AVG(m.value) AS mean FROM eval_runs r JOIN metrics m USING (run_id) "
        "WHERE m.metric = ? AND r.protocol = 'pooled' AND r.status = 'complete' AND r.strategy <> 'predict' "
        "GROUP BY ALL ORDER BY r.head",
        [metric],
    )
    by_key: dict[tuple, dict] = {}
    for r in to_records(heads):
        by_key.setdefault((r["revision"], r["scope"], r["value"]), {})[r["head"]] = r["mean"]
    items = to_records(sep)
    for item in items:
        item["head_metrics"] = by_key.get((item["revision"], item["scope"], item["value"]), {})
    per_dataset = sep[sep["scope"] == "dataset"]
    models = (
        per_dataset.groupby(["model", "revision"], sort=True)[list(_SEPARATION_SCORES)]
        .mean()
        .assign(n_datasets=per_dataset.groupby(["model", "revision"], sort=True).size())
        .reset_index()
        if len(per_dataset)
        else pd.DataFrame()
    )
    return {"metric": metric, "models": to_records(models), "items": items}


# ---- label confidence -------------------------------------------------------------------------
_DATASET_EVIDENCE = (
    "label_confidence",
    "confidence_source",
    "exposure_days",
    "sample_origin",
    "intrinsic_resistance",
)


@router.get("/confidence")
def confidence(request: Request, run_id: str | None = None) -> dict[str, Any]:
    """Label confidence stars per dataset (a ``scdrugmap analyze confidence set`` row, else the
    ingest value) with their evidence; ``counts`` per stars (``none`` = no stars). With ``run_id``,
    also that run's metrics per confidence stratum (``confidence_metrics``; 0 = no stars)."""
    store = _store(request)
    tables = _tables(store)
    cols = store.query("SELECT column_name FROM information_schema.columns WHERE table_name = 'datasets'")
    d = {c: f"d.{c}" if c in set(cols["column_name"]) else "NULL" for c in _DATASET_EVIDENCE}
    has = "label_confidence" in tables
    l_stars, l_source, l_reason = (
        ("l.stars", "l.source", "json_extract_string(l.evidence, '$.reason')") if has else ("NULL",) * 3
    )
    join = " LEFT JOIN label_confidence l USING (dataset_id)" if has else ""
    df = store.query(
        f"SELECT d.dataset_id, d.cancer_type, d.drug, CAST(COALESCE({l_stars}, {d['label_confidence']}) AS INTEGER) "
        f"AS stars, CASE WHEN {l_stars} IS NOT NULL THEN {l_source} WHEN {d['label_confidence']} IS NOT NULL THEN "
        f"COALESCE({d['confidence_source']}, 'explicit') END AS source, CASE WHEN {l_stars} IS NOT NULL THEN "
        f"'analyze' WHEN {d['label_confidence']} IS NOT NULL THEN 'ingest' END AS set_at, {l_reason} AS reason, "
        f"{d['exposure_days']} AS exposure_days, {d['sample_origin']} AS sample_origin, "
        f"{d['intrinsic_resistance']} AS intrinsic_resistance FROM datasets d{join} ORDER BY d.dataset_id"
    )
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
