"""Import precomputed embeddings (``adata.obsm[KEY]``) against a dataset's cells.

The file's cells are ingested first when the dataset is new (an h5ad with embeddings and
labels but no expression matrix is valid here). The embedding gets revision
``hash(model, file sha256, obsm key)`` and is written like any other embedding (Zarr rows +
``embedded_cells``), so it is evaluated with the same commands.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scdrugmap.store.catalog import Store
from scdrugmap.store.embeddings import ensure_array, iter_chunks, write_rows
from scdrugmap.store.errors import InputError
from scdrugmap.store.ingest import IngestSpec, file_sha256, prepare, read_h5ad_checked, write_prepared
from scdrugmap.store.metadata import check_identifier

__all__ = ["ImportReport", "import_embeddings"]


@dataclass(frozen=True)
class ImportReport:
    """What was imported."""

    dataset_id: str
    model: str
    revision: str
    dim: int
    n_rows: int
    dataset_ingested: bool


def import_embeddings(
    store: Store,
    path: str | Path,
    *,
    dataset_id: str,
    obsm_key: str,
    model: str,
    label_key: str | None = None,
    sensitive: Sequence[str] = (),
    resistant: Sequence[str] = (),
    sample_key: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> ImportReport:
    """Store ``adata.obsm[obsm_key]`` of an h5ad as embeddings of ``model`` for ``dataset_id``.

    Parameters
    ----------
    store
        The store.
    path
        h5ad with the embedding in ``obsm`` (``X`` may be absent).
    dataset_id
        Dataset the rows belong to; ingested from this file's obs when new.
    obsm_key
        obsm key, e.g. ``X_scFoundation``; shape ``(n_cells, dim)``.
    model
        Name to store the embedding under (letters, digits, ``._-``).
    label_key, sensitive, resistant, sample_key, meta
        Used only when the dataset is new (see :func:`store.ingest.ingest_h5ad`).

    Returns
    -------
    ImportReport

    Raises
    ------
    InputError
        Missing file / obsm key, non-finite values, obs names that are not cells of an
        existing dataset; nothing is written then.
    """
    check_identifier(model, what="model name")
    adata = read_h5ad_checked(path)
    if obsm_key not in adata.obsm:
        msg = f"{Path(path).name}: obsm key {obsm_key!r} not found; available: {list(adata.obsm.keys())}"
        raise InputError(msg)
    emb = np.asarray(adata.obsm[obsm_key], dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] == 0:
        msg = f"{Path(path).name}: obsm[{obsm_key!r}] must be 2-D (n_cells, dim), got shape {emb.shape}"
        raise InputError(msg)
    if not np.isfinite(emb).all():
        msg = f"{Path(path).name}: obsm[{obsm_key!r}] has {int((~np.isfinite(emb)).sum())} NaN/inf values; fix them first"
        raise InputError(msg)
    exists = not store.query("SELECT 1 FROM datasets WHERE dataset_id = ?", [dataset_id]).empty
    prepared = None
    if not exists:
        spec = IngestSpec(
            dataset_id=dataset_id,
            label_key=label_key,
            sensitive=tuple(map(str, sensitive)),
            resistant=tuple(map(str, resistant)),
            sample_key=sample_key,
            meta=tuple(sorted((k, str(v)) for k, v in (meta or {}).items())),
            allow_unmapped=True,  # embeddings are imported; the genes of an X, if any, are not used
        )
        prepared = prepare(path, spec, require_x=False)
    else:
        cells = store.query("SELECT obs_name FROM cells WHERE dataset_id = ?", [dataset_id])
        unknown = ~adata.obs_names.isin(cells["obs_name"])
        if unknown.any():
            msg = (
                f"{int(unknown.sum())} obs names of {Path(path).name} are not cells of dataset {dataset_id!r} "
                f"(e.g. {adata.obs_names[unknown][0]!r}); the embedding rows must belong to that dataset's cells"
            )
            raise InputError(msg)
    if prepared is not None:
        write_prepared(store, [prepared])
        file_hash = prepared.content_hash
    else:
        file_hash = file_sha256(Path(path))
    cells = store.query("SELECT cell_uid, obs_name FROM cells WHERE dataset_id = ?", [dataset_id])
    uid_of = pd.Series(cells["cell_uid"].to_numpy(), index=cells["obs_name"].astype(str))
    uids = uid_of.loc[adata.obs_names.astype(str)].to_numpy(dtype=np.int64)
    revision = hashlib.sha256(
        json.dumps({"model": model, "file": file_hash, "obsm": obsm_key}, sort_keys=True).encode()
    ).hexdigest()[:16]
    arr = ensure_array(store, model, revision, dim=emb.shape[1], n_rows=store.n_cells_total())
    order = np.argsort(uids)
    uids, emb = uids[order], emb[order]
    pos = 0
    for _, part in iter_chunks(uids, arr.chunks[0]):
        write_rows(arr, part, emb[pos : pos + part.size])
        pos += part.size
    now = datetime.now(UTC).replace(tzinfo=None)
    spec = {
        "imported_from": str(Path(path).resolve()),
        "obsm_key": obsm_key,
        "sha256": file_hash,
        "datasets": [dataset_id],
    }
    with store.transaction() as con:
        con.execute("DELETE FROM embedded_cells WHERE revision = ?", [revision])
        con.execute("DELETE FROM embeddings WHERE revision = ?", [revision])
        con.execute(
            "INSERT INTO embeddings VALUES (?, ?, ?, 'float32', ?, ?, ?, ?, ?, 'complete', ?, ?)",
            [
                revision,
                model,
                emb.shape[1],
                json.dumps(spec),
                json.dumps({"anndata": version("anndata"), "zarr": version("zarr")}),
                f"embeddings.zarr/{model}/{revision}/embedding",
                len(uids),
                len(uids),
                now,
                now,
            ],
        )
        con.register("_done", pd.DataFrame({"revision": revision, "cell_uid": uids}))
        con.execute("INSERT INTO embedded_cells SELECT * FROM _done")
    return ImportReport(dataset_id, model, revision, int(emb.shape[1]), len(uids), prepared is not None)
