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

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import duckdb

from scdrugmap.store.errors import StoreError

if TYPE_CHECKING:
    from scdrugmap.store.catalog import Store

__all__ = ["CatalogConnections", "SessionState", "state_for"]

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


class CatalogConnections:
    """Connections to a store's catalog (the part of :class:`store.Store` that opens DuckDB).

    Needs ``self.path``, ``self.catalog_path`` and ``self.busy_timeout_s`` from the store.
    """

    path: Path
    catalog_path: Path
    busy_timeout_s: float | None

    @contextlib.contextmanager
    def session(self) -> Iterator[Store]:
        """Keep one catalog connection for the block instead of one per query (re-entrant).

        Reads inside the block share one read-only connection, given up whenever another process
        holds the store lock (a writer); writes open their own read-write connection for their
        block, as outside a session (:mod:`store.connections`). Commands that run many queries (``evaluate``, ``embed``) run
        inside a session; the web service does not (its requests are short).

        Yields
        ------
        Store
            This store.
        """
        st = state_for(self.catalog_path)
        st.depth += 1
        try:
            yield self
        finally:
            st.depth -= 1
            if st.depth == 0:
                st.close()

    @contextlib.contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A DuckDB connection to the catalog, closed on exit.

        ``read_only=True`` also disables access to external files, extensions and
        attachments, so a query cannot write, copy, install or read anything else. Inside a
        :meth:`session` read-only connections are kept for the block (and given up while another
        process writes); read-write ones never outlive their block.
        """
        from scdrugmap.store.locking import wait_for_writer, writer_active

        st = state_for(self.catalog_path)
        if st.depth == 0 or not read_only:
            if st.con is not None and st.uses == 0:
                st.close()  # DuckDB allows one configuration of a file per process
            con = self._new_connection(read_only=read_only)
            st.opened += 1
            try:
                yield con
            finally:
                con.close()
            return
        if st.con is not None and st.uses == 0 and writer_active(self.path):
            st.close()  # step aside: another process is writing
        if st.con is None:
            wait_for_writer(self.path, timeout_s=self.busy_timeout_s)
            st.con, st.mode = self._new_connection(read_only=True), "ro"
            st.opened += 1
        st.uses += 1
        try:
            yield st.con
        finally:
            st.uses -= 1

    def _new_connection(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
        if read_only:
            if not self.catalog_path.exists():
                msg = f"no catalog at {str(self.catalog_path)!r}; ingest data first"
                raise StoreError(msg)
            config = {
                "enable_external_access": False,
                "autoload_known_extensions": False,
                "autoinstall_known_extensions": False,
            }
            con = self._open(read_only=True, config=config)
            con.execute("SET lock_configuration = true")
            return con
        return self._open(read_only=False, config={})

    def _open(self, *, read_only: bool, config: dict[str, Any]) -> duckdb.DuckDBPyConnection:
        """Open the catalog file, waiting (bounded) while another process holds it."""
        from scdrugmap.store.locking import retry_busy

        path = str(self.catalog_path)
        return retry_busy(
            self.path,
            lambda: duckdb.connect(path, read_only=read_only, config=config),
            timeout_s=self.busy_timeout_s,
        )

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the store's writer lock (``<store>/.lock``) for a block of reads and writes.

        Re-entrant; other writers wait (bounded) or refuse with ``--no-wait``
        (:mod:`store.locking`). :meth:`transaction` takes it for one transaction. Taking it
        removes temporary files of writers that died (:func:`store.doctor.remove_debris`).
        Inside a :meth:`session` the kept read-only connection is closed before waiting for the
        lock, and the read-write connection is closed when the lock is released.
        """
        from scdrugmap.store.doctor import remove_debris
        from scdrugmap.store.locking import store_lock

        st = state_for(self.catalog_path)
        if st.writing == 0 and st.con is not None and st.uses == 0:
            st.close()  # never hold the file while waiting for the lock another writer holds
        with store_lock(self.path, timeout_s=self.busy_timeout_s, on_acquire=lambda: remove_debris(self)):
            st.writing += 1
            try:
                yield
            finally:
                st.writing -= 1

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A write connection inside BEGIN/COMMIT (under the store lock); rolled back on any exception."""
        with self.writing(), self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
