"""Prediction jobs: a bounded thread pool, per-job temporary folders, expiry.

Each job owns a folder under the service's work directory (the uploaded file, the output
h5ad); the folder is removed when the job expires (``ttl_s`` after it finished, or when more
than ``max_jobs`` are remembered) and when the service stops.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from scdrugmap.classify.service.errors import ApiError, status_for
from scdrugmap.store.progress import report_to

__all__ = ["Job", "JobManager", "JobStatus"]

JobStatus = Literal["queued", "running", "done", "failed"]


@dataclass
class Job:
    """One prediction job (mutable: its worker thread updates it).

    Attributes
    ----------
    job_id
        Random hex id.
    run_id
        The evaluation run whose head is applied.
    filename
        The uploaded file's name (as sent, sanitised).
    directory
        The job's private folder.
    status, stage
        ``queued → running → done | failed``; ``stage`` says what a running job does.
    fraction, detail
        Progress of the running step (0–1) and what it does in detail (e.g. ``predict 3/5 steps:
        embedding and scoring 150 cells``), recorded by :mod:`store.progress` through :meth:`record`.
    summary
        Counts when done (cells, scored, sensitive, resistant, abstained, …).
    cells
        Per-cell result when done: ``obs_name, probability, probability_raw, label``.
    error_status, error
        HTTP status and message when failed.
    """

    job_id: str
    run_id: str
    filename: str
    directory: Path
    created: float = field(default_factory=time.time)
    status: JobStatus = "queued"
    stage: str = "queued"
    fraction: float = 0.0
    detail: str = ""
    started: float | None = None
    finished: float | None = None
    summary: dict[str, Any] | None = None
    cells: pd.DataFrame | None = None
    error_status: int | None = None
    error: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    future: Future | None = field(default=None, repr=False)

    @property
    def upload_path(self) -> Path:
        """Where the uploaded h5ad is written."""
        return self.directory / "upload.h5ad"

    @property
    def output_path(self) -> Path:
        """The scored h5ad written by :func:`classify.predict.predict_file`."""
        return self.directory / "scored.h5ad"

    def record(self, fraction: float, detail: str) -> None:
        """A :func:`store.progress.report_to` sink: the running step's fraction done and its detail."""
        self.fraction, self.detail = min(max(float(fraction), 0.0), 1.0), detail

    def to_dict(self) -> dict[str, Any]:
        """Status as JSON (no per-cell rows); ``progress`` is 0–1, ``progress_detail`` says what runs."""
        now = self.finished or time.time()
        progress = {"queued": 0.0, "running": self.fraction, "done": 1.0, "failed": 1.0}[self.status]
        return {
            "job_id": self.job_id,
            "status": self.status,
            "stage": self.stage,
            "progress": round(progress, 4),
            "progress_detail": self.detail if self.status == "running" else self.stage,
            "run_id": self.run_id,
            "filename": self.filename,
            "elapsed_s": round(now - self.created, 3),
            "summary": self.summary,
            "error": None if self.error is None else {"status": self.error_status, "detail": self.error},
            "result_url": f"/jobs/{self.job_id}/result" if self.status == "done" else None,
        }


class JobManager:
    """Runs jobs on a thread pool and remembers them for a while.

    Parameters
    ----------
    workers
        Jobs run at once.
    ttl_s
        Seconds a finished job is kept.
    max_jobs
        Most jobs remembered (oldest finished dropped first).
    """

    def __init__(self, *, workers: int = 2, ttl_s: float = 3600.0, max_jobs: int = 100) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="scdrugmap-serve-"))
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="scdrugmap-job")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.ttl_s = ttl_s
        self.max_jobs = max_jobs

    def create(self, run_id: str, filename: str) -> Job:
        """A new queued job with its own folder (expired jobs are purged first)."""
        self.purge()
        job_id = uuid.uuid4().hex
        directory = self.workdir / job_id
        directory.mkdir()
        job = Job(job_id=job_id, run_id=run_id, filename=filename, directory=directory)
        with self._lock:
            self._jobs[job_id] = job
        return job

    def start(self, job: Job, work: Callable[[Job], None]) -> Future:
        """Run ``work(job)`` on the pool; its exceptions mark the job failed (with an HTTP status)."""

        def run() -> None:
            job.status, job.stage, job.started = "running", "predicting", time.time()
            try:
                with report_to(job.record):  # the work's loops report to the job, not to stderr
                    work(job)
            except BaseException as exc:
                status, detail = status_for(exc)
                detail = detail.replace(str(job.upload_path), job.filename).replace(f"{job.directory}/", "")
                job.error_status, job.error = status, detail
                job.status, job.stage = "failed", "failed"
                if status >= 500:
                    import logging

                    logging.getLogger("scdrugmap.service").error("job %s failed", job.job_id, exc_info=exc)
            else:
                job.status, job.stage = "done", "done"
            finally:
                job.finished = time.time()
                job.upload_path.unlink(missing_ok=True)

        job.future = self._pool.submit(run)
        return job.future

    def get(self, job_id: str) -> Job:
        """The job with this id.

        Raises
        ------
        ApiError
            404 when unknown or expired.
        """
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            msg = f"no job {job_id!r} (unknown, or expired after {self.ttl_s:g} s)"
            raise ApiError(404, msg)
        return job

    def discard(self, job: Job) -> None:
        """Forget a job and remove its folder."""
        with self._lock:
            self._jobs.pop(job.job_id, None)
        shutil.rmtree(job.directory, ignore_errors=True)

    def purge(self) -> None:
        """Drop finished jobs older than ``ttl_s`` and the oldest finished beyond ``max_jobs``."""
        now = time.time()
        with self._lock:
            finished = sorted(
                (j for j in self._jobs.values() if j.finished is not None), key=lambda j: j.finished or 0.0
            )
        excess = max(0, len(self._jobs) - self.max_jobs + 1)
        for i, job in enumerate(finished):
            if i < excess or now - (job.finished or now) > self.ttl_s:
                self.discard(job)

    def close(self) -> None:
        """Cancel queued jobs, wait for running ones, remove every job folder."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
