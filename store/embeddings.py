"""Embedding arrays in the store's Zarr v3 group.

One array per (model, revision) at ``embeddings.zarr/<model>/<revision>/embedding`` with
shape ``(n_cells_total, dim)``, float32, row = ``cell_uid``, dimension names
``("cell", "latent")``, chunks spanning the full width and holding ≥ 1 MiB, uncompressed (model
embeddings barely compress, and decompression dominated reads) with a CRC32C checksum per chunk. Unwritten rows
read as NaN ("not embedded yet"). Rows are written chunk by chunk (read-modify-write of one
chunk, one writer per chunk); a row counts as done only once the catalog's
``embedded_cells`` table records it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from scdrugmap.store.chunk_files import ChunkLayout, layout_from_metadata, layout_of, read_raw_rows
from scdrugmap.store.errors import StoreError

if TYPE_CHECKING:
    import xarray as xr
    from anndata import AnnData

    from scdrugmap.store.catalog import Store

__all__ = [
    "MIN_CHUNK_BYTES",
    "chunk_rows_for",
    "ensure_array",
    "export_obsm",
    "iter_chunks",
    "open_array",
    "open_embeddings",
    "read_embedding",
    "read_rows",
    "resolve_revision",
    "write_rows",
]

MIN_CHUNK_BYTES = 1 << 20


def chunk_rows_for(dim: int, *, min_bytes: int = MIN_CHUNK_BYTES) -> int:
    """Rows per chunk so that a full-width float32 chunk holds at least ``min_bytes``.

    Rounded up to a multiple of 64 rows.
    """
    rows = math.ceil(min_bytes / (4 * max(1, dim)))
    return max(64, math.ceil(rows / 64) * 64)


def _array_path(model: str, revision: str) -> str:
    return f"{model}/{revision}/embedding"


def ensure_array(
    store: Store, model: str, revision: str, *, dim: int, n_rows: int, chunk_rows: int | None = None
) -> zarr.Array:
    """Create the array for (model, revision) or grow it to ``n_rows`` rows.

    Parameters
    ----------
    store
        The store.
    model, revision
        Array identity.
    dim
        Embedding width.
    n_rows
        Required number of rows (the store's ``max(cell_uid) + 1``).
    chunk_rows
        Rows per chunk; default :func:`chunk_rows_for` (≥ 1 MiB per chunk).

    Returns
    -------
    zarr.Array
        float32 ``(≥ n_rows, dim)``, fill value NaN.
    """
    root = zarr.open_group(store.zarr_path, mode="a", zarr_format=3)
    path = _array_path(model, revision)
    if path in root:
        arr = root[path]
        if arr.shape[1] != dim:
            msg = (
                f"embedding array {path} has width {arr.shape[1]}, expected {dim}; the store is inconsistent"
            )
            raise StoreError(msg)
        if arr.shape[0] < n_rows:
            arr.resize((n_rows, dim))
        return arr
    rows = chunk_rows or chunk_rows_for(dim)
    return root.create_array(
        path,
        shape=(n_rows, dim),
        chunks=(rows, dim),
        dtype="float32",
        fill_value=np.nan,
        # no compression (float32 embeddings barely compress; zstd made reads ~7x slower), but a
        # CRC32C checksum per chunk, so a damaged chunk is an error, never silent garbage
        compressors=[Crc32cCodec()],
        dimension_names=("cell", "latent"),
        attributes={"model": model, "revision": revision},
    )


def open_array(store: Store, model: str, revision: str, *, mode: str = "r") -> zarr.Array:
    """Open an existing embedding array (``mode="r+"`` to write rows into it).

    Raises
    ------
    StoreError
        When it does not exist.
    """
    from zarr.storage import LocalStore

    path = _array_path(model, revision)
    # the array itself through a LocalStore, not via its root group: ≈ 0.3 ms instead of ≈ 1.5 ms,
    # which was a fifth of reading a 100 k-cell selection (benchmarks/bench_store_read.py)
    not_found = (FileNotFoundError, KeyError, getattr(zarr.errors, "NodeNotFoundError", KeyError))
    try:
        local = LocalStore(store.zarr_path, read_only=mode == "r")
        return zarr.open_array(store=local, path=path, mode=mode, zarr_format=3)
    except not_found as exc:
        msg = f"no embedding array for model {model!r} revision {revision!r}; run `scdrugmap embed --model {model}`"
        raise StoreError(msg) from exc


def iter_chunks(uids: np.ndarray, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Group sorted ``uids`` by the chunk they fall in: yields ``(chunk index, uids)``."""
    uids = np.sort(np.asarray(uids, dtype=np.int64))
    if uids.size == 0:
        return
    chunk_of = uids // chunk_rows
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    for part in np.split(uids, bounds):
        yield int(part[0] // chunk_rows), part


def write_rows(arr: zarr.Array, uids: np.ndarray, values: np.ndarray) -> None:
    """Write rows ``uids`` (all inside one chunk) with one read-modify-write of that chunk.

    Parameters
    ----------
    arr
        Target array.
    uids
        int64 ``(n,)`` row indices, all in the same chunk.
    values
        float32 ``(n, dim)``.
    """
    rows = arr.chunks[0]
    chunk = int(uids[0] // rows)
    if np.any(uids // rows != chunk):
        msg = "write_rows() needs rows of a single chunk"
        raise ValueError(msg)
    lo, hi = chunk * rows, min((chunk + 1) * rows, arr.shape[0])
    block = np.asarray(arr[lo:hi])
    block[uids - lo] = values
    arr[lo:hi] = block


#: chunks read in one slice when they are adjacent (bounds the memory of one read to ~64 chunks)
MAX_RUN_CHUNKS = 64


def read_rows(arr: zarr.Array, uids: np.ndarray) -> np.ndarray:
    """Read rows ``uids`` (any order); rows beyond the array's length are NaN.

    Chunk-aware: each needed chunk is read once and the rows are taken from it in memory — no
    per-row indexing. The store's own arrays (uncompressed, on a local disk) are read straight
    from their chunk files (Zarr v3's documented layout); others through zarr, adjacent chunks in
    one slice of at most :data:`MAX_RUN_CHUNKS` chunks (``benchmarks/bench_store_read.py``).

    Parameters
    ----------
    arr
        An embedding array ``(n_rows, dim)``.
    uids
        int64 ``(n,)`` row indices (``cell_uid``), any order, duplicates allowed.

    Returns
    -------
    numpy.ndarray
        float32 ``(len(uids), dim)``.
    """
    return _read(uids, layout_of(arr), lambda: arr, shape=arr.shape)


def read_embedding(store: Store, model: str, revision: str, uids: np.ndarray) -> np.ndarray:
    """Rows ``uids`` of the embedding of (``model``, ``revision``): ``read_rows(open_array(...), uids)``.

    For the store's own arrays the chunk layout is read from the array's ``zarr.json`` and the
    array is opened in zarr only if a chunk file needs it (≈ 0.5 ms saved per read; see
    :func:`store.chunk_files.layout_from_metadata`).

    Parameters
    ----------
    store
        The store.
    model, revision
        Which embedding (a full revision; see :func:`resolve_revision`).
    uids
        int64 ``(n,)`` row indices (``cell_uid``), any order, duplicates allowed.

    Returns
    -------
    numpy.ndarray
        float32 ``(len(uids), dim)``; NaN rows are cells not embedded (yet) or beyond the array.

    Raises
    ------
    StoreError
        When the array does not exist.
    """
    layout = layout_from_metadata(store.zarr_path / _array_path(model, revision))
    if layout is None:  # missing (open_array says so) or another layout
        return read_rows(open_array(store, model, revision), uids)
    return _read(
        uids, layout, functools.cache(lambda: open_array(store, model, revision)), shape=layout.shape
    )


def _read(
    uids: np.ndarray,
    layout: ChunkLayout | None,
    get_array: Callable[[], zarr.Array],
    *,
    shape: tuple[int, ...],
) -> np.ndarray:
    """:func:`read_rows` given the array's layout (None: read through zarr) and a way to open it."""
    uids = np.asarray(uids, dtype=np.int64)
    n_rows = int(shape[0])
    inside = (uids >= 0) & (uids < n_rows)
    out = np.empty((uids.size, int(shape[1])), dtype=np.float32)  # every row is filled below
    out[~inside] = np.nan
    pos = np.flatnonzero(inside)
    if pos.size == 0:
        return out
    order = np.argsort(uids[pos], kind="stable")
    pos, sel = pos[order], uids[pos][order]
    if layout is not None:  # uncompressed full-width chunks on a local disk: read the files directly
        rows = layout.chunk_rows

        def read_chunk(c: int) -> np.ndarray:
            return np.asarray(get_array()[c * rows : min((c + 1) * rows, n_rows)])

        read_raw_rows(layout, out=out, pos=pos, sel=sel, read_chunk=read_chunk)
        return out
    arr = get_array()
    rows = int(arr.chunks[0])
    chunk = sel // rows
    starts = np.flatnonzero(np.r_[True, np.diff(chunk) > 1])  # runs of adjacent needed chunks
    ends = np.r_[starts[1:], sel.size]
    for a, b in zip(starts, ends, strict=True):
        first = int(chunk[a])
        while a < b:
            last = min(int(chunk[b - 1]), first + MAX_RUN_CHUNKS - 1)
            stop = a + int(np.searchsorted(chunk[a:b], last, side="right"))
            lo, hi = first * rows, min((last + 1) * rows, n_rows)
            block = np.asarray(arr[lo:hi], dtype=np.float32)
            out[pos[a:stop]] = block[sel[a:stop] - lo]
            a, first = stop, last + 1
            if a < b:
                first = int(chunk[a])
    return out


def resolve_revision(store: Store, model: str, revision: str | None = None) -> str:
    """The revision to use for ``model``: the given one (checked) or the latest updated one.

    Raises
    ------
    StoreError
        When the model has no embedding (or not that revision) in the store.
    """
    df = store.query(
        "SELECT revision FROM embeddings WHERE model = ? ORDER BY updated_at DESC, revision", [model]
    )
    if df.empty:
        msg = f"no embeddings of model {model!r} in the store; run `scdrugmap embed --model {model}` or `import-embeddings`"
        raise StoreError(msg)
    if revision is None:
        return str(df["revision"].iloc[0])
    matches = [r for r in df["revision"] if str(r).startswith(revision)]
    if len(matches) != 1:
        msg = f"revision {revision!r} of model {model!r} not found (or ambiguous); present: {', '.join(df['revision'])}"
        raise StoreError(msg)
    return matches[0]


def open_embeddings(store: Store, model: str, *, revision: str | None = None) -> xr.DataArray:
    """Open a model's embeddings lazily as an ``xarray.DataArray``.

    Parameters
    ----------
    store
        The store.
    model
        Model name.
    revision
        Revision (prefix); default the latest.

    Returns
    -------
    xarray.DataArray
        dims ``("cell", "latent")``, coordinate ``cell`` = ``cell_uid`` (int64); NaN rows are
        cells not embedded (yet). Attributes ``model`` and ``revision``.
    """
    import xarray as xr

    rev = resolve_revision(store, model, revision)
    open_array(store, model, rev)  # raises a clear error when missing
    ds = xr.open_zarr(store.zarr_path, group=f"{model}/{rev}", consolidated=False, zarr_format=3)
    da = ds["embedding"]
    da = da.assign_coords(cell=np.arange(da.sizes["cell"], dtype=np.int64))
    da.attrs.update({"model": model, "revision": rev})
    return da


def export_obsm(
    store: Store,
    dataset_id: str,
    model: str,
    *,
    revision: str | None = None,
    adata: AnnData | None = None,
) -> AnnData:
    """Attach a dataset's embeddings as ``adata.obsm['X_scdrugmap_<model>']`` (never scanpy's ``X_pca``).

    Parameters
    ----------
    store
        The store.
    dataset_id
        An ingested dataset.
    model, revision
        Which embedding (revision default: latest).
    adata
        The dataset's AnnData (its obs names must be the ingested ones); default: the
        store's copy of the dataset (or an obs-only AnnData when it has no expression).

    Returns
    -------
    AnnData
        With ``obsm['X_scdrugmap_<model>']`` float32 ``(n_obs, dim)``; NaN rows = not embedded.

    Raises
    ------
    StoreError
        When the dataset or embedding is absent, or ``adata`` has unknown obs names.
    """
    import anndata as ad
    import pandas as pd

    cells = store.query(
        "SELECT cell_uid, obs_name, sample_id, label FROM cells WHERE dataset_id = ? ORDER BY cell_uid",
        [dataset_id],
    )
    if cells.empty:
        msg = f"dataset {dataset_id!r} is not in the store; see `scdrugmap datasets`"
        raise StoreError(msg)
    if adata is None:
        path = store.dataset_file(dataset_id)
        if path.exists():
            adata = ad.read_h5ad(path)
        else:
            adata = ad.AnnData(obs=pd.DataFrame(index=cells["obs_name"].astype(str).to_numpy()))
    uid_of = pd.Series(cells["cell_uid"].to_numpy(), index=cells["obs_name"].astype(str))
    missing = ~adata.obs_names.isin(uid_of.index)
    if missing.any():
        msg = f"{int(missing.sum())} obs names of the AnnData are not cells of {dataset_id!r} (e.g. {adata.obs_names[missing][0]!r})"
        raise StoreError(msg)
    rev = resolve_revision(store, model, revision)
    uids = uid_of.loc[adata.obs_names].to_numpy()
    adata.obsm[f"X_scdrugmap_{model}"] = read_embedding(store, model, rev, uids)
    return adata
