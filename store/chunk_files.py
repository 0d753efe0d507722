"""Reading the store's embedding chunks straight from their files (Zarr v3's documented layout).

The arrays :func:`store.embeddings.ensure_array` writes are uncompressed float32 with chunks spanning
the full width, so chunk ``i`` of a local array is the file ``c/i/0`` holding ``rows × dim``
little-endian float32 values followed by their CRC32C (Zarr v3 spec: default chunk key encoding,
``bytes`` and ``crc32c`` codecs). Reading those files into the output buffer skips zarr's codec
pipeline and its copies; a file that is not exactly one chunk, or whose checksum does not match,
is left to zarr (which then reports a damaged chunk as an error). Measured in
``benchmarks/bench_store_read.py``.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

__all__ = ["ChunkLayout", "crc32c", "layout_from_metadata", "layout_of", "read_raw_rows"]


@dataclass(frozen=True)
class ChunkLayout:
    """Where and how the chunk files of a raw-readable array lie.

    Attributes
    ----------
    base
        The array's chunk directory (``<array>/c``); chunk ``i`` is the file ``base/i/0``.
    shape
        ``(n_rows, dim)`` of the array.
    chunk_rows
        Rows per chunk (a chunk spans the full width).
    crc
        Whether each chunk file ends with its CRC32C.
    """

    base: Path
    shape: tuple[int, int]
    chunk_rows: int
    crc: bool


def layout_of(arr: zarr.Array) -> ChunkLayout | None:
    """The :class:`ChunkLayout` of an open array, or None when its chunks are not raw-readable.

    Raw-readable are the arrays :func:`store.embeddings.ensure_array` writes on a local disk: one
    chunk spans the full width, fill value NaN, the ``bytes`` codec little-endian, no compressor
    (optionally ``crc32c``), default ``c/<row>/<col>`` keys. Decided from the array's
    ``zarr.json`` by :func:`layout_from_metadata` (one set of rules for both ways in).
    """
    from zarr.storage import LocalStore

    if not isinstance(arr.store, LocalStore):
        return None
    return layout_from_metadata(Path(str(arr.store.root)) / arr.path)


def layout_from_metadata(array_dir: Path) -> ChunkLayout | None:
    """The :class:`ChunkLayout` read from an array's ``zarr.json`` alone, without opening it in zarr.

    Zarr v3 array metadata (``shape``, ``data_type``, ``chunk_grid``, ``chunk_key_encoding``,
    ``fill_value``, ``codecs``; zarr-specs v3.0 "Array metadata"). Opening an array in zarr costs
    ≈ 0.5 ms of hand-offs to its event-loop thread, a tenth of reading a 100 k-cell selection
    (``benchmarks/bench_store_read.py``).

    Returns
    -------
    ChunkLayout or None
        None when the file is missing or unreadable, or describes any other layout (another
        dtype, codec, key encoding or fill value, a chunk not spanning the full width, extensions
        such as storage transformers): those are read through zarr.
    """
    try:
        meta = json.loads((array_dir / "zarr.json").read_bytes())
        grid, keys = meta["chunk_grid"], meta["chunk_key_encoding"]
        codecs = [c["name"] for c in meta["codecs"]]
        shape = tuple(int(x) for x in meta["shape"])
        chunk = tuple(int(x) for x in grid["configuration"]["chunk_shape"])
        simple = (
            meta.get("zarr_format") == 3
            and meta.get("node_type") == "array"
            and meta.get("data_type") == "float32"
            and meta.get("fill_value") == "NaN"  # an unwritten chunk reads as NaN
            and not meta.get("storage_transformers")
            and grid.get("name") == "regular"
            and len(shape) == 2
            and chunk[1] == shape[1]
            and codecs in (["bytes"], ["bytes", "crc32c"])
            and meta["codecs"][0].get("configuration", {}).get("endian") == "little"
            and keys.get("name") == "default"
            and keys.get("configuration", {}).get("separator", "/") == "/"
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None
    if not simple:
        return None
    return ChunkLayout(array_dir / "c", (shape[0], shape[1]), chunk[0], len(codecs) == 2)


#: threads reading chunk files at once (``os.readv`` and the CRC release the GIL); see
#: ``benchmarks/bench_store_read.py --threads``
READ_THREADS = 2
#: fewer chunks than this are read on one thread (a hand-off costs more than it saves)
MIN_CHUNKS_PER_THREAD = 8


def read_raw_rows(
    layout: ChunkLayout,
    *,
    out: np.ndarray,
    pos: np.ndarray,
    sel: np.ndarray,
    read_chunk: Callable[[int], np.ndarray],
    threads: int | None = None,
) -> None:
    """Fill ``out[pos]`` with rows ``sel`` of an array read from its chunk files.

    Parameters
    ----------
    layout
        The array's chunk files (:func:`layout_of`, :func:`layout_from_metadata`).
    out
        float32 ``(n, dim)``, C-contiguous; written in place.
    pos, sel
        int64 ``(m,)``: output rows and array rows, ``sel`` sorted ascending and within the array.
    read_chunk
        ``read_chunk(i)`` returns chunk ``i`` (float32 ``(≤ chunk_rows, dim)``) through zarr; called
        only for a chunk whose file is not exactly one chunk or fails its checksum, so that zarr
        decides (and reports a damaged chunk as an error).
    threads
        Threads reading chunks at once (default :data:`READ_THREADS`; one per
        :data:`MIN_CHUNKS_PER_THREAD` chunks at most): the calling thread and threads of a pool
        kept for the process. Each reads its own run of chunks into disjoint rows of ``out``.

    Notes
    -----
    A chunk needed whole at a contiguous run of ``out`` (the usual case: a dataset's cells are a
    contiguous run of ``cell_uid``) is read straight into ``out``; a chunk only partly needed is
    read into a reused scratch buffer (fresh pages cost more than the copy) and its rows copied
    (with ``np.take`` when they go to a contiguous run of ``out``, as for sorted ``uids``).
    The per-chunk bookkeeping is vectorised, so the loop does one ``open``/``readv``/``close`` per
    chunk. A chunk file that was never written reads as NaN.
    """
    rows = layout.chunk_rows
    chunk = sel // rows
    starts = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1]])
    ends = np.r_[starts[1:], sel.size]
    n = ends - starts
    first = sel[starts] - chunk[starts] * rows
    run = pos[ends - 1] - pos[starts] == n - 1  # the chunk's rows go to a contiguous run of out
    contiguous = run & (sel[ends - 1] - sel[starts] == n - 1)
    whole = contiguous & (n == rows) & (first == 0)
    groups = list(zip(
        starts.tolist(), ends.tolist(), chunk[starts].tolist(), first.tolist(),
        pos[starts].tolist(), run.tolist(), contiguous.tolist(), whole.tolist(), strict=True,
    ))  # fmt: skip
    k = max(1, min(READ_THREADS if threads is None else threads, len(groups) // MIN_CHUNKS_PER_THREAD))
    if k == 1:
        _read_groups(layout, read_chunk, out, pos, sel, groups)
        return
    from concurrent.futures import wait

    bounds = np.linspace(0, len(groups), k + 1).astype(int).tolist()
    pool = _reader_pool(k - 1)
    jobs = [
        pool.submit(_read_groups, layout, read_chunk, out, pos, sel, groups[lo:hi])
        for lo, hi in itertools.pairwise(bounds[1:])
    ]
    try:  # the calling thread reads the first share itself (one hand-off fewer)
        _read_groups(layout, read_chunk, out, pos, sel, groups[: bounds[1]])
    finally:
        wait(jobs)  # never return (or raise) while a thread still writes into ``out``
    for job in jobs:
        job.result()


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool)
_POOL_LOCK = threading.Lock()


def _reader_pool(workers: int) -> ThreadPoolExecutor:
    """The process's chunk-reading threads, ``workers`` at least.

    Kept between reads: starting the threads for every read cost a tenth of a 100 k-cell read
    (``benchmarks/bench_store_read.py``). Made again when more threads are asked for and in a
    forked child (:func:`_forget_pool_in_child`); a replaced pool is never shut down (a read may
    still be submitting to it), its idle threads end once it is garbage.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] < workers:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = (workers, ThreadPoolExecutor(workers, thread_name_prefix="scdrugmap-read"))
        return _POOL[1]


