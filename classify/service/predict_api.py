"""``POST /predict`` (multipart h5ad upload → per-cell predictions) and ``/jobs/{id}``.

Uploads are streamed into the job's private folder with a size limit (413), checked for the
HDF5 signature and the ``.h5ad`` name (415), then scored by
:func:`classify.predict.predict_file` on a worker thread. The answer comes in the same
response when the job ends within ``wait`` seconds, else 202 with the job id.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scdrugmap.classify.service.errors import ApiError
from scdrugmap.classify.service.jobs import Job
from scdrugmap.classify.service.state import LockedStore, ServiceConfig
from scdrugmap.store.progress import progress

__all__ = ["UploadLimit", "router"]

router = APIRouter()

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CHUNK = 1 << 20
_FORM_SLACK = 1 << 20  # multipart headers and the small fields around the file
_OTHER_BODY_LIMIT = 1 << 20
Format = Literal["json", "csv"]
UMAP_CELLS = 3_000  # cells drawn for the picture by default: bounded time on any upload
UMAP_MAX_CELLS = 8_000

_PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "head"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "An .h5ad file (HDF5)."},
                    "head": {
                        "type": "string",
                        "description": "run_id of a complete frozen-embedding or LoRA evaluation run.",
                    },
                    "fold": {
                        "type": "integer",
                        "default": 0,
                        "description": "LoRA runs: whose fold's adapter and head to apply (GET /models: folds).",
                    },
                    "calibration": {
                        "type": "string",
                        "enum": ["auto", "platt", "isotonic", "none"],
                        "default": "auto",
                        "description": "auto: the method that lowered the run's out-of-study Brier, else none.",
                    },
                    "min_genes": {"type": "integer", "default": 500, "description": "QC: > this many genes."},
                    "max_pct_mito": {"type": "number", "default": 10, "description": "QC: < this % mito."},
                    "abstain": {"type": "string", "description": "LOW,HIGH probability band to abstain on."},
                    "format": {"type": "string", "enum": ["json", "csv"], "default": "json"},
                    "wait": {
                        "type": "number",
                        "description": "Seconds to wait before answering 202 + job id.",
                    },
                },
            }
        }
    },
}


class _TooLarge(Exception):
    pass


class UploadLimit:
    """ASGI middleware bounding request bodies: ``/predict`` to the upload limit, others to 1 MiB.

    A declared ``Content-Length`` over the limit is answered 413 before the body is read; a
    body that grows past it while streaming stops the parse (→ 413).
    """

    def __init__(self, app: ASGIApp, *, max_upload_mb: float) -> None:
        self.app = app
        self.max_upload_mb = max_upload_mb
        self.max_upload_bytes = int(max_upload_mb * 2**20)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        is_upload = scope["path"].rstrip("/") == "/predict"
        limit = self.max_upload_bytes + _FORM_SLACK if is_upload else _OTHER_BODY_LIMIT
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(send, self._detail(is_upload))
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracking_send)
        except _TooLarge:
            if not started:
                await _send_413(send, self._detail(is_upload))

    def _detail(self, is_upload: bool) -> str:
        if is_upload:
            return _too_large(self.max_upload_mb)
        return f"request body larger than {_OTHER_BODY_LIMIT // 2**20} MiB"


def _too_large(max_upload_mb: float) -> str:
    return f"upload larger than the limit of {max_upload_mb:g} MiB (--max-upload-mb)"


async def _send_413(send: Send, detail: str) -> None:
    body = JSONResponse({"detail": detail}).body
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _save_upload(upload: UploadFile, job: Job, max_upload_mb: float) -> None:
    """Copy the uploaded part into the job folder: size limit → 413, not HDF5 → 415."""
    size, limit = 0, int(max_upload_mb * 2**20)
    with open(job.upload_path, "wb") as fh:
        while chunk := await upload.read(_CHUNK):
            if size == 0 and not chunk.startswith(HDF5_SIGNATURE):
                msg = f"{job.filename!r} is not an h5ad file (no HDF5 signature); upload an AnnData .h5ad"
                raise ApiError(415, msg)
            size += len(chunk)
            if size > limit:
                raise ApiError(413, _too_large(max_upload_mb))
            fh.write(chunk)
    if size == 0:
        raise ApiError(422, f"{job.filename!r} is empty")


def _check_head(store: LockedStore, run_id: str, fold: int) -> str:
    """The run's strategy (``frozen`` / ``lora``); 404 unknown run, 422 unusable run or fold."""
    import json

    from scdrugmap.classify.heads_info import unpredictable_reason
    from scdrugmap.classify.queries import lora_folds

    df = store.query("SELECT strategy, status, head, revision FROM eval_runs WHERE run_id = ?", [run_id])
    if df.empty:
        raise ApiError(404, f"no evaluation run {run_id!r}; GET /models lists the trained heads")
    strategy, status = str(df["strategy"].iloc[0]), str(df["status"].iloc[0])
    if strategy not in ("frozen", "lora") or status != "complete":
        msg = f"run {run_id} ({strategy}, {status}) cannot be applied; pick a complete frozen-embedding or LoRA head"
        raise ApiError(422, msg)
    spec = store.query("SELECT spec FROM embeddings WHERE revision = ?", [str(df["revision"].iloc[0])])
    why = unpredictable_reason(
        {"strategy": strategy, "head": str(df["head"].iloc[0])},
        json.loads(spec["spec"].iloc[0] or "{}") if len(spec) else None,
    )
    if strategy == "frozen" and why is not None:
        raise ApiError(422, f"run {run_id} cannot score new files: {why}")
    if strategy == "lora" and fold not in (folds := lora_folds(store.path, run_id)):
        msg = f"LoRA run {run_id} has no saved adapter for fold {fold}; use fold = one of {folds}"
        raise ApiError(422, msg)
    return strategy


