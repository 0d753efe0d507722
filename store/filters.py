"""User filters (``--where``) as one read-only SQL expression, never pasted into a write.

A filter the user types (``scdrugmap datasets --where``, ``embed --where``, ``results --where``,
``prompt --where``, ``analyze … --where``) is checked here and evaluated on its own: it must be a
single SQL expression — no ``;``, no comments, balanced parentheses, and DuckDB's parser must see
``SELECT … WHERE (<expr>)`` as exactly one ``SELECT`` statement — and it runs on the catalog's
read-only connection (external access disabled, :meth:`store.Store.connect`) with a time limit.
Callers get the matching keys and use them as *bound parameters* in their own statements, so no
user text ever reaches a connection that can write.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import duckdb

from scdrugmap.store.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from scdrugmap.store.catalog import Store

__all__ = ["FORBIDDEN_FUNCTIONS", "check_expression", "check_query", "matching_keys", "run_user_sql"]

#: functions that read files, URLs, the environment, secrets or other databases
FORBIDDEN_FUNCTIONS = re.compile(
    r"\b(read_\w+|\w+_scan|glob|sniff_csv|parquet_\w+|getenv|duckdb_secrets|which_secret|"
    r"sqlite_\w+|postgres_\w+|mysql_\w+|iceberg_\w+|delta_\w+|st_read\w*|httpfs\w*|load_\w+|"
    r"install_\w+|query_table|query)\s*\(",
    re.IGNORECASE,
)
#: string literals and quoted identifiers ('…' with '' escapes, "…" with "" escapes)
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
#: tables a filter may be evaluated on, with their key column
FILTER_TABLES = {"datasets": "dataset_id", "eval_runs": "run_id"}
#: seconds a filter may run before it is interrupted
FILTER_TIME_LIMIT_S = 30.0


def _strip_quoted(text: str) -> str:
    return _QUOTED.sub("''", text)


def check_query(sql: str) -> None:
    """Refuse anything but one read-only ``SELECT``-type statement (the ``scdrugmap sql`` guard).

    Parameters
    ----------
    sql
        The user's statement.

    Raises
    ------
    InputError
        Empty text, a parse error, several statements, a statement that is not a query, or a call
        of a function that reads files, the environment or secrets.
    """
    if not sql or not sql.strip():
        msg = "empty query; give one SELECT statement"
        raise InputError(msg)
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        msg = f"query does not parse: {str(exc).splitlines()[0]}"
        raise InputError(msg) from exc
    if len(statements) != 1:
        msg = f"give exactly one statement (got {len(statements)}); the catalog is read-only here"
        raise InputError(msg)
    if statements[0].type != duckdb.StatementType.SELECT:
        name = str(statements[0].type).rsplit(".", 1)[-1]
        msg = f"{name} statements are refused: the catalog is read-only here; only SELECT-style queries run"
        raise InputError(msg)
    hit = FORBIDDEN_FUNCTIONS.search(_strip_quoted(sql))
    if hit:
        msg = f"{hit.group(1)}() is refused: queries may read the catalog only (no files, environment or secrets)"
        raise InputError(msg)


def check_expression(expr: str, *, table: str = "datasets", what: str = "--where") -> str:
    """Check that ``expr`` is one SQL expression over ``table`` and nothing else.

    Parameters
    ----------
    expr
        The user's filter, e.g. ``"tissue = 'Cell line' AND drug_class = 'targeted'"``.
    table
        Table the expression filters (a key of :data:`FILTER_TABLES`).
    what
        Name of the option in messages.

    Returns
    -------
    str
        The expression, stripped.

    Raises
    ------
    InputError
        Empty text, ``;``, comments, unbalanced parentheses, or anything DuckDB's parser does not
        see as ``SELECT … FROM table WHERE (<expr>)`` — one ``SELECT`` statement.
    """
    if table not in FILTER_TABLES:
        msg = f"filters apply to {sorted(FILTER_TABLES)}, not {table!r}"
        raise InputError(msg)
    text = (expr or "").strip()
    if not text:
        msg = f"empty {what} filter; give one SQL expression, e.g. \"tissue = 'Cell line'\""
        raise InputError(msg)
    code = _strip_quoted(text)
    if any(bad in code for bad in (";", "--", "/*", "$")):
        msg = f"{what} must be one SQL expression, without ';', '$' or comments: {text!r}"
        raise InputError(msg)
    depth = 0
    for ch in code:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            break
    if depth != 0 or code.count("'") % 2 or code.count('"') % 2:
        msg = f"{what} must be one SQL expression with balanced parentheses and quotes: {text!r}"
        raise InputError(msg)
    try:
        check_query(f"SELECT {FILTER_TABLES[table]} FROM {table} WHERE ({text})")
    except InputError as exc:
        msg = f"bad {what} expression {text!r}; it must be one SQL expression over the {table} table ({exc})"
        raise InputError(msg) from None
    return text


def matching_keys(store: Store, expr: str, *, table: str = "datasets", what: str = "--where") -> list[Any]:
    """Keys of the rows of ``table`` that a user filter selects, evaluated read-only.

    Parameters
    ----------
    store
        The store.
    expr
        The filter (checked with :func:`check_expression`).
    table
        ``datasets`` (keys: ``dataset_id``) or ``eval_runs`` (``run_id``).
    what
        Name of the option in messages.

    Returns
    -------
    list
        Matching keys, sorted; use them as a bound parameter (``list_contains(?, key)``).

    Raises
    ------
    InputError
        A refused or failing filter (DuckDB's message, one line), or one that ran past
        :data:`FILTER_TIME_LIMIT_S`.
    """
    text = check_expression(expr, table=table, what=what)
    key = FILTER_TABLES[table]
    stopped = threading.Event()
    try:
        with store.connect(read_only=True) as con, _time_limit(con, FILTER_TIME_LIMIT_S, stopped.set):
            rows = con.execute(f"SELECT DISTINCT {key} FROM {table} WHERE ({text}) ORDER BY 1").fetchall()
    except duckdb.Error as exc:
        if stopped.is_set():
            msg = f"{what} filter stopped after {FILTER_TIME_LIMIT_S:g} s: {text!r}"
        else:
            msg = f"bad {what} expression {text!r}: {str(exc).splitlines()[0]}"
        raise InputError(msg) from exc
    return [r[0] for r in rows]


@contextlib.contextmanager
def _time_limit(
    con: duckdb.DuckDBPyConnection, seconds: float | None, on_stop: Callable[[], None]
) -> Iterator[None]:
    """Interrupt ``con``'s query after ``seconds`` (None: no limit), calling ``on_stop`` first."""
    if seconds is None:
        yield
        return

    def stop() -> None:
        on_stop()
        con.interrupt()

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def run_user_sql(
    store: Store, sql: str, *, limit: int | None = 10_000, time_limit_s: float | None = None
) -> pd.DataFrame:
    """Run one checked read-only query (:func:`check_query`) on the catalog's read-only connection.

    Parameters
    ----------
    store
        The store.
    sql
        The user's statement.
    limit
        Most rows returned (None: all).
    time_limit_s
        Interrupt the query after this many seconds (None: no limit).

    Returns
    -------
    pandas.DataFrame
        The rows.

    Raises
    ------
    InputError
        A refused statement, a failing query (DuckDB's message, one line), or the time limit.
    KeyboardInterrupt
        Ctrl-C during the query (the CLI prints one line).
    """
    if time_limit_s is not None and time_limit_s <= 0:
        msg = f"the time limit must be positive, got {time_limit_s:g} s"
        raise InputError(msg)
    check_query(sql)
    stopped = threading.Event()

    def run(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
        rel = con.sql(sql)
        if rel is None:
            msg = "the statement returned no rows; `scdrugmap sql` only runs read-only queries"
            raise InputError(msg)
        return (rel.limit(limit) if limit is not None else rel).df()

    ctrl_c = threading.Event()
    try:
        with (
            store.connect(read_only=True) as con,
            _time_limit(con, time_limit_s, stopped.set),
            _interrupt_on_ctrl_c(con, ctrl_c.set),
        ):
            return run(con)
    except (duckdb.InterruptException, RuntimeError) as exc:  # Ctrl-C inside DuckDB: "Query interrupted"
        if not isinstance(exc, duckdb.Error) and "interrupted" not in str(exc).lower():
            raise
        if stopped.is_set() and not ctrl_c.is_set():
            msg = f"query stopped after the time limit of {time_limit_s:g} s; narrow it, add a LIMIT or raise --time-limit"
            raise InputError(msg) from exc
        raise KeyboardInterrupt from exc
    except duckdb.Error as exc:
        first = str(exc).splitlines()[0]
        msg = (
            f"query refused or failed: {first} (the catalog is read-only here; only SELECT-style queries run)"
        )
        raise InputError(msg) from exc


@contextlib.contextmanager
def _interrupt_on_ctrl_c(con: duckdb.DuckDBPyConnection, on_stop: Callable[[], None]) -> Iterator[None]:
    """Stop ``con``'s query at once on Ctrl-C, even while the main thread is inside DuckDB.

    The signal's C-level handler writes to a wakeup pipe (:func:`signal.set_wakeup_fd`); a watcher
    thread reads it and interrupts the connection. Outside the main thread this does nothing.
    """
    import os
    import select
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:
        os.close(r)
        os.close(w)
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if select.select([r], [], [], 0.2)[0]:
                os.read(r, 64)
                on_stop()
                con.interrupt()
                return

    watcher = threading.Thread(target=watch, name="scdrugmap-ctrl-c", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        signal.set_wakeup_fd(previous)
        os.close(r)
        os.close(w)
