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
import os
from pathlib import Path

import numpy as np
import zarr

__all__ = ["crc32c", "raw_chunk_dir", "read_raw_rows"]


def raw_chunk_dir(arr: zarr.Array) -> tuple[Path | None, bool]:
    """``(directory of the chunk files, chunks carry a CRC32C)`` when the chunks can be read as raw
    float32 bytes, else ``(None, False)``.

    True for the arrays :func:`store.embeddings.ensure_array` writes on a local disk: one chunk
    spans the full width, the ``bytes`` codec little-endian, no compressor (optionally
    ``crc32c``), default ``c/<row>/<col>`` keys.
    """
    from zarr.codecs import BytesCodec, Crc32cCodec
    from zarr.storage import LocalStore

    meta = arr.metadata
    try:
        codecs = tuple(meta.codecs)
        simple = (
            isinstance(arr.store, LocalStore)
            and arr.dtype == np.dtype("float32")
            and arr.chunks[1] == arr.shape[1]
            and isinstance(codecs[0], BytesCodec)
            and str(getattr(codecs[0].endian, "value", codecs[0].endian)) == "little"
            and (len(codecs) == 1 or (len(codecs) == 2 and isinstance(codecs[1], Crc32cCodec)))
            and getattr(meta.chunk_key_encoding, "name", "") == "default"
            and getattr(meta.chunk_key_encoding, "separator", "") == "/"
        )
    except (AttributeError, IndexError):  # zarr v2 metadata or another layout: read through zarr
        return None, False
    if not simple:
        return None, False
    return Path(str(arr.store.root)) / arr.path / "c", len(codecs) == 2


#: threads reading chunk files at once (``os.readv`` and the CRC release the GIL); see
#: ``benchmarks/bench_store_read.py --threads``
READ_THREADS = 2
#: fewer chunks than this are read on one thread (a thread's start costs more than it saves)
MIN_CHUNKS_PER_THREAD = 8


def read_raw_rows(
    arr: zarr.Array,
    base: Path,
    *,
    crc: bool,
    out: np.ndarray,
    pos: np.ndarray,
    sel: np.ndarray,
    threads: int | None = None,
) -> None:
    """Fill ``out[pos]`` with rows ``sel`` of ``arr`` read from the chunk files under ``base``.

    Parameters
    ----------
    arr
        The array ``(n_rows, dim)`` (read through zarr only for a chunk whose file is not usable).
    base
        Its chunk directory (:func:`raw_chunk_dir`).
    crc
        Whether the chunk files end with a CRC32C, which is then checked.
    out
        float32 ``(n, dim)``, C-contiguous; written in place.
    pos, sel
        int64 ``(m,)``: output rows and array rows, ``sel`` sorted ascending and within the array.
    threads
        Threads reading chunks at once (default :data:`READ_THREADS`; one per
        :data:`MIN_CHUNKS_PER_THREAD` chunks at most). Each reads its own run of chunks into
        disjoint rows of ``out``.

    Notes
    -----
    A chunk needed whole at a contiguous run of ``out`` (the usual case: a dataset's cells are a
    contiguous run of ``cell_uid``) is read straight into ``out``; a chunk only partly needed is
    read into a reused scratch buffer (fresh pages cost more than the copy) and its rows copied.
    The per-chunk bookkeeping is vectorised, so the loop does one ``open``/``readv``/``close`` per
    chunk. A chunk file that was never written reads as NaN.
    """
    rows = int(arr.chunks[0])
    chunk = sel // rows
    starts = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1]])
    ends = np.r_[starts[1:], sel.size]
    n = ends - starts
    first = sel[starts] - chunk[starts] * rows
    contiguous = (sel[ends - 1] - sel[starts] == n - 1) & (pos[ends - 1] - pos[starts] == n - 1)
    whole = contiguous & (n == rows) & (first == 0)
    groups = list(zip(
        starts.tolist(), ends.tolist(), chunk[starts].tolist(), first.tolist(),
        pos[starts].tolist(), contiguous.tolist(), whole.tolist(), strict=True,
    ))  # fmt: skip
    k = max(1, min(READ_THREADS if threads is None else threads, len(groups) // MIN_CHUNKS_PER_THREAD))
    if k == 1:
        _read_groups(arr, base, crc, out, pos, sel, groups)
        return
    from concurrent.futures import ThreadPoolExecutor

    bounds = np.linspace(0, len(groups), k + 1).astype(int)
    with ThreadPoolExecutor(k) as pool:
        jobs = [
            pool.submit(_read_groups, arr, base, crc, out, pos, sel, groups[lo:hi])
            for lo, hi in itertools.pairwise(bounds.tolist())
        ]
        for job in jobs:
            job.result()


def _read_groups(arr, base: Path, crc: bool, out, pos, sel, groups: list[tuple]) -> None:
    """One thread's share of :func:`read_raw_rows`: its chunks, its scratch buffer."""
    rows, dim = int(arr.chunks[0]), int(arr.shape[1])
    scratch = np.empty((rows, dim), dtype="<f4") if not all(g[6] for g in groups) else None
    tail = bytearray(5)
    nbytes, prefix = rows * dim * 4, f"{base}{os.sep}"
    for a, b, c, f, p0, is_contig, is_whole in groups:
        target = out[p0 : p0 + rows] if is_whole else scratch
        if not _read_file(f"{prefix}{c}{os.sep}0", target, nbytes, tail, crc=crc):
            block = np.asarray(arr[c * rows : min((c + 1) * rows, arr.shape[0])], dtype=np.float32)
            target[: len(block)] = block
        if is_whole:
            continue
        if is_contig:
            out[p0 : p0 + (b - a)] = target[f : f + (b - a)]
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
