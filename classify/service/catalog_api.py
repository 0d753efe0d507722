"""Read-only catalog endpoints: health, datasets, models, runs, metrics, curves, SQL."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from scdrugmap.classify import queries
from scdrugmap.classify.service.errors import ApiError
from scdrugmap.classify.service.sqlguard import run_sql
from scdrugmap.classify.service.state import LockedStore, ServiceConfig
from scdrugmap.store.errors import InputError, StoreError

__all__ = ["public_router", "router"]

public_router = APIRouter()
router = APIRouter()

_PAGING = ("q", "limit", "offset", "order_by", "descending")
Values = Annotated[list[str] | None, Query()]


def _store(request: Request) -> LockedStore:
    return request.app.state.store


def _config(request: Request) -> ServiceConfig:
    return request.app.state.config


def _filters(**values: list[str] | None) -> dict[str, list[str]]:
    return {k: v for k, v in values.items() if v}


@public_router.get("/health", tags=["service"])
def health(request: Request) -> dict[str, Any]:
    """Liveness, whether requests need a token, and the store's size (when no token is needed).

    Never touches the catalog: the counts are refreshed in the background (every 10 s)."""
    cfg = _config(request)
    out: dict[str, Any] = {"status": "ok", "auth_required": cfg.token is not None}
    if cfg.token is None:
        counts = request.app.state.counts.counts
        if counts is not None:
            out["store"] = dict(counts)
        out["max_upload_mb"] = cfg.max_upload_mb
    return out


@router.get("/datasets", tags=["catalog"])
def datasets(
    request: Request,
    q: Annotated[str | None, Query(description="Substring searched in ids, study and categories.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
    order_by: str = "dataset_id",
    descending: bool = False,
) -> dict[str, Any]:
    """Datasets, paged. Any other query parameter is an equality filter on that ``datasets`` column
    (e.g. ``?tissue=Cell%20line&drug_class=chemotherapy``; repeat a parameter to match any of
    several values). Unknown columns → 400."""
    filters: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        if key not in _PAGING:
            filters.setdefault(key, []).append(value)
    try:
        total, page = queries.list_datasets(
            _store(request),
            filters,
            search=q,
            limit=limit,
            offset=offset,
            order_by=order_by,
            descending=descending,
        )
    except InputError as exc:
        raise ApiError(400, str(exc)) from exc
    return {"total": total, "limit": limit, "offset": offset, "items": queries.to_records(page)}


@router.get("/datasets/facets", tags=["catalog"])
def dataset_facets(request: Request) -> dict[str, Any]:
    """Distinct values (with dataset counts) of tissue, cancer type, drug, drug class, regimen, source, …"""
    return queries.dataset_facets(_store(request))


@router.get("/datasets/{dataset_id}", tags=["catalog"])
def dataset(request: Request, dataset_id: str) -> dict[str, Any]:
    """One dataset: metadata, cells, sensitive/resistant counts, gene coverage and embeddings per model."""
    return queries.dataset_detail(_store(request), dataset_id)


@router.get("/models", tags=["catalog"])
def models(request: Request) -> dict[str, Any]:
    """Embeddings present in the store and trained heads (evaluation runs) with their mean metrics."""
    return queries.models_overview(_store(request))


@router.get("/runs", tags=["results"])
def runs(
    request: Request,
    model: Values = None,
    head: Values = None,
    strategy: Values = None,
    protocol: Values = None,
    category: Values = None,
    value: Values = None,
    run_id: Values = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """Evaluation runs, filtered by model, head, strategy, protocol, category, value (repeatable)."""
    filters = _filters(
        model=model,
        head=head,
        strategy=strategy,
        protocol=protocol,
        category=category,
        value=value,
        run_id=run_id,
    )
    total, page = queries.list_runs(_store(request), filters, limit=limit, offset=offset)
    items = queries.to_records(page)
    for item in items:
        item["head_params"] = json.loads(item["head_params"]) if item.get("head_params") else {}
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get("/metrics", tags=["results"])
def metrics(
    request: Request,
    model: Values = None,
    head: Values = None,
    strategy: Values = None,
    protocol: Values = None,
    category: Values = None,
    value: Values = None,
    run_id: Values = None,
    metric: Values = None,
    summary: Annotated[bool, Query(description="Mean ± sd per run × metric instead of fold rows.")] = False,
) -> dict[str, Any]:
    """Per-fold metrics (or their summary) of the runs matching the filters (repeatable)."""
    filters = _filters(
        model=model,
        head=head,
        strategy=strategy,
        protocol=protocol,
        category=category,
        value=value,
        run_id=run_id,
        metric=metric,
    )
    fn = queries.summary_metrics if summary else queries.fold_metrics
    items = queries.to_records(fn(_store(request), filters))
    return {"n": len(items), "items": items}


@router.get("/runs/{run_id}/curves", tags=["results"])
def curves(
    request: Request, run_id: str, max_points: Annotated[int, Query(ge=2, le=5000)] = 200
) -> dict[str, Any]:
    """ROC and precision-recall curves of a run's out-of-fold predictions (``predictions`` × ``cells.label``)."""
    try:
        return queries.run_curves(_store(request), run_id, max_points=max_points)
    except StoreError as exc:
        raise ApiError(404, str(exc)) from exc


class SqlRequest(BaseModel):
    """Body of ``POST /sql``."""

    query: str = Field(description="One read-only SELECT statement on the catalog.")
    limit: int | None = Field(default=None, ge=1, description="Row limit (capped by the server's limit).")


@router.post("/sql", tags=["catalog"])
async def sql(request: Request, body: SqlRequest) -> dict[str, Any]:
    """Run one read-only query on the catalog, with a row limit and a time limit.

    Statements that write, attach, copy, install/load extensions, change settings or read files
    are refused with 400. Queries run in their own bounded pool, off the event loop; when it is
    full, or the catalog is held by another process, the answer is 503."""
    cfg = _config(request)
    limit = min(body.limit or cfg.sql_row_limit, cfg.sql_row_limit)
    store = _store(request)
    try:
        res = await request.app.state.sql_pool.run(
            lambda: run_sql(store, body.query, limit=limit, time_limit_s=cfg.sql_time_limit_s),
            start_within_s=cfg.sql_time_limit_s,
            time_limit_s=cfg.sql_time_limit_s,
        )
    except InputError as exc:
        raise ApiError(400, str(exc)) from exc
    rows = json.loads(res.frame.to_json(orient="values", date_format="iso", default_handler=str))
    return {
        "columns": [str(c) for c in res.frame.columns],
        "rows": rows,
        "n_rows": len(rows),
        "truncated": res.truncated,
        "limit": limit,
        "elapsed_s": round(res.elapsed_s, 4),
    }
