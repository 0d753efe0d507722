"""read_rows straight from chunk files equals zarr's own read for every kind of selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scdrugmap.store import chunk_files
from scdrugmap.store.catalog import Store
from scdrugmap.store.chunk_files import layout_from_metadata, layout_of
from scdrugmap.store.embeddings import ensure_array, open_array, read_embedding, read_rows
from scdrugmap.store.errors import StoreError


@pytest.fixture
def arr(tmp_path: Path):
    st = Store.open(tmp_path / "store", create=True)
    a = ensure_array(st, "m", "r0", dim=256, n_rows=5000)
    rows = int(a.chunks[0])
    X = np.random.default_rng(0).normal(size=(5000, 256)).astype(np.float32)
    # leave the second chunk unwritten ("not embedded yet"): it reads as NaN
    a[:rows] = X[:rows]
    a[2 * rows :] = X[2 * rows :]
    X[rows : 2 * rows] = np.nan
    return st, X, rows


def _zarr_rows(X: np.ndarray, uids: np.ndarray) -> np.ndarray:
    out = np.full((uids.size, X.shape[1]), np.nan, dtype=np.float32)
    ok = (uids >= 0) & (uids < len(X))
    out[ok] = X[uids[ok]]
    return out


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    "pick",
    ["contiguous", "edges", "scattered", "shuffled_duplicates", "out_of_range"],
)
def test_raw_reads_equal_the_array(arr, pick: str, threads: int, monkeypatch) -> None:
    monkeypatch.setattr(chunk_files, "READ_THREADS", threads)
    monkeypatch.setattr(chunk_files, "MIN_CHUNKS_PER_THREAD", 1)  # 5 chunks: every thread gets some
    st, X, rows = arr
    a = open_array(st, "m", "r0")
    assert layout_of(a) is not None  # the direct path is the one under test
    rng = np.random.default_rng(1)
    uids = {
        "contiguous": np.arange(2 * rows, 4 * rows),  # whole chunks straight into the output
        "edges": np.arange(rows // 2, 3 * rows + 7),  # partial chunks at both ends, one NaN chunk
        "scattered": np.sort(rng.choice(5000, 700, replace=False)),
        "shuffled_duplicates": rng.integers(0, 5000, 900),
        "out_of_range": np.array([-1, 0, 4999, 5000, 123456, 3]),
    }[pick]
    got = read_rows(a, uids)
    np.testing.assert_array_equal(got, _zarr_rows(X, uids))
    assert got.dtype == np.float32
    # the same rows without opening the array in zarr (layout from its zarr.json)
    np.testing.assert_array_equal(read_embedding(st, "m", "r0", uids), got)


def test_a_file_that_is_not_one_chunk_is_read_through_zarr(arr) -> None:
    st, X, rows = arr
    a = open_array(st, "m", "r0")
    layout = layout_of(a)
    assert layout.crc
    path = layout.base / "2" / "0"
    good = path.read_bytes()
    path.write_bytes(good + b"xx")  # not exactly one chunk: zarr decides (and reports it damaged)
    with pytest.raises(Exception, match=r"(?i)checksum|crc|size|shape|length"):
        read_rows(a, np.arange(2 * rows, 2 * rows + 5))
    with pytest.raises(Exception, match=r"(?i)checksum|crc|size|shape|length"):
        read_embedding(st, "m", "r0", np.arange(2 * rows, 2 * rows + 5))
    path.write_bytes(good)
    np.testing.assert_array_equal(read_rows(a, np.arange(2 * rows, 2 * rows + 5)), X[2 * rows : 2 * rows + 5])


def test_a_damaged_chunk_is_never_returned(arr) -> None:
    st, _, rows = arr
    a = open_array(st, "m", "r0")
    path = layout_of(a).base / "3" / "0"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # one flipped byte: the CRC32C no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"(?i)checksum|crc"):
        read_rows(a, np.arange(3 * rows, 3 * rows + 3))
    with pytest.raises(Exception, match=r"(?i)checksum|crc"):
        read_embedding(st, "m", "r0", np.arange(3 * rows, 3 * rows + 3))


def test_open_array_modes_and_a_missing_array(arr) -> None:
    st, X, _ = arr
    read_only = open_array(st, "m", "r0")
    with pytest.raises(ValueError, match="read-only"):
        read_only[0:1] = np.zeros((1, X.shape[1]), dtype=np.float32)
    writable = open_array(st, "m", "r0", mode="r+")
    writable[0:1] = np.full((1, X.shape[1]), 7.0, dtype=np.float32)
    assert np.all(read_rows(open_array(st, "m", "r0"), np.array([0])) == 7.0)
    with pytest.raises(StoreError, match=r"no embedding array for model 'm' revision 'nope'"):
        open_array(st, "m", "nope")


def test_layout_from_metadata_matches_the_open_array(arr) -> None:
    st, X, rows = arr
    a = open_array(st, "m", "r0")
    assert layout_from_metadata(st.zarr_path / "m" / "r0" / "embedding") == layout_of(a)
    assert layout_of(a).shape == X.shape
    assert layout_of(a).chunk_rows == rows
    assert layout_from_metadata(st.zarr_path / "m" / "nope" / "embedding") is None
    with pytest.raises(StoreError, match=r"no embedding array for model 'm' revision 'nope'"):
        read_embedding(st, "m", "nope", np.array([0]))


@pytest.mark.parametrize(
    "change",
    ["compressed", "int32", "zero_fill", "partial_width", "dot_keys", "big_endian", "not_json"],
)
def test_other_layouts_are_read_through_zarr(tmp_path: Path, change: str) -> None:
    """Any layout the raw reader does not handle is left to zarr, and the rows still come back."""
    import zarr
    from zarr.codecs import BloscCodec, BytesCodec

    st = Store.open(tmp_path / "store", create=True)
    root = zarr.open_group(st.zarr_path, mode="a", zarr_format=3)
    dtype = "int32" if change == "int32" else "float32"
    kwargs: dict = {
        "shape": (300, 8),
        "chunks": (64, 4 if change == "partial_width" else 8),
        "dtype": dtype,
        "fill_value": 0 if change in ("zero_fill", "int32") else np.nan,
    }
    if change == "compressed":
        kwargs["compressors"] = [BloscCodec()]
    else:
        kwargs["compressors"] = None
    if change == "big_endian":
        kwargs["serializer"] = BytesCodec(endian="big")
    if change == "dot_keys":
        kwargs["chunk_key_encoding"] = {"name": "default", "separator": "."}
    a = root.create_array("m/r0/embedding", **kwargs)
    X = np.arange(300 * 8).reshape(300, 8).astype(dtype)
    a[:200] = X[:200]
    path = st.zarr_path / "m" / "r0" / "embedding"
    if change == "not_json":
        (path / "zarr.json").write_bytes((path / "zarr.json").read_bytes()[:-5])
        assert layout_from_metadata(path) is None
        return
    assert layout_from_metadata(path) is None
    uids = np.array([5, 150, 250, 299, 10])
    fill = 0 if change in ("zero_fill", "int32") else np.nan
    expect = np.where(uids[:, None] < 200, X[np.minimum(uids, 199)], fill).astype(np.float32)
    np.testing.assert_array_equal(read_embedding(st, "m", "r0", uids), expect)
    np.testing.assert_array_equal(read_rows(open_array(st, "m", "r0"), uids), expect)


def test_a_damaged_chunk_in_any_threads_share_is_an_error(arr, monkeypatch) -> None:
    """Every thread's share is checked: damage in the pool thread's chunks or the caller's raises."""
    monkeypatch.setattr(chunk_files, "READ_THREADS", 2)
    monkeypatch.setattr(chunk_files, "MIN_CHUNKS_PER_THREAD", 1)
    st, X, _ = arr
    layout = layout_from_metadata(st.zarr_path / "m" / "r0" / "embedding")
    for chunk in (0, 4):  # the first share (read by the caller) and the last (read by the pool)
        path = layout.base / str(chunk) / "0"
        good = path.read_bytes()
        path.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
        with pytest.raises(Exception, match=r"(?i)checksum|crc"):
            read_embedding(st, "m", "r0", np.arange(5000))
        path.write_bytes(good)
    np.testing.assert_array_equal(
        read_embedding(st, "m", "r0", np.arange(5000)), _zarr_rows(X, np.arange(5000))
    )


