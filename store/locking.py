"""One store, several processes: a store lock for writers, bounded waits for everyone.

DuckDB lets one process at a time open a database file for writing (and no reader while a
writer holds it). scdrugmap therefore

- opens a catalog connection only for the duration of one operation and, when another process
  holds the file, retries for a bounded time, saying once on stderr ``store is busy (PID N:
  command), waiting…`` (:func:`retry_busy`);
- serialises writers with a store-level lock file, ``<store>/.lock`` (``fcntl.flock``, released
  by the kernel when the holder dies, holding the holder's pid and command line):
  :meth:`store.Store.transaction` takes it for one transaction, commands that read state before
  they write (``ingest``, ``embed``, ``import-embeddings``) hold it for the whole command
  (:func:`store_lock`), so two writers of one dataset or revision run one after the other and
  the second finds the rows done.

The wait is bounded (default :data:`DEFAULT_TIMEOUT_S`, ``--wait-timeout`` / ``SCDRUGMAP_WAIT_TIMEOUT``);
``--no-wait`` refuses at once instead. Both raise :class:`store.errors.StoreBusyError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import duckdb

from scdrugmap.store.errors import StoreBusyError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "configure",
    "holder",
    "is_lock_conflict",
    "retry_busy",
    "settings",
    "store_lock",
    "wait_for_writer",
    "writer_active",
]

T = TypeVar("T")

#: seconds a command waits for a busy store before giving up
DEFAULT_TIMEOUT_S = 600.0
LOCK_NAME = ".lock"
_PID = re.compile(r"\(PID (\d+)\)")
_settings: dict[str, object] = {
    "timeout_s": float(os.environ.get("SCDRUGMAP_WAIT_TIMEOUT", DEFAULT_TIMEOUT_S)),
    "no_wait": False,
    "command": " ".join(
        [
            "scdrugmap" if Path(sys.argv[0]).name in ("scdrugmap", "cli.py") else Path(sys.argv[0]).name,
            *sys.argv[1:],
        ]
    )[:300],
}
_held: dict[str, list] = {}  # resolved store path → [fd, depth]
_guard = threading.Lock()


def configure(
    *, timeout_s: float | None = None, no_wait: bool | None = None, command: str | None = None
) -> None:
    """Set this process's waiting policy (the CLI's ``--wait-timeout`` / ``--no-wait``).

    Parameters
    ----------
    timeout_s
        Most seconds to wait for a busy store.
    no_wait
        Refuse at once when the store is busy.
    command
        What this process is doing, recorded in the lock file for others' messages.
    """
    if timeout_s is not None:
        _settings["timeout_s"] = float(timeout_s)
    if no_wait is not None:
        _settings["no_wait"] = bool(no_wait)
    if command is not None:
        _settings["command"] = command[:300]


def settings() -> tuple[float, bool]:
    """The current ``(timeout_s, no_wait)``."""
    return float(_settings["timeout_s"]), bool(_settings["no_wait"])


def _cmdline(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    parts = [p.decode(errors="replace") for p in raw.split(b"\0") if p]
    if len(parts) > 1 and Path(parts[0]).name.startswith("python") and parts[1].endswith("scdrugmap"):
        parts = parts[1:]
    return " ".join([Path(parts[0]).name, *parts[1:]])[:120] if parts else None


def holder(store_path: str | Path, pid: int | None = None) -> str:
    """``PID N: command`` of the process holding a store (from its lock file or ``/proc``).

    Parameters
    ----------
    store_path
        The store directory.
    pid
        The pid DuckDB reported, when known.
    """
    with contextlib.suppress(OSError, ValueError):
        text = (Path(store_path) / LOCK_NAME).read_text().splitlines()
        if text and (pid is None or int(text[0]) == pid):
            return f"PID {int(text[0])}: {text[1] if len(text) > 1 else '?'}"
    if pid is None:
        return "another process"
    return f"PID {pid}: {_cmdline(pid) or '?'}"


def is_lock_conflict(exc: BaseException) -> bool:
    """Whether a DuckDB error means another process holds the catalog file."""
    text = str(exc)
    return isinstance(exc, duckdb.IOException) and (
        "Could not set lock" in text or "Conflicting lock" in text
    )


def _busy(store_path: Path, who: str, timeout_s: float, no_wait: bool) -> StoreBusyError:
    if no_wait:
        msg = f"store {str(store_path)!r} is busy ({who}); run again when it has finished (or drop --no-wait to wait)"
    else:
        msg = (
            f"store {str(store_path)!r} is still busy ({who}) after {timeout_s:g} s; run again when it has "
            "finished or wait longer with --wait-timeout SECONDS"
        )
    return StoreBusyError(msg)


def _say_waiting(who: str) -> None:
    print(f"store is busy ({who}), waiting…", file=sys.stderr, flush=True)


def retry_busy(
    store_path: str | Path,
    fn: Callable[[], T],
    *,
    timeout_s: float | None = None,
    no_wait: bool | None = None,
) -> T:
    """Call ``fn`` (opening a catalog connection), retrying while another process holds the file.

    Parameters
    ----------
    store_path
        The store directory (for messages).
    fn
        Opens the connection.
    timeout_s, no_wait
        Override this process's policy (:func:`configure`).

    Raises
    ------
    StoreBusyError
        Still busy after the timeout, or at once with ``no_wait``.
    """
    default_timeout, default_no_wait = settings()
    timeout_s = default_timeout if timeout_s is None else timeout_s
    no_wait = default_no_wait if no_wait is None else no_wait
    deadline = time.monotonic() + timeout_s
    told = False
    delay = 0.05
    while True:
        try:
            return fn()
        except duckdb.IOException as exc:
            if not is_lock_conflict(exc):
                raise
            match = _PID.search(str(exc))
            pid = int(match.group(1)) if match else None
            if no_wait or time.monotonic() >= deadline:
                raise _busy(Path(store_path), holder(store_path, pid), timeout_s, no_wait) from None
            if not told:
                _say_waiting(holder(store_path, pid))
                told = True
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


@contextlib.contextmanager
def store_lock(
    store_path: str | Path,
    *,
    timeout_s: float | None = None,
    no_wait: bool | None = None,
    on_acquire: Callable[[], object] | None = None,
) -> Iterator[None]:
    """Hold the store's writer lock (``<store>/.lock``); re-entrant within a process.

    Parameters
    ----------
    store_path
        The store directory (must exist).
    timeout_s, no_wait
        Override this process's policy (:func:`configure`).
    on_acquire
        Called once when this process takes the lock (not on re-entry): the store's clean-up of
        crash debris (:func:`store.doctor.remove_debris`); its OS errors are ignored.

    Raises
    ------
    StoreBusyError
        Another process held the lock for longer than the timeout (or at all, with ``no_wait``).
    """
    key = str(Path(store_path).resolve())
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        fd = _acquire(Path(store_path), timeout_s, no_wait)
        with _guard:
            _held[key] = entry = [fd, 1]
        if on_acquire is not None:
            with contextlib.suppress(OSError):
                on_acquire()
    try:
        yield
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                with contextlib.suppress(OSError):
                    os.ftruncate(entry[0], 0)
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])


def _acquire(store_path: Path, timeout_s: float | None, no_wait: bool | None) -> int:
    default_timeout, default_no_wait = settings()
    timeout_s = default_timeout if timeout_s is None else timeout_s
    no_wait = default_no_wait if no_wait is None else no_wait
    fd = os.open(store_path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    told = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if no_wait or time.monotonic() >= deadline:
                    raise _busy(store_path, holder(store_path), timeout_s, no_wait) from None
                if not told:
                    _say_waiting(holder(store_path))
                    told = True
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{_settings['command']}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def writer_active(store_path: str | Path) -> bool:
    """Whether another process holds the store lock (a writer is writing or waiting for the file).

    Readers that keep a connection (:meth:`store.Store.session`) check this before each query and
    step aside, so a writer never waits for a whole read-only command.
    """
    key = str(Path(store_path).resolve())
    with _guard:
        if key in _held:  # this process is the writer
            return False
    try:
        fd = os.open(Path(store_path) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def wait_for_writer(store_path: str | Path, *, timeout_s: float | None = None) -> None:
    """Wait (bounded, saying once who) while another process holds the store lock.

    Raises
    ------
    StoreBusyError
        The writer held it for longer than the timeout (or at all, with ``--no-wait``).
    """
    default_timeout, no_wait = settings()
    timeout_s = default_timeout if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    told = False
    while writer_active(store_path):
        if no_wait or time.monotonic() >= deadline:
            raise _busy(Path(store_path), holder(store_path), timeout_s, no_wait)
        if not told:
            _say_waiting(holder(store_path))
            told = True
        time.sleep(0.05)
