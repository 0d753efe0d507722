"""``POST /sql``: one read-only statement, with a row limit and a time limit.

Three layers: (1) DuckDB's own parser must see exactly one ``SELECT``-type statement (so
INSERT/UPDATE/DELETE/CREATE/DROP/ALTER/ATTACH/DETACH/COPY/EXPORT/INSTALL/LOAD/PRAGMA/SET/CALL/
transactions are refused before anything runs); (2) table functions and scalar functions that
read files, the environment or secrets are refused by name; (3) the statement runs on the
catalog's read-only connection with external access disabled (:meth:`store.Store.connect`), so
anything that slips through still cannot write or read outside the catalog. A timer thread
interrupts the query after the time limit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import duckdb
import pandas as pd

from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError
from scdrugmap.store.filters import check_query

__all__ = ["SqlResult", "check_statement", "run_sql"]

#: the ``/sql`` guard is the ``scdrugmap sql`` / ``--where`` guard (one place: :mod:`scdrugmap.store.filters`)
check_statement = check_query


@dataclass(frozen=True)
class SqlResult:
    """Rows of a ``/sql`` query.

    Attributes
    ----------
    frame
        At most ``limit`` rows.
    truncated
        True when the query had more rows than the limit.
    elapsed_s
        Wall time of the query, seconds.
    """

    frame: pd.DataFrame
    truncated: bool
    elapsed_s: float


def run_sql(store: Store, sql: str, *, limit: int, time_limit_s: float) -> SqlResult:
    """Run one checked read-only query on the catalog.

    Parameters
    ----------
    store
        The store.
    sql
        The statement (checked with :func:`check_statement`).
    limit
        Most rows returned.
    time_limit_s
        The query is interrupted after this many seconds.

    Raises
    ------
    InputError
        A refused statement, a failing query (DuckDB's message, one line), or the time limit.
    """
    import time

    check_statement(sql)
    timed_out = threading.Event()
    t0 = time.perf_counter()
    try:
        with store.connect(read_only=True) as con:

            def stop() -> None:
                timed_out.set()
                con.interrupt()

            timer = threading.Timer(time_limit_s, stop)
            timer.daemon = True
            timer.start()
            try:
                rel = con.sql(sql)
                frame = rel.limit(limit + 1).df() if rel is not None else pd.DataFrame()
            finally:
                timer.cancel()
    except duckdb.Error as exc:
        if timed_out.is_set():
            msg = f"query stopped after the time limit of {time_limit_s:g} s; narrow it or add a LIMIT"
            raise InputError(msg) from exc
        msg = f"query refused or failed: {str(exc).splitlines()[0]}"
        raise InputError(msg) from exc
    truncated = len(frame) > limit
    return SqlResult(frame.iloc[:limit], truncated, time.perf_counter() - t0)