def _form_text(form: Any, name: str, default: str | None = None) -> str | None:
    value = form.get(name)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ApiError(422, f"form field {name!r} must be text")
    return value


def _predict_work(
    state: Any, calibration: str, abstain: tuple[float, float] | None, *, strategy: str, fold: int,
    qc: dict[str, Any],
):  # fmt: skip
    from scdrugmap.classify.fold_heads import fold_ensemble
    from scdrugmap.classify.predict import _run_row, predict_file

    store: LockedStore = state.store
    run_locks: dict[str, threading.Lock] = state.run_locks

    def work(job: Job) -> None:
        with progress("prediction job", 3, unit="steps") as bar:  # the job's progress (jobs.py records it)
            if strategy == "frozen":  # LoRA runs apply a fold's saved adapter + head: nothing to train
                with state.run_locks_guard:
                    lock = run_locks.setdefault(job.run_id, threading.Lock())
                with lock:  # the fold heads are trained, checked and saved once per run, never concurrently
                    job.stage = "preparing the fold heads"
                    bar.set_stage(job.stage)
                    fold_ensemble(store, _run_row(store, job.run_id))
            job.stage = "QC, embedding and scoring"
            bar.update(stage=job.stage)
            res = predict_file(
                store, job.run_id, job.upload_path, out=job.output_path, calibration=calibration,
                abstain=abstain, fold=fold, **qc,
            )  # fmt: skip
            job.stage = "collecting"
            bar.update(stage=job.stage)
            job.cells = _read_scored(job.output_path)
            bar.update()
        s = res.summary
        job.summary = {
            "run_id": job.run_id,
            "strategy": strategy,
            "fold": fold if strategy == "lora" else None,
            "n_cells": res.n_cells,
            "n_scored": res.n_scored,
            "n_out_of_fold": res.n_out_of_fold,
            "n_not_scored": res.n_not_scored,
            "n_sensitive": res.n_sensitive,
            "n_resistant": res.n_resistant,
            "n_abstained": res.n_abstained,
            "positive_class": s["positive_class"],
            "calibration": s["calibration"]["method"],
            "calibration_detail": s["calibration"],
            "qc": s["qc"],
            "abstain": list(abstain) if abstain else None,
            "recorded_for_dataset": res.dataset_id,
            "figures": s["figures"],
        }

    return work


