"""One catalog connection per process: the connection cache behind :meth:`store.Store.session`.

DuckDB lets several processes open a database file read-only at once, or one process read-write,
and refuses two connections of different configurations to one file inside a process. Opening the
file costs tens of milliseconds (more on a large catalog), which a command running hundreds of
queries paid for each one (22.5 % of a logreg ``evaluate``). Inside a session the thread keeps one
read-only connection open and every read of the block uses it:

- reads use the locked-down read-only connection (:meth:`store.Store.connect` with
  ``read_only=True``), which other processes' readers share;
- before each read the thread checks whether another process holds the store lock (a writer,
  :func:`store.locking.writer_active`); if so it closes its connection and waits for the writer to
  finish, so a writer never waits for a whole read-only command (``evaluate`` of a long grid);
- a write takes the store lock, closes the kept connection (DuckDB: one configuration of a file per
  process) and opens a read-write connection for its block only. ``embed`` records written chunks
  in batches (one transaction per 16 chunks or 5 s), so other processes read between batches.

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
    uses
        Open ``with store.connect(read_only=True)`` blocks on the kept connection (it is not
        closed under them).
    con, mode
        The kept connection and whether it is read-only (``"ro"``) or read-write (``"rw"``).
    opened
        How many connections this state opened (benchmarks and tests count them).
    """

    depth: int = 0
    writing: int = 0
    uses: int = 0
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
