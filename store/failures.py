"""Every failure is one clear line: known failure families → a message naming the file and the fix.

The CLI's top-level handler (``cli._Group.invoke``) calls :func:`explain` for any exception
that is not one of scdrugmap's own (:class:`store.errors.ScDrugMapError`, already one line).
Known families — a busy store, a full disk, a damaged catalog, a damaged Zarr chunk, out of
memory, an unwritable output path, Ctrl-C — become one sentence; anything else becomes a
one-line summary plus the path of a file holding the full traceback. ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Failure", "check_writable", "explain", "write_traceback"]

_DAMAGED_CATALOG = (
    "not a valid duckdb database",
    "corrupt",
    "checksum",
    "failed to read database header",
    "serialization error",
    "the file is not a valid",
    "invalid database",
)


@dataclass(frozen=True)
class Failure:
    """A failure explained for the user: the one-line message and the exit status."""

    message: str
    exit_code: int = 1


def _frames(exc: BaseException) -> list[str]:
    out: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out += [f.filename for f in traceback.extract_tb(cur.__traceback__)]
        cur = cur.__cause__ or cur.__context__
    return out


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _os_error(exc: OSError, store: Path) -> str | None:
    name = exc.filename or exc.filename2
    where = repr(str(name)) if name else f"the store {str(store)!r}"
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return (
            f"disk full while writing {where}: free some space (or put the store on a larger disk with --store) "
            "and run the command again; the catalog is unchanged and an interrupted embed resumes"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where} ({exc.strerror}): choose a writable path or fix its permissions"
    if exc.errno == errno.ENAMETOOLONG:
        return f"file name too long: {where}; use a shorter name or id"
    if exc.errno == errno.ENOENT and name:
        return f"no such file or directory: {where}; create the folder first or give an existing path"
    if exc.errno == errno.EISDIR and name:
        return f"{where} is a directory; give a file path"
    return None


def explain(exc: BaseException, store: str | Path) -> Failure | None:
    """One line for a known failure family, or None.

    Parameters
    ----------
    exc
        The exception that ended the command.
    store
        The store directory the command used (named in messages).

    Returns
    -------
    Failure or None
        The message and exit status; None when the exception belongs to no known family.
    """
    import duckdb

    store = Path(store)
    chain = _chain(exc)
    if isinstance(exc, KeyboardInterrupt) or any(
        isinstance(e, duckdb.InterruptException) or str(e) == "Query interrupted" for e in chain
    ):
        return Failure(
            "interrupted (Ctrl-C); nothing was half-written — run the command again to finish", 130
        )
    for e in chain:
        if (
            isinstance(e, MemoryError)
            or type(e).__name__ == "OutOfMemoryError"
            or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))
        ):
            return Failure(
                "out of memory: use a smaller --batch-size, fewer datasets at once (--datasets / --where) or a "
                "machine with more memory; the store is unchanged (an interrupted embed resumes)"
            )
    for e in chain:
        if isinstance(e, OSError):
            text = _os_error(e, store)
            if text:
                return Failure(text)
    for e in chain:  # DuckDB reports a full disk as its own IOException
        if any(s in str(e) for s in ("No space left on device", "Disk quota exceeded")):
            return Failure(_os_error(OSError(errno.ENOSPC, "No space left on device"), store) or "disk full")
    catalog = store / "catalog.duckdb"
    for e in chain:
        if isinstance(e, duckdb.Error) and any(s in str(e).lower() for s in _DAMAGED_CATALOG):
            return Failure(
                f"the catalog {str(catalog)!r} is damaged or not a DuckDB file ({_first_line(e)}); restore it "
                "from a backup (or move it away and ingest again into a new store), then run `scdrugmap doctor`"
            )
    frames = _frames(exc)
    if any(f"{os.sep}zarr{os.sep}" in f or f"{os.sep}numcodecs{os.sep}" in f for f in frames):
        return Failure(
            f"a chunk of the embedding store {str(store / 'embeddings.zarr')!r} is damaged or unreadable "
            f"({type(exc).__name__}: {_first_line(exc)}); run `scdrugmap doctor --repair` to find it, then "
            "`scdrugmap embed` again to recompute its rows"
        )
    return None


def write_traceback(exc: BaseException, command: str) -> Path | None:
    """Write the full traceback of an unexpected failure to a file; its path (None if unwritable)."""
    folder = Path(os.environ.get("SCDRUGMAP_LOG_DIR", Path(tempfile.gettempdir()) / "scdrugmap-errors"))
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(f"{command}\n\n" + "".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return path


def check_writable(path: str | Path, *, what: str = "--out") -> Path:
    """Refuse an output file whose folder is missing or not writable, before any work is done.

    Raises
    ------
    store.errors.InputError
        The folder does not exist, is not a folder, or cannot be written; the path is a folder.
    """
    from scdrugmap.store.errors import InputError

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        msg = f"{what} {str(path)!r} is a folder; give a file name (e.g. {str(path / 'out.h5ad')!r})"
        raise InputError(msg)
    if not folder.is_dir():
        msg = f"{what} {str(path)!r}: the folder {str(folder)!r} does not exist; create it first (mkdir -p)"
        raise InputError(msg)
    if not os.access(folder, os.W_OK | os.X_OK):
        msg = f"{what} {str(path)!r}: the folder {str(folder)!r} is not writable; choose another location"
        raise InputError(msg)
    return path