def _read_scored(path: Path) -> pd.DataFrame:
    import anndata as ad

    obs = ad.read_h5ad(path, backed="r").obs
    cols = {"scdrugmap_p_sensitive": "p_sensitive", "scdrugmap_p_sensitive_raw": "p_sensitive_raw",
            "scdrugmap_call": "call", "scdrugmap_status": "status", "scdrugmap_reason": "reason"}  # fmt: skip
    out = obs[list(cols)].rename(columns=cols)
    for c in ("call", "status", "reason"):
        out[c] = out[c].astype(str)
    out.insert(0, "obs_name", obs.index.astype(str))
    return out.reset_index(drop=True)


def _result(job: Job, fmt: Format) -> Response:
    if job.status == "failed":
        return JSONResponse({"detail": job.error, "job_id": job.job_id}, status_code=job.error_status or 500)
    if job.status != "done" or job.cells is None:
        raise ApiError(409, f"job {job.job_id} is {job.status}; poll GET /jobs/{job.job_id}")
    if fmt == "csv":
        stem = Path(job.filename).stem
        return Response(
            job.cells.to_csv(index=False),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{stem}.scdrugmap.csv"'},
        )
    cells = job.cells.astype(object).where(job.cells.notna(), None).to_dict(orient="list")
    return JSONResponse({**job.to_dict(), "cells": cells})


@router.post("/predict", tags=["predict"], openapi_extra={"requestBody": _PREDICT_BODY})
async def predict(request: Request) -> Response:
    """Score every cell of an uploaded h5ad with a trained head (``head`` = run id).

    The file gets the ingest QC (``min_genes``, ``max_pct_mito``; raw counts only). Answers per-cell
    ``p_sensitive`` (calibrated probability of the sensitive class), ``p_sensitive_raw``, ``call``
    (sensitive / resistant / abstain / not_scored), ``status`` (scored / out_of_fold / not_scored)
    and ``reason`` as JSON
    (columns as lists) or CSV; a job still running after ``wait`` seconds answers 202 with
    ``job_id`` (poll ``GET /jobs/{job_id}``). 413: too large; 415: not an .h5ad (HDF5) file;
    404: unknown head; 422: unusable file or options.
    """
    from scdrugmap.classify.calibrate import parse_band
    from scdrugmap.store.errors import InputError

    cfg: ServiceConfig = request.app.state.config
    try:
        form = await request.form(max_files=1, max_fields=20)
    except Exception as exc:  # the body limit, or a malformed multipart body
        if isinstance(exc, _TooLarge) or isinstance(exc.__cause__, _TooLarge):
            raise ApiError(413, _too_large(cfg.max_upload_mb)) from exc
        raise ApiError(422, f"could not read the multipart form: {exc}") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "form field 'file' (an .h5ad upload) is required")
        run_id = _form_text(form, "head")
        if not run_id:
            raise ApiError(422, "form field 'head' (a run id from GET /models) is required")
        fmt = _form_text(form, "format", "json")
        calibration = _form_text(form, "calibration", "auto")
        if fmt not in ("json", "csv") or calibration not in ("auto", "platt", "isotonic", "none"):
            raise ApiError(422, "format must be json or csv; calibration auto, platt, isotonic or none")
        try:
            abstain = parse_band(_form_text(form, "abstain"))
            wait = float(_form_text(form, "wait", str(cfg.predict_wait_s)) or 0)
            qc = {"min_genes": int(_form_text(form, "min_genes", "500") or 500),
                  "max_pct_mito": float(_form_text(form, "max_pct_mito", "10") or 10)}  # fmt: skip
        except (InputError, ValueError) as exc:
            raise ApiError(422, f"bad abstain band, wait or QC threshold: {exc}") from exc
        fold_text = _form_text(form, "fold", "0") or "0"
        if not fold_text.isdigit():
            raise ApiError(422, f"fold must be a fold number ≥ 0, got {fold_text!r}")
        fold = int(fold_text)
        filename = Path(upload.filename or "upload.h5ad").name
        if not filename.lower().endswith(".h5ad"):
            raise ApiError(415, f"{filename!r}: only .h5ad (AnnData HDF5) uploads are accepted")
        store: LockedStore = request.app.state.store
        strategy = await asyncio.to_thread(_check_head, store, run_id, fold)
        job = request.app.state.jobs.create(run_id, filename)
        try:
            await _save_upload(upload, job, cfg.max_upload_mb)
        except BaseException:
            request.app.state.jobs.discard(job)
            raise
    finally:
        await form.close()
    work = _predict_work(request.app.state, calibration, abstain, strategy=strategy, fold=fold, qc=qc)
    future = request.app.state.jobs.start(job, work)
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout=max(wait, 0.0))
    except TimeoutError:
        return JSONResponse(job.to_dict(), status_code=202, headers={"Location": f"/jobs/{job.job_id}"})
    return _result(job, fmt)  # type: ignore[arg-type]


