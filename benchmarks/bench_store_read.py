"""Store read throughput: rows of an embedding selected by SQL vs ``np.load`` of the same bytes.

A store-shaped Zarr array (default chunking, ≥ 1 MiB full-width chunks, float32) of ``--cells`` rows
× ``--dim`` columns and a DuckDB ``cells`` table with a category; ``--fraction`` of the cells are
selected by a SQL filter (a random category, so the rows are spread over every chunk) and read
with :func:`store.embeddings.read_rows`. The baseline is ``np.load`` of an ``.npy`` file holding
exactly those rows (the same bytes, no selection work). Both are timed in-process, best of
``--repeat``; the target (issue 18) is read_rows ≥ 0.5 × np.load throughput. Opening the array
(zarr parses its metadata once per array and process) is timed apart and reported both ways, and
:func:`store.embeddings.read_embedding` (what ``evaluate`` calls: the chunk layout read from the
array's ``zarr.json``, no zarr open) is timed whole. The floor is the time to read every chunk file
holding a selected row once, on the same threads, into a reused buffer, with no checksum and no
copy into the output: no read that works chunk by chunk can be faster than that.

Usage::

    python benchmarks/bench_store_read.py --cells 100000 --dim 256 --fraction 0.3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np

from scdrugmap.store import chunk_files
from scdrugmap.store.catalog import Store
from scdrugmap.store.embeddings import ensure_array, open_array, read_embedding, read_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--selection",
        choices=("category", "scattered"),
        default="category",
        help="category: whole datasets (contiguous cell_uids, the usual case); scattered: a random subset",
    )
    ap.add_argument("--threads", type=int, default=None, help="chunk-reading threads (default READ_THREADS)")
    args = ap.parse_args()
    if args.threads is not None:
        chunk_files.READ_THREADS = args.threads
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "store", create=True)
        X = rng.normal(size=(args.cells, args.dim)).astype(np.float32)
        arr = ensure_array(store, "bench", "r0", dim=args.dim, n_rows=args.cells)
        arr[:] = X
        con = duckdb.connect()
        # datasets are ingested whole, so their cells are contiguous runs of cell_uid (60 datasets of
        # catalogue-like uneven sizes); a category value picks whole datasets
        sizes = rng.dirichlet(np.full(60, 0.7)) * args.cells
        bounds = np.r_[0, np.cumsum(sizes).astype(np.int64)[:-1], args.cells]
        dataset = np.repeat(np.arange(60), np.diff(bounds))
        picked_ds = set(rng.permutation(60)[: max(1, round(60 * args.fraction))].tolist())
        con.register("_cells", {"cell_uid": np.arange(args.cells), "dataset": dataset})
        con.execute("CREATE TABLE cells AS SELECT * FROM _cells")
        con.execute("CREATE TABLE datasets AS SELECT range AS dataset, range IN ? AS picked FROM range(60)",
                    [sorted(picked_ds)])  # fmt: skip
        query = {
            "category": "SELECT c.cell_uid FROM cells c JOIN datasets d USING (dataset) WHERE d.picked",
            "scattered": f"SELECT cell_uid FROM cells WHERE hash(cell_uid) % 1000 < {int(1000 * args.fraction)}",
        }[args.selection]
        t_sql = time.perf_counter()
        uids = np.sort(con.execute(query).fetchnumpy()["cell_uid"])
        t_sql = time.perf_counter() - t_sql
        np.save(Path(tmp) / "rows.npy", X[uids])
        nbytes = uids.size * args.dim * 4
        best_store, best_open, best_np, best_whole = np.inf, np.inf, np.inf, np.inf
        for _ in range(args.repeat):
            t = time.perf_counter()
            opened = open_array(store, "bench", "r0")
            t_open = time.perf_counter() - t
            got = read_rows(opened, uids)
            best_store = min(best_store, time.perf_counter() - t - t_open)
            best_open = min(best_open, t_open)
            t = time.perf_counter()
            whole = read_embedding(store, "bench", "r0", uids)  # what evaluate calls: no zarr open
            best_whole = min(best_whole, time.perf_counter() - t)
            assert np.array_equal(whole, got, equal_nan=True)
            t = time.perf_counter()
            ref = np.load(Path(tmp) / "rows.npy")
            best_np = min(best_np, time.perf_counter() - t)
        assert np.array_equal(got, ref)
        best_floor = min(_floor(chunk_files.layout_of(arr), uids) for _ in range(args.repeat))
        mib = nbytes / 2**20
        print(
            f"{args.selection} selection: {uids.size:,} of {args.cells:,} rows × {args.dim} ({mib:.1f} MiB), "
            f"chunks {arr.chunks}, {chunk_files.READ_THREADS} reading thread(s)"
        )
        chunk_mib = np.unique(uids // arr.chunks[0]).size * arr.chunks[0] * args.dim * 4 / 2**20
        print(f"SQL selection: {t_sql * 1e3:.1f} ms; whole chunks to read: {chunk_mib:.1f} MiB")
        print(f"open_array: {best_open * 1e3:.1f} ms")
        print(f"read_rows: {best_store:.4f} s = {mib / best_store:,.0f} MiB/s")
        print(f"np.load:   {best_np:.4f} s = {mib / best_np:,.0f} MiB/s")
        print(
            f"read_embedding (metadata + read, no zarr open): {best_whole:.4f} s = {mib / best_whole:,.0f} MiB/s"
        )
        print(f"floor (read each needed chunk file once, no checksum, no copy): {best_floor:.4f} s")
        print(
            f"ratio read_rows / np.load throughput: {best_np / best_store:.2f}, "
            f"with open_array {best_np / (best_store + best_open):.2f}; "
            f"read_embedding {best_np / best_whole:.2f} (target ≥ 0.5); floor {best_np / best_floor:.2f}"
        )


def _floor(layout: chunk_files.ChunkLayout, uids: np.ndarray) -> float:
    """Seconds to read every chunk file holding one of ``uids`` once (READ_THREADS threads)."""
    chunks = np.unique(uids // layout.chunk_rows).tolist()
    nbytes = layout.chunk_rows * layout.shape[1] * 4 + 4

    def read(part: list[int]) -> None:
        buf = bytearray(nbytes + 1)
        for c in part:
            fd = os.open(layout.base / str(c) / "0", os.O_RDONLY)
            os.readv(fd, [buf])
            os.close(fd)

    k = chunk_files.READ_THREADS
    parts = [chunks[i * len(chunks) // k : (i + 1) * len(chunks) // k] for i in range(k)]
    with ThreadPoolExecutor(k) as pool:
        list(pool.map(time.sleep, [0.01] * k))  # the threads are started before the clock
        t = time.perf_counter()
        list(pool.map(read, parts))
        return time.perf_counter() - t


if __name__ == "__main__":
    main()
