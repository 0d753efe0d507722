"""``GET /releases``, ``GET /releases/{id}/download`` and ``GET /recommend``: the integrated releases
(:mod:`classify.analyze.releases`) and the model recommendation (:mod:`classify.recommend`) for the page's Atlas tab."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from scdrugmap.classify.service.state import LockedStore

__all__ = ["router"]

router = APIRouter()


def _records(df) -> list[dict[str, Any]]:
    out = []
    for row in df.astype(object).to_dict("records"):
        out.append(
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        )
    return out


@router.get("/releases", tags=["releases"])
def releases(request: Request) -> dict[str, Any]:
    """The stored integrated releases, oldest first (``scdrugmap release build``): id, scope, model,
    revision, cells, datasets, date of the first build, SHA-256 of the file, and its download URL."""
    from scdrugmap.classify.analyze.releases import list_releases

    store: LockedStore = request.app.state.store
    items = _records(list_releases(store).drop(columns=["path"]))
    for item in items:
        item["download"] = f"/releases/{item['release_id']}/download"
    return {"n": len(items), "items": items}


@router.get("/releases/{release_id}/download", tags=["releases"], response_class=FileResponse)
def download_release(request: Request, release_id: str) -> FileResponse:
    """The release's h5ad (checked against the SHA-256 in the catalog first); 404 for an unknown id."""
    from scdrugmap.classify.analyze.releases import check_release_file, release_row

    store: LockedStore = request.app.state.store
    row = release_row(store, release_id)
    path = check_release_file(store, row)
    return FileResponse(
        path, media_type="application/x-hdf5", filename=f"{row['release_id']}.h5ad",
        headers={"ETag": f'"{row["content_hash"]}"', "Cache-Control": "public, max-age=31536000, immutable"},
    )  # fmt: skip


@router.get("/recommend", tags=["results"])
def recommendation(
    request: Request,
    category: Annotated[str | None, Query(description="Only this category (tissue, drug, …).")] = None,
    scenario: Annotated[str | None, Query(description="pooled, cross, external or few-shot.")] = None,
    metric: Annotated[str, Query(description="Metric to rank by.")] = "auroc",
    min_seeds: Annotated[int, Query(ge=2, description="Fewest seeds the best model needs.")] = 3,
) -> dict[str, Any]:
    """One row per category value and scenario: the recommended model/head or ``not enough evidence``
    with the reason, the best's mean and 95 % interval over seeds, runs, margin over the baseline and
    over the next model (:func:`classify.recommend.recommend`)."""
    from scdrugmap.classify.recommend import recommend

    store: LockedStore = request.app.state.store
    df = recommend(store, category=category, scenario=scenario, metric=metric, min_seeds=min_seeds)
    return {"metric": metric, "min_seeds": min_seeds, "items": _records(df)}
