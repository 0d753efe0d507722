"""Work the service keeps off the event loop and off ``/health``: the ``/sql`` pool and store counts.

``/sql`` queries run in their own bounded thread pool (:class:`SqlPool`): at most ``workers`` at
once, at most ``max_pending`` waiting; a query that cannot start within its time limit, or one
more than the queue holds, is answered 503 at once instead of tying up the server. ``/health``
never touches the catalog: it reports store counts that a background thread refreshes
(:class:`StoreCounts`).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from scdrugmap.classify.service.errors import ApiError

__all__ = ["SqlPool", "StoreCounts"]

log = logging.getLogger("scdrugmap.service")
T = TypeVar("T")

COUNTS_SQL = (
    "SELECT (SELECT COUNT(*) FROM datasets) AS datasets, (SELECT COUNT(*) FROM cells) AS cells, "
    "(SELECT COUNT(*) FROM embeddings) AS embeddings, (SELECT COUNT(*) FROM eval_runs) AS runs"
)


class SqlPool:
    """A bounded thread pool for ``/sql``.

    Parameters
    ----------
    workers
        Queries running at once.
    max_pending
        Queries accepted at once (running + waiting); more → 503.
    """

    def __init__(self, workers: int = 2, max_pending: int = 16) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scdrugmap-sql")
        self._slots = threading.BoundedSemaphore(max_pending)

    async def run(self, fn: Callable[[], T], *, start_within_s: float, time_limit_s: float) -> T:
        """Run ``fn`` in the pool; 503 when the pool is full or ``fn`` cannot start in time.

        Parameters
        ----------
        fn
            The query (it enforces its own time limit once started).
        start_within_s
            Most seconds to wait for a free worker.
        time_limit_s
            The query's own limit; the answer is awaited at most this long after it starts (+ 5 s).

        Raises
        ------
        ApiError
            503 when too many queries are queued, or the query did not start or finish in time.
        """
        if not self._slots.acquire(blocking=False):
            raise ApiError(503, "too many SQL queries at once; retry shortly")
        started = threading.Event()

        def job() -> T:
            started.set()
            return fn()

        try:
            future = self._pool.submit(job)
            wrapped = asyncio.wrap_future(future)
            deadline = time.monotonic() + start_within_s
            while not started.is_set() and not future.done():
                if time.monotonic() > deadline:
                    if future.cancel():
                        raise ApiError(503, "the server is busy with other SQL queries; retry shortly")
                    break
                await asyncio.sleep(0.02)
            try:
                return await asyncio.wait_for(asyncio.shield(wrapped), timeout=time_limit_s + 5.0)
            except TimeoutError:
                raise ApiError(503, "the query did not finish in time; retry shortly") from None
        finally:
            self._slots.release()

    def close(self) -> None:
        """Stop accepting queries (running ones finish)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class StoreCounts:
    """Store counts for ``/health``, refreshed every ``interval_s`` by a daemon thread.

    Parameters
    ----------
    query
        Runs :data:`COUNTS_SQL` and returns a DataFrame (the service's store ``query``).
    interval_s
        Seconds between refreshes.
    """

    def __init__(self, query: Callable[[str], Any], interval_s: float = 10.0) -> None:
        self._query = query
        self._interval = interval_s
        self._stop = threading.Event()
        self.counts: dict[str, int] | None = None
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="scdrugmap-counts", daemon=True)
        self._thread.start()
        _RUNNING.add(self)

    def refresh(self) -> None:
        """Read the counts now (errors are logged; the last counts stay)."""
        if sys.is_finalizing():  # never enter DuckDB while the interpreter shuts down
            return
        try:
            snap = self._query(COUNTS_SQL)
            self.counts = {k: int(v) for k, v in snap.iloc[0].items()}
        except Exception as exc:  # a busy or damaged catalog: /health keeps answering
            log.warning("store counts not refreshed: %s", str(exc).splitlines()[0] if str(exc) else exc)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.refresh()

    def close(self) -> None:
        """Stop refreshing and wait for a refresh in progress (a daemon thread left inside DuckDB at
        interpreter exit can abort the process)."""
        self._stop.set()
        _RUNNING.discard(self)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


#: StoreCounts whose thread runs; closed at interpreter exit when the app's lifespan never ended
#: (an app used without its lifespan, e.g. a TestClient outside ``with``). Without this, a refresh
#: that started during interpreter shutdown left a daemon thread inside DuckDB, and the process
#: aborted with "FATAL: exception not rethrown" after its work was done.
_RUNNING: weakref.WeakSet[StoreCounts] = weakref.WeakSet()


@atexit.register
def _close_running() -> None:
    for counts in list(_RUNNING):
        counts.close()
