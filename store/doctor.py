"""Crash debris and consistency: catalog ↔ dataset files ↔ Zarr arrays (``scdrugmap doctor``).

Temporary files carry the writer's pid in their name (``datasets/.<id>.h5ad.tmp-<pid>``,
``fits/.<revision>.tmp-<pid>.npz``); :func:`remove_debris` deletes those whose process is gone.
Every writer calls it when it takes the store lock (:meth:`store.Store.writing`), so a ``kill -9``
leaves nothing behind once the next command writes.

:func:`check_store` reports what does not agree and, with ``repair=True``, repairs what is safe:
orphan temporary files and dataset files without a catalog row are removed; an unreadable Zarr
chunk is deleted and its rows are marked not done (``embedded_cells``), so ``scdrugmap embed``
recomputes exactly them; a revision whose array is gone is marked not done. A dataset row
whose file is missing is only reported (re-ingest it).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scdrugmap.store.catalog import Store

__all__ = ["Finding", "check_store", "pid_alive", "remove_debris", "temporary_files"]

_TMP = re.compile(r"^\..+\.tmp-(\d+)(\.npz)?$")


@dataclass
class Finding:
    """One inconsistency: what, where, whether it was repaired (or can only be reported)."""

    kind: str
    path: str
    detail: str
    repaired: bool = False
    repairable: bool = True
    extra: dict = field(default_factory=dict, repr=False)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a pid reused by another process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_files(store: Store) -> list[tuple[Path, int]]:
    """``(path, writer pid)`` of the store's temporary files (datasets/, fits/)."""
    out = []
    for folder in (store.datasets_dir, store.fits_dir):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _TMP.match(p.name)
            if m and p.is_file():
                out.append((p, int(m.group(1))))
    return sorted(out)


def remove_debris(store: Store) -> list[Path]:
    """Delete temporary files whose writer process is gone; the removed paths."""
    removed = []
    for path, pid in temporary_files(store):
        if pid != os.getpid() and not pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def _n_obs(path: Path) -> int | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            obs = f["obs"]
            index = obs.attrs.get("_index", "_index")
            return int(obs[index].shape[0])
    except Exception:  # unreadable: reported by the caller
        return None


def _check_files(store: Store, temporary: list[tuple[Path, int]], repair: bool) -> list[Finding]:
    found: list[Finding] = []
    for path, pid in temporary:
        alive = pid == os.getpid() or pid_alive(pid)
        f = Finding("temporary file", str(path), f"left by PID {pid} ({'running' if alive else 'gone'})")
        f.repairable = not alive
        if repair and not alive:
            path.unlink(missing_ok=True)  # taking the store lock may have removed it already
            f.repaired = True
        found.append(f)
    rows = store.query(
        "SELECT d.dataset_id, COUNT(c.cell_uid) AS n FROM datasets d LEFT JOIN cells c USING (dataset_id) GROUP BY 1"
    )
    known = dict(zip(rows["dataset_id"], rows["n"], strict=True))
    for did, n in sorted(known.items()):
        path = store.dataset_file(did)
        if not path.exists():
            found.append(
                Finding(
                    "missing dataset file",
                    str(path),
                    f"dataset {did} is in the catalog; re-ingest it",
                    repairable=False,
                )
            )
            continue
        n_file = _n_obs(path)
        if n_file is None or n_file != n:
            what = "unreadable" if n_file is None else f"{n_file} cells in the file, {n} in the catalog"
            found.append(
                Finding(
                    "damaged dataset file",
                    str(path),
                    f"{what}; re-ingest {did} into a new store",
                    repairable=False,
                )
            )
    if store.datasets_dir.is_dir():
        for path in sorted(store.datasets_dir.glob("*.h5ad")):
            if path.stem not in known:
                f = Finding("orphan dataset file", str(path), "no catalog row (an interrupted ingest)")
                if repair:
                    path.unlink(missing_ok=True)
                    f.repaired = True
                found.append(f)
    return found


def _check_arrays(store: Store, repair: bool) -> list[Finding]:
    import numpy as np
    import zarr

    found: list[Finding] = []
    revs = store.query("SELECT revision, model, array_path FROM embeddings ORDER BY revision")
    root = None
    with contextlib.suppress(Exception):
        root = zarr.open_group(store.zarr_path, mode="r", zarr_format=3)
    for rev, model, array_path in revs.itertuples(index=False):
        path = array_path or f"{model}/{rev}/embedding"
        if path.startswith("embeddings.zarr/"):
            path = path.removeprefix("embeddings.zarr/")
        try:
            arr = root[path] if root is not None else None
        except Exception:
            arr = None
        if arr is None:
            n = store.query("SELECT COUNT(*) AS n FROM embedded_cells WHERE revision = ?", [rev])["n"].iloc[0]
            if n == 0:
                continue  # registered, nothing written yet
            f = Finding(
                "missing embedding array",
                str(store.zarr_path / path),
                f"revision {rev}: {n} rows recorded as done",
            )
            if repair:
                _forget_rows(store, rev, None)
                f.repaired = True
            found.append(f)
            continue
        rows = arr.chunks[0]
        for k in range(-(-arr.shape[0] // rows)):
            lo, hi = k * rows, min((k + 1) * rows, arr.shape[0])
            try:
                np.asarray(arr[lo:hi])
            except Exception as exc:  # damaged chunk: any decoder error
                chunk = store.zarr_path / path / "c" / str(k) / "0"
                f = Finding(
                    "damaged chunk", str(chunk), f"revision {rev}, rows {lo}–{hi - 1}: {type(exc).__name__}"
                )
                if repair:  # rows first: an interrupted repair leaves rows to recompute, never a hole
                    _forget_rows(store, rev, (lo, hi))
                    chunk.unlink(missing_ok=True)
                    f.repaired = True
                found.append(f)
    return found


def _forget_rows(store: Store, revision: str, rows: tuple[int, int] | None) -> None:
    with store.transaction() as con:
        if rows is None:
            con.execute("DELETE FROM embedded_cells WHERE revision = ?", [revision])
        else:
            con.execute(
                "DELETE FROM embedded_cells WHERE revision = ? AND cell_uid >= ? AND cell_uid < ?",
                [revision, *rows],
            )
        n = con.execute("SELECT COUNT(*) FROM embedded_cells WHERE revision = ?", [revision]).fetchone()[0]
        con.execute(
            "UPDATE embeddings SET rows_done = ?, status = CASE WHEN ? >= rows_selected THEN 'complete' "
            "ELSE 'partial' END WHERE revision = ?",
            [n, n, revision],
        )


def check_store(store: Store, *, repair: bool = False) -> list[Finding]:
    """Check catalog ↔ dataset files ↔ Zarr arrays; with ``repair`` fix what is safe.

    Parameters
    ----------
    store
        An opened store (the catalog must open; a damaged catalog fails earlier, with one line).
    repair
        Remove orphan temporary / dataset files and forget rows of unreadable chunks.

    Returns
    -------
    list of Finding
        Everything that does not agree (empty: the store is consistent).
    """
    temporary = temporary_files(store)
    with store.writing() if repair else contextlib.nullcontext():
        return _check_files(store, temporary, repair) + _check_arrays(store, repair)
