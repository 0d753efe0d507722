"""Read-only endpoints of the cell context views: cell types per dataset with their resistant and
sensitive cells (scDrugAtlas Fig. 3g; ``scdrugmap analyze celltypes``) and cell–cell communication
runs (``scdrugmap analyze ccc``). Nothing here writes; an unannotated store gets empty lists."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from scdrugmap.classify.analyze.tables import existing_tables
from scdrugmap.classify.queries import to_records
from scdrugmap.classify.service.analysis_api import not_found, store_of

__all__ = ["router"]

router = APIRouter(prefix="/analysis", tags=["analysis"])


@router.get("/celltypes")
def celltypes(
    request: Request,
    method: Annotated[str, Query(description="Annotation method (default markers).")] = "markers",
    dataset: Annotated[list[str] | None, Query(description="Dataset ids (default all annotated).")] = None,
) -> dict[str, Any]:
    """Cells per dataset × cell type: ``n_resistant``, ``n_sensitive``, ``n_unlabelled``,
    ``frac_resistant`` (of the type's labelled cells) and each type's share of the dataset's
    resistant / sensitive cells; ``methods`` lists the stored annotations."""
    from scdrugmap.classify.analyze.celltypes import cell_type_proportions

    store = store_of(request)
    if "cell_types" not in existing_tables(store):
        return {"methods": [], "method": method, "items": []}
    methods = store.query("SELECT DISTINCT method FROM cell_types ORDER BY 1")["method"].tolist()
    items = to_records(cell_type_proportions(store, dataset_ids=dataset, method=method)) if methods else []
    return {"methods": methods, "method": method, "items": items}


@router.get("/ccc")
def ccc_runs(request: Request) -> dict[str, Any]:
    """Stored cell–cell communication runs, newest first (groups and cells per group from the spec)."""
    store = store_of(request)
    if "ccc_runs" not in existing_tables(store):
        return {"items": []}
    df = store.query(
        "SELECT ccc_id, dataset_ids, groupby, method, resource, n_cells, note, spec, created_at FROM ccc_runs "
        "ORDER BY created_at DESC, ccc_id"
    )
    items = to_records(df)
    for item in items:
        spec = json.loads(item.pop("spec") or "{}")
        item["dataset_ids"] = json.loads(item["dataset_ids"] or "[]")
        item["groups"] = spec.get("groups", {})
        item["larger_magnitude_is_stronger"] = spec.get("larger_magnitude_is_stronger", True)
    return {"items": items}


@router.get("/ccc/{ccc_id}")
def ccc_run(
    request: Request,
    ccc_id: str,
    alpha: Annotated[float, Query(gt=0, le=1, description="Specificity threshold.")] = 0.05,
    limit: Annotated[int, Query(ge=1, le=500, description="Ligand–receptor pairs in the dot plot.")] = 20,
) -> dict[str, Any]:
    """One run: ``counts`` of specific interactions (specificity ≤ ``alpha``) per sender → receiver
    and ``top``: the rows of the ``limit`` strongest specific ligand–receptor pairs."""
    from scdrugmap.classify.analyze.context_plots import top_interactions

    runs = ccc_runs(request)["items"]
    run = next((r for r in runs if r["ccc_id"] == ccc_id), None)
    if run is None:
        raise not_found("CCC run", ccc_id, "/analysis/ccc")
    store = store_of(request)
    table = store.query(
        "SELECT source, target, ligand, receptor, magnitude, specificity FROM ccc_results WHERE ccc_id = ?",
        [ccc_id],
    )
    sig = table[table["specificity"] <= alpha]
    counts = sig.groupby(["source", "target"]).size().rename("n").reset_index()
    top = top_interactions(
        table, larger_is_stronger=run["larger_magnitude_is_stronger"], alpha=alpha, n=limit
    )
    return {"run": run, "alpha": alpha, "n_interactions": len(table), "n_specific": len(sig),
            "counts": to_records(counts), "top": to_records(top)}  # fmt: skip
