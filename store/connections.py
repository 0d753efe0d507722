"""One catalog connection per process: the connection cache behind :meth:`store.Store.session`.

DuckDB lets several processes open a database file read-only at once, or one process read-write,
and refuses two connections of different configurations to one file inside a process. Opening the
file costs tens of milliseconds (more on a large catalog), which a command running hundreds of
queries paid for each one (22.5 % of a logreg ``evaluate``). Inside a session the thread keeps one
connection open and every query and transaction of the block uses it:

- reads use the locked-down read-only connection (:meth:`store.Store.connect` with
  ``read_only=True``), which other processes' readers share;
- a write takes the store lock first and only then opens the read-write connection. Before waiting
  for the lock the thread closes its read-only connection, so two sessions that both want to write
  cannot wait on each other (each would otherwise hold the file while waiting for the lock the
  other holds). The read-write connection lives as long as this thread holds the store lock (a
  whole ``embed`` command, or one transaction) and is closed when the lock is released, so readers
  of other processes get in between writes as before.

Outside a session every operation opens and closes its own connection (the web service's model:
requests are short and many processes share the store).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb

__all__ = ["SessionState", "state_for"]

Mode = Literal["ro", "rw"]


@dataclass
class SessionState:
    """One thread's session on one catalog file.

    Attributes
    ----------
    depth
        Nesting of :meth:`store.Store.session` blocks (0: no session, connections are not kept).
    writing
        Nesting of :meth:`store.Store.writing` blocks (the store lock held by this thread).
    in_tx
        Open :meth:`store.Store.transaction` blocks on the kept connection (a nested one gets a
        connection of its own).
    con, mode
        The kept connection and whether it is read-only (``"ro"``) or read-write (``"rw"``).
    opened
        How many connections this state opened (benchmarks and tests count them).
    """

    depth: int = 0
    writing: int = 0
    in_tx: int = 0
    con: duckdb.DuckDBPyConnection | None = None
    mode: Mode | None = None
    opened: int = field(default=0)

    def close(self) -> None:
        """Close the kept connection (if any)."""
        if self.con is not None:
            con, self.con, self.mode = self.con, None, None
            con.close()


_local = threading.local()


def state_for(catalog_path: Path) -> SessionState:
    """This thread's :class:`SessionState` for ``catalog_path`` (created empty on first use)."""
    states = getattr(_local, "states", None)
    if states is None:
        states = _local.states = {}
    key = str(Path(catalog_path).resolve())
    st = states.get(key)
    if st is None:
        st = states[key] = SessionState()
    return st
