"""The service's configuration and its store handle (one catalog connection at a time per process).

DuckDB refuses a second connection to the same file with another configuration in one
process (a read-only connection while a write connection is open, or two read-only ones,
because each locks its configuration). The service therefore hands every caller — its own
routes and :func:`classify.predict.predict_file` — a :class:`LockedStore`, whose connections
are serialised by a process-wide lock held only while a connection is open.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb

from scdrugmap.store.catalog import Store

__all__ = ["LockedStore", "ServiceConfig"]


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of one service instance.

    Attributes
    ----------
    store_path
        The store directory.
    token
        Shared secret required on every API request (``Authorization: Bearer`` or ``X-Token``);
        ``None`` means no authentication (loopback only, enforced by ``scdrugmap serve``).
    max_upload_mb
        Largest accepted ``/predict`` upload, in MiB (larger → 413).
    sql_row_limit
        Most rows ``/sql`` returns (``truncated`` tells when more exist).
    sql_time_limit_s
        ``/sql`` queries are interrupted after this many seconds (→ 400).
    predict_wait_s
        ``/predict`` answers with the result when the job ends within this time, else 202 + job id.
    workers
        Prediction jobs run at once (more are queued).
    job_ttl_s
        Finished jobs (results, uploaded files) are kept this long, in seconds.
    max_jobs
        Most jobs remembered; the oldest finished ones are dropped first.
    """

    store_path: Path
    token: str | None = None
    max_upload_mb: float = 500.0
    sql_row_limit: int = 10_000
    sql_time_limit_s: float = 10.0
    predict_wait_s: float = 60.0
    workers: int = 2
    job_ttl_s: float = 3600.0
    max_jobs: int = 100

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)


class LockedStore(Store):
    """A :class:`store.Store` whose catalog connections are serialised within the process.

    Parameters
    ----------
    path
        The store directory.

    Notes
    -----
    The lock is re-entrant and shared by every ``LockedStore`` of the process, so code that
    opens connections one after another (all of ``store/`` and ``classify/``) runs unchanged;
    heavy work between connections (embedding, head training) runs in parallel.
    """

    _lock = threading.RLock()
    #: a store busy in another process is waited for at most this long (then 503), not the CLI's 600 s
    busy_timeout_s = 5.0

    @contextlib.contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Like :meth:`store.Store.connect`, holding the process-wide catalog lock while open."""
        with self._lock, super().connect(read_only=read_only) as con:
            yield con
