"""``GET /leakage``: the stored leakage reports (the same cells under cell, sample, patient and study
grouping; :mod:`classify.leakage`), for the Results tab and scripts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from scdrugmap.classify.service.state import LockedStore

__all__ = ["router"]

router = APIRouter()


@router.get("/leakage", tags=["results"])
def leakage_reports(
    request: Request,
    category: Annotated[str | None, Query(description="Category of the reports.")] = None,
    value: Annotated[str | None, Query(description="Category value of the reports.")] = None,
) -> dict[str, Any]:
    """Rows of the ``leakage`` table (latest per report): grouping, metric, mean, inflation over the
    strictest grouping (``reference``); empty when no report was made (``scdrugmap leakage``)."""
    store: LockedStore = request.app.state.store
    tables = set(store.query("SELECT table_name FROM information_schema.tables")["table_name"])
    if "leakage" not in tables:
        return {"items": []}
    conds, params = ["TRUE"], []
    for col, v in (("category", category), ("value", value)):
        if v is not None:
            conds.append(f"{col} = ?")
            params.append(v)
    df = store.query(
        "SELECT report_id, model, head, category, value, seed, grouping, run_id, metric, mean, n_folds, "
        f"reference, inflation, created_at FROM leakage WHERE {' AND '.join(conds)} "
        "ORDER BY report_id, list_position(['cell', 'sample', 'patient', 'study'], grouping), metric",
        params,
    )
    df["created_at"] = df["created_at"].astype(str)
    return {"items": df.astype(object).where(df.notna(), None).to_dict("records")}