def _read_in_child(zarr_path: str, queue) -> None:
    from scdrugmap.store.chunk_files import layout_from_metadata, read_raw_rows

    layout = layout_from_metadata(Path(zarr_path) / "m" / "r0" / "embedding")
    out = np.empty((5000, 256), dtype=np.float32)
    read_raw_rows(layout, out=out, pos=np.arange(5000), sel=np.arange(5000), read_chunk=None, threads=2)
    queue.put(float(np.nansum(out)))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_reading_threads_work_in_a_forked_child(arr, monkeypatch) -> None:
    """The reader's thread pool is inherited by a forked child without its threads; the child
    must make its own instead of waiting on threads that do not exist."""
    import multiprocessing

    monkeypatch.setattr(chunk_files, "MIN_CHUNKS_PER_THREAD", 1)
    st, X, _ = arr
    read_embedding(st, "m", "r0", np.arange(5000))  # the parent's pool exists now
    assert chunk_files._POOL is not None
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(str(st.zarr_path), queue))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung reading chunks")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(float(np.nansum(X)), rel=1e-5)


def test_concurrent_reads_asking_for_different_thread_counts(tmp_path: Path, monkeypatch) -> None:
    """Reads from several threads at once, growing the shared pool while others use it, all return
    the right rows."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(chunk_files, "MIN_CHUNKS_PER_THREAD", 1)
    monkeypatch.setattr(chunk_files, "_POOL", None)
    st = Store.open(tmp_path / "store", create=True)
    a = ensure_array(st, "m", "r0", dim=16, n_rows=3000, chunk_rows=64)  # 47 chunks
    X = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    a[:] = X
    layout = layout_from_metadata(st.zarr_path / "m" / "r0" / "embedding")

    def read(threads: int) -> bool:
        out = np.empty((3000, 16), dtype=np.float32)
        idx = np.arange(3000)
        chunk_files.read_raw_rows(layout, out=out, pos=idx, sel=idx, read_chunk=None, threads=threads)
        return bool(np.array_equal(out, X))

    with ThreadPoolExecutor(4) as callers:  # the pool grows a dozen times while reads use it
        assert all(callers.map(read, [2 + i // 4 for i in range(48)]))
    assert chunk_files._POOL[0] == 12  # 13 threads: the caller and 12 of the pool
