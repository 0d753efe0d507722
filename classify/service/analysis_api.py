"""Read-only endpoints of the gene-level biology views (``scdrugmap analyze``): DE tables,
enrichment, biomarkers and gene views, plus the helpers shared with
:mod:`classify.service.analysis_cells_api` (separation, Harmony corrections, pseudotime, label
confidence, figures).

The analysis tables (:data:`classify.analyze.tables.ANALYSIS_SCHEMA`) are created by the first
analysis; until then every list here is empty (never an error) and this module writes nothing —
it does not create the tables either.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request

from scdrugmap.classify.analyze.tables import existing_tables
from scdrugmap.classify.queries import to_records
from scdrugmap.classify.service.errors import ApiError
from scdrugmap.classify.service.state import LockedStore

__all__ = ["Metric", "not_found", "parse_json", "router", "store_of"]

router = APIRouter(prefix="/analysis", tags=["analysis"])

#: head metrics accepted by the ``metric`` parameters
Metric = Literal["auroc", "auprc", "f1", "accuracy", "balanced_accuracy", "mcc", "precision", "recall"]


def store_of(request: Request) -> LockedStore:
    """The service's store."""
    return request.app.state.store


def parse_json(value: Any) -> Any:
    """A JSON text column's value parsed (``None`` for NULL or empty)."""
    return json.loads(value) if isinstance(value, str) and value else None


def not_found(kind: str, ident: str, listing: str) -> ApiError:
    """404 naming the unknown id and the endpoint that lists the valid ones."""
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
        item["dataset_ids"] = parse_json(item["dataset_ids"]) or []
        if "missed_genes" in item:
            item["missed_genes"] = parse_json(item["missed_genes"])
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
    store = store_of(request)
    tables = existing_tables(store)
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
    store = store_of(request)
    tables = existing_tables(store)
    runs = _de_runs(store, tables, " WHERE r.de_id = ?", [de_id]) if "de_runs" in tables else []
    if not runs:
        raise not_found("DE table", de_id, "/analysis/de")
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
    store = store_of(request)
    if "enrich_runs" not in existing_tables(store):
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
    store = store_of(request)
    runs = (
        _enrich_runs(store, " WHERE enrich_id = ?", [enrich_id])
        if "enrich_runs" in existing_tables(store)
        else []
    )
    if not runs:
        raise not_found("enrichment", enrich_id, "/analysis/enrich")
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
        run["dataset_ids"] = parse_json(run["dataset_ids"]) or []
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
    store = store_of(request)
    if not {"biomarker_runs", "biomarkers"} <= existing_tables(store):
        return {"n": 0, "items": []}
    items = _biomarkers(store, "", [], limit)
    return {"n": len(items), "items": items}


@router.get("/biomarkers/{bm_id}")
def biomarker_run(
    request: Request, bm_id: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
) -> dict[str, Any]:
    """One biomarker run with its stored genes (404 if unknown)."""
    store = store_of(request)
    has = {"biomarker_runs", "biomarkers"} <= existing_tables(store)
    items = _biomarkers(store, " WHERE bm_id = ?", [bm_id], limit) if has else []
    if not items:
        raise not_found("biomarker run", bm_id, "/analysis/biomarkers")
    return items[0]


# ---- gene views -------------------------------------------------------------------------------
_GENE_VIEW = (
    "gene, dataset_id, n_resistant, n_sensitive, n_unlabelled, mean_resistant, mean_sensitive, mean_all, "
    "frac_resistant, frac_sensitive, frac_all, log2fc, p, value_kind, created_at"
)


@router.get("/genes")
def gene_views(
    request: Request,
    gene: Annotated[
        str | None,
        Query(max_length=100, description="HGNC symbol (case-insensitive) whose rows are returned."),
    ] = None,
) -> dict[str, Any]:
    """Gene views (``scdrugmap analyze gene SYMBOL``): one gene's expression by label per dataset.

    ``genes``: every viewed gene with its number of datasets (alphabetical). ``items``: the
    ``gene_views`` rows of ``gene`` (upper-cased, as stored), one per dataset — empty for a gene
    never viewed (``hint`` says how to view it). ``log2fc`` is a difference of means for scaled
    input (see ``value_kind``); ``p`` a two-sided Mann–Whitney U test over cells."""
    symbol = gene.strip().upper() if gene and gene.strip() else None
    store = store_of(request)
    if "gene_views" not in existing_tables(store):
        return {"gene": symbol, "genes": [], "n": 0, "items": []}
    genes = store.query(
        "SELECT gene, COUNT(*) AS n_datasets, MAX(created_at) AS created_at FROM gene_views GROUP BY gene "
        "ORDER BY gene"
    )
    items = (
        to_records(
            store.query(f"SELECT {_GENE_VIEW} FROM gene_views WHERE gene = ? ORDER BY dataset_id", [symbol])
        )
        if symbol
        else []
    )
    out: dict[str, Any] = {"gene": symbol, "genes": to_records(genes), "n": len(items), "items": items}
    if symbol and not items:
        out["hint"] = f"{symbol} has no gene view yet; run: scdrugmap analyze gene {symbol}"
    return out