def _forget_pool_in_child() -> None:
    """After ``os.fork`` the child has none of the pool's threads, and the lock may be held by a
    thread that does not exist there: start both afresh."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _read_groups(layout: ChunkLayout, read_chunk, out, pos, sel, groups: list[tuple]) -> None:
    """One thread's share of :func:`read_raw_rows`: its chunks, its scratch buffer."""
    rows, dim = layout.chunk_rows, layout.shape[1]
    scratch = np.empty((rows, dim), dtype="<f4") if not all(g[7] for g in groups) else None
    tail = bytearray(5)
    nbytes, prefix = rows * dim * 4, f"{layout.base}{os.sep}"
    for a, b, c, f, p0, is_run, is_contig, is_whole in groups:
        target = out[p0 : p0 + rows] if is_whole else scratch
        if not _read_file(f"{prefix}{c}{os.sep}0", target, nbytes, tail, crc=layout.crc):
            block = np.asarray(read_chunk(c), dtype=np.float32)
            target[: len(block)] = block
        if is_whole:
            continue
        if is_contig:
            out[p0 : p0 + (b - a)] = target[f : f + (b - a)]
        elif is_run:  # rows picked from the chunk straight into their run of out (no temporary)
            np.take(target, sel[a:b] - c * rows, axis=0, out=out[p0 : p0 + (b - a)], mode="clip")
        else:
            out[pos[a:b]] = target[sel[a:b] - c * rows]


def _read_file(path: str, buf: np.ndarray, nbytes: int, tail: bytearray, *, crc: bool) -> bool:
    """Fill ``buf`` (``nbytes``) from one chunk file and check its CRC32C; False when the file is not
    exactly one chunk (e.g. a writer is replacing it) or the checksum does not match."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        buf.fill(np.nan)
        return True
    try:
        view = memoryview(buf).cast("B")
        got = os.readv(fd, [view, tail])
    finally:
        os.close(fd)
    if got != nbytes + (4 if crc else 0):
        return False
    return not crc or crc32c(view) == int.from_bytes(tail[:4], "little")


def crc32c(data: memoryview) -> int:
    """CRC32C of ``data``: ``fastcrc`` (hardware CRC instructions, ≈ 11 GB/s here) when installed,
    else ``google_crc32c`` (zarr's own dependency; ≈ 1.5 GB/s here, 70 % of a read's time)."""
    global _CRC32C
    if _CRC32C is None:
        try:
            from fastcrc import crc32

            _CRC32C = crc32.iscsi
        except ImportError:  # pragma: no cover - fastcrc is a dependency; kept for other installs
            import google_crc32c

            _CRC32C = google_crc32c.value
    return int(_CRC32C(data))


_CRC32C = None
