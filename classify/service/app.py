"""The FastAPI application: catalog, results and biology endpoints, predictions, the web page, offline docs.

``create_app(store_path)`` builds the app over an existing store. Everything the browser
loads comes from the package: the page from ``classify/service/static/`` and the OpenAPI docs
(``/docs``, ``/redoc``) from the assets of ``fastapi-offline``.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from scdrugmap.classify.service.background import SqlPool, StoreCounts
from scdrugmap.classify.service.errors import ApiError, install_error_handlers
from scdrugmap.classify.service.jobs import JobManager
from scdrugmap.classify.service.state import LockedStore, ServiceConfig

__all__ = ["STATIC_DIR", "create_app"]

STATIC_DIR = Path(__file__).parent / "static"

_bearer = HTTPBearer(auto_error=False, description="The service token (scdrugmap serve --token).")
_x_token = APIKeyHeader(name="X-Token", auto_error=False, description="The service token, as a header.")


def _require_token(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    x_token: Annotated[str | None, Depends(_x_token)],
) -> None:
    """401 unless the request carries the service token (when one is configured)."""
    expected = request.app.state.config.token
    if expected is None:
        return
    given = bearer.credentials if bearer is not None else x_token
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "missing or wrong token: send 'Authorization: Bearer TOKEN' or 'X-Token: TOKEN'")


def create_app(
    store_path: str | Path,
    *,
    token: str | None = None,
    max_upload_mb: float = 500.0,
    sql_row_limit: int = 10_000,
    sql_time_limit_s: float = 10.0,
    predict_wait_s: float = 60.0,
    workers: int = 2,
    job_ttl_s: float = 3600.0,
    max_jobs: int = 100,
) -> FastAPI:
    """Build the service over a store.

    Parameters
    ----------
    store_path
        An existing store directory.
    token
        When given, every API request must carry it (``Authorization: Bearer`` or ``X-Token``);
        the page, its assets, ``/health`` and the docs stay public.
    max_upload_mb
        Upload limit of ``/predict`` in MiB (413 above).
    sql_row_limit, sql_time_limit_s
        Limits of ``/sql``.
    predict_wait_s
        Default time ``/predict`` waits before answering 202 with a job id.
    workers
        Prediction jobs run at once.
    job_ttl_s, max_jobs
        How long and how many finished jobs are kept.

    Returns
    -------
    fastapi.FastAPI
        The app; job folders are removed at shutdown (lifespan).

    Raises
    ------
    StoreError
        When ``store_path`` is not a store.
    InputError
        When a limit is not positive.
    """
    from fastapi_offline import FastAPIOffline

    from scdrugmap.classify.service import (
        analysis_api,
        analysis_cells_api,
        atlas_api,
        catalog_api,
        context_api,
        leakage_api,
        predict_api,
    )
    from scdrugmap.store.errors import InputError

    if max_upload_mb <= 0 or sql_row_limit < 1 or sql_time_limit_s <= 0 or workers < 1:
        msg = "max_upload_mb, sql_row_limit, sql_time_limit_s and workers must be positive"
        raise InputError(msg)
    config = ServiceConfig(
        store_path=Path(store_path),
        token=token or None,
        max_upload_mb=max_upload_mb,
        sql_row_limit=sql_row_limit,
        sql_time_limit_s=sql_time_limit_s,
        predict_wait_s=predict_wait_s,
        workers=workers,
        job_ttl_s=job_ttl_s,
        max_jobs=max_jobs,
    )
    store = LockedStore.open(config.store_path)
    jobs = JobManager(workers=workers, ttl_s=job_ttl_s, max_jobs=max_jobs)
    sql_pool = SqlPool(workers=2, max_pending=16)
    counts = StoreCounts(store.query)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            jobs.close()
            sql_pool.close()
            counts.close()

    app = FastAPIOffline(
        title="scdrugmap",
        summary="Per-cell drug sensitive/resistant predictions, datasets and benchmark results of a scdrugmap store.",
        version=_version(),
        lifespan=lifespan,
        static_url="/docs-static",
    )
    app.state.config = config
    app.state.store = store
    app.state.jobs = jobs
    app.state.sql_pool = sql_pool
    app.state.counts = counts
    app.state.run_locks = {}
    app.state.run_locks_guard = threading.Lock()
    install_error_handlers(app)
    auth = [Depends(_require_token)]
    app.include_router(catalog_api.public_router)
    app.include_router(catalog_api.router, dependencies=auth)
    app.include_router(analysis_api.router, dependencies=auth)
    app.include_router(analysis_cells_api.router, dependencies=auth)
    app.include_router(context_api.router, dependencies=auth)
    app.include_router(predict_api.router, dependencies=auth)
    app.include_router(leakage_api.router, dependencies=auth)
    app.include_router(atlas_api.router, dependencies=auth)
    app.add_middleware(predict_api.UploadLimit, max_upload_mb=config.max_upload_mb)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scdrugmap")
    except PackageNotFoundError:  # pragma: no cover - running from a checkout without install
        return "0"
