"""Errors as JSON ``{"detail": "..."}`` with the right status code, never a stack trace."""

from __future__ import annotations

import logging

import duckdb
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scdrugmap.store.errors import CheckpointError, InputError, ScDrugMapError, StoreBusyError, StoreError

__all__ = ["ApiError", "install_error_handlers", "status_for"]

log = logging.getLogger("scdrugmap.service")


class ApiError(Exception):
    """An error with an HTTP status, raised by the service's own checks.

    Parameters
    ----------
    status
        HTTP status code.
    detail
        One-line message for the client.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def status_for(exc: BaseException) -> tuple[int, str]:
    """HTTP status and one-line message for an exception.

    ``ApiError`` keeps its status; bad input (:class:`InputError`, :class:`CheckpointError`)
    is 422; absent data (:class:`StoreError`) 404; a store or catalog held by another process
    (:class:`StoreBusyError`, DuckDB's lock error) 503 with a message naming neither paths nor pids;
    anything else 500 with a generic message (the traceback goes to the server log only).
    """
    if isinstance(exc, ApiError):
        return exc.status, exc.detail
    if isinstance(exc, InputError | CheckpointError):
        return 422, _one_line(exc)
    if isinstance(exc, StoreBusyError):  # no server paths or pids in the answer
        return 503, "the store is busy (another process is writing to it); retry shortly"
    if isinstance(exc, StoreError):
        return 404, _one_line(exc)
    if isinstance(exc, ScDrugMapError):
        return 422, _one_line(exc)
    if isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower():
        return 503, "the catalog is locked by another process (a write in progress); retry shortly"
    return 500, "internal server error (details are in the server log)"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        where = dict(
            zip(("body", "query", "path"), ("field", "query parameter", "path parameter"), strict=True)
        )
        kind = next((where[x] for x in err.get("loc", ()) if x in where), "parameter")
        parts.append(f"{kind} {loc!r}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers that turn every exception into ``{"detail": str}`` JSON."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        status, detail = status_for(exc)
        if status >= 500:
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": detail}, status_code=status)

    # the specific classes are answered by the exception middleware; Exception is the last resort
    for cls in (ApiError, ScDrugMapError, duckdb.Error, Exception):
        app.add_exception_handler(cls, _known)