@router.get("/jobs/{job_id}", tags=["predict"])
def job_status(request: Request, job_id: str) -> dict[str, Any]:
    """Status of a prediction job: queued / running (with its stage) / done (with counts) / failed."""
    return request.app.state.jobs.get(job_id).to_dict()


@router.get("/jobs/{job_id}/result", tags=["predict"])
def job_result(request: Request, job_id: str, format: Format = "json") -> Response:
    """Per-cell predictions of a finished job as JSON or CSV (409 while it runs)."""
    return _result(request.app.state.jobs.get(job_id), format)


@router.get("/jobs/{job_id}/umap", tags=["predict"])
def job_umap(
    request: Request, job_id: str, max_cells: Annotated[int, Query(ge=3, le=UMAP_MAX_CELLS)] = UMAP_CELLS
) -> dict[str, Any]:
    """UMAP of the uploaded cells (PCA of their expression) with each cell's p(sensitive).

    Larger uploads are drawn from a seeded random subsample of ``max_cells`` cells (default
    3,000, at most 8,000), which bounds the time; ``n_shown`` and ``subsampled`` say so.
    """
    import anndata as ad
    import numpy as np

    from scdrugmap.classify.projection import expression_pcs, umap_2d

    job: Job = request.app.state.jobs.get(job_id)
    if job.status != "done" or job.cells is None:
        raise ApiError(409, f"job {job_id} is {job.status}; the UMAP needs finished predictions")
    with job.lock:
        if "umap" not in job.extras:
            adata = ad.read_h5ad(job.output_path)
            rng = np.random.default_rng(0)
            keep = np.sort(rng.choice(adata.n_obs, min(adata.n_obs, max_cells), replace=False))
            xy = umap_2d(expression_pcs(adata.X[keep]))
            cells = job.cells.iloc[keep]
            job.extras["umap"] = {
                "basis": "UMAP of the first principal components of the uploaded cells' expression",
                "n_cells": int(adata.n_obs),
                "n_shown": len(keep),
                "subsampled": len(keep) < adata.n_obs,
                "x": [float(v) for v in xy[:, 0]],
                "y": [float(v) for v in xy[:, 1]],
                "obs_name": cells["obs_name"].tolist(),
                "p_sensitive": [None if v != v else float(v) for v in cells["p_sensitive"]],
                "call": cells["call"].astype(str).tolist(),
            }
    return {"job_id": job_id, **job.extras["umap"]}
