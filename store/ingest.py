"""Ingest h5ad files into the store: validate everything, then write in one transaction.

Manifests (many files at once) are read by :mod:`store.manifest`. Steps per file: read (anndata) → check obs names, X (finite; counts/lognorm/scaled) → map
labels (metadata checked first; label-confidence stars derived from the evidence fields when not
given, :mod:`store.confidence`) → harmonise genes (:mod:`store.genes`) → QC (:mod:`store.qc`) — all in
:mod:`store.prepare`, whose names are re-exported here — then, in this module, assign ``cell_uid``
→ write the QC-filtered copy to ``datasets/<id>.h5ad`` and the ``datasets``/``cells``/``genes``
rows. A batch of files (a manifest) is staged dataset by dataset to temporary files (one dataset's
expression in memory at a time) and committed in one DuckDB transaction (:class:`IngestBatch`); on
any error the temporary files are removed and the catalog and the store stay as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError
from scdrugmap.store.genes import GENE_COLUMNS
from scdrugmap.store.metadata import META_FIELDS
from scdrugmap.store.prepare import IngestSpec, InputType, Prepared, file_sha256, prepare, read_h5ad_checked

__all__ = [
    "META_FIELDS",
    "IngestBatch",
    "IngestReport",
    "IngestSpec",
    "InputType",
    "Prepared",
    "file_sha256",
    "ingest_anndata",
    "ingest_h5ad",
    "prepare",
    "read_h5ad_checked",
    "write_prepared",
]


@dataclass(frozen=True)
class IngestReport:
    """What ingest did for one dataset (``label_confidence``: stars, given or derived at ingest)."""

    dataset_id: str
    n_cells_input: int
    n_cells: int
    n_genes: int
    n_genes_mapped: int
    x_kind: str | None
    qc_applied: bool
    n_sensitive: int
    n_resistant: int
    status: Literal["ingested", "unchanged"]
    label_confidence: int | None = None
    confidence_source: Literal["explicit", "derived"] | None = None


def _check_existing(store: Store, p: Prepared) -> None:
    """Mark ``p`` to skip when its dataset is stored with the same content and options; refuse it
    when the id is stored with other content or options."""
    old = store.query(
        "SELECT content_hash, ingest_spec_hash FROM datasets WHERE dataset_id = ?", [p.spec.dataset_id]
    )
    if old.empty:
        return
    old = old.iloc[0]
    if old["content_hash"] == p.content_hash and old["ingest_spec_hash"] == p.spec.hash():
        p.skip = True
        return
    what = "file content" if old["content_hash"] != p.content_hash else "ingest options (labels/metadata/QC)"
    msg = (
        f"dataset id {p.spec.dataset_id!r} is already in the store with different {what} "
        f"(stored sha256 {old['content_hash'][:12]}…, new {p.content_hash[:12]}…); "
        "ingest it under a new --dataset-id or use a new store"
    )
    raise InputError(msg)


def _report(p: Prepared) -> IngestReport:
    lab = p.adata.obs["label"]
    return IngestReport(
        dataset_id=p.spec.dataset_id,
        n_cells_input=p.row["n_cells_input"],
        n_cells=p.row["n_cells"],
        n_genes=p.row["n_genes"],
        n_genes_mapped=p.row["n_genes_mapped"],
        x_kind=p.row["x_kind"],
        qc_applied=p.row["qc_applied"],
        n_sensitive=int((lab == "sensitive").sum()),
        n_resistant=int((lab == "resistant").sum()),
        status="unchanged" if p.skip else "ingested",
        label_confidence=p.row.get("label_confidence"),
        confidence_source=p.row.get("confidence_source"),
    )


_CELL_COLUMNS = ["cell_uid", "dataset_id", "obs_name", "sample_id", "label", "n_counts", "n_genes",
                 "pct_mito", "patient_id"]  # fmt: skip


@dataclass
class _Staged:
    """One dataset written to a temporary file; what the catalog needs, without its expression."""

    prepared: Prepared  # its AnnData replaced by an obs-only one once the file is written
    tmp: Path | None  # None when the dataset is already stored unchanged


class IngestBatch:
    """Datasets written one at a time to temporary files, then committed together: all or nothing.

    Memory holds one dataset's expression at a time (a manifest of a million cells is staged
    dataset by dataset). Each staged file carries placeholder ``cell_uid`` values, overwritten in
    place (HDF5, same shape and type) once the commit's transaction has assigned them; on any error
    the temporary files are removed and the catalog is unchanged.

    Use as a context manager::

        with IngestBatch(store) as batch:
            for p in prepared_datasets:
                batch.add(p)
            reports = batch.commit()
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._staged: list[_Staged] = []
        self._ids: set[str] = set()
        self._placed: list[Path] = []

    def __enter__(self) -> IngestBatch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()

    def add(self, p: Prepared) -> None:
        """Check ``p`` against the batch and the catalog and write its dataset file to a temporary
        name; its expression is released.

        Raises
        ------
        InputError
            A dataset id repeated in the batch, or already stored with other content or options.
        """
        if p.spec.dataset_id in self._ids:
            msg = f"dataset id(s) {[p.spec.dataset_id]} appear more than once; give each dataset its own id"
            raise InputError(msg)
        self._ids.add(p.spec.dataset_id)
        _check_existing(self.store, p)
        if p.skip:
            self._staged.append(_Staged(p, None))
            return
        import anndata as ad

        self.store.datasets_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.store.datasets_dir / f".{p.spec.dataset_id}.h5ad.tmp-{os.getpid()}"
        self._staged.append(_Staged(p, tmp))  # registered first: removed on any error below
        p.adata.obs.insert(0, "cell_uid", np.arange(p.adata.n_obs, dtype=np.int64))  # placeholders
        p.adata.write_h5ad(tmp)
        p.adata = ad.AnnData(obs=p.adata.obs)

    def commit(self) -> list[IngestReport]:
        """Assign ``cell_uid``, write the catalog rows in one transaction and move the files into place.

        Returns
        -------
        list of IngestReport
            One per added dataset, in order.
        """
        import h5py

        todo = [s for s in self._staged if s.tmp is not None]
        with self.store.transaction() as con:
            uid = self.store.next_cell_uid(con)
            now = datetime.now(UTC).replace(tzinfo=None)
            for s in todo:
                p = s.prepared
                uids = np.arange(uid, uid + p.adata.n_obs, dtype=np.int64)
                uid += len(uids)
                with h5py.File(s.tmp, "r+") as f:
                    f["obs/cell_uid"][...] = uids
                p.adata.obs["cell_uid"] = uids
                row = dict(p.row)
                row.update(
                    content_hash=p.content_hash,
                    ingest_spec_hash=p.spec.hash(),
                    ingest_spec=json.dumps(asdict(p.spec), default=str),
                    source_path=str(p.path.resolve()) if p.path.exists() else p.path.name,
                    ingested_at=now,
                )
                cols = list(row)
                con.execute(
                    f"INSERT INTO datasets ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                    [row[c] for c in cols],
                )
                cells = p.adata.obs.reset_index(names="obs_name")[_CELL_COLUMNS]
                cells = cells.astype({"sample_id": object, "label": object, "patient_id": object})
                con.register("_cells", cells)
                con.execute("INSERT INTO cells BY NAME SELECT * FROM _cells")
                con.unregister("_cells")
                if len(p.genes):
                    genes = p.genes[[c for c in GENE_COLUMNS if c in p.genes.columns]]
                    con.register("_genes", genes)
                    con.execute("INSERT INTO genes BY NAME SELECT * FROM _genes")
                    con.unregister("_genes")
            for s in todo:
                final = self.store.dataset_file(s.prepared.spec.dataset_id)
                os.replace(s.tmp, final)
                self._placed.append(final)
        return [_report(s.prepared) for s in self._staged]

    def discard(self) -> None:
        """Remove every file this batch wrote (temporary or already moved into place)."""
        for f in [s.tmp for s in self._staged if s.tmp is not None] + self._placed:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()


def write_prepared(store: Store, items: Sequence[Prepared]) -> list[IngestReport]:
    """Write validated datasets: h5ad copies + catalog rows, all or nothing (:class:`IngestBatch`).

    Raises
    ------
    InputError
        When a dataset id is repeated or already ingested with different content or options.
    """
    with IngestBatch(store) as batch:
        for p in items:
            batch.add(p)
        return batch.commit()


def ingest_h5ad(
    store: Store,
    path: str | Path | Any,
    *,
    dataset_id: str,
    label_key: str | None = None,
    sensitive: Sequence[str] = (),
    resistant: Sequence[str] = (),
    sample_key: str | None = None,
    patient_key: str | None = None,
    patient_scope: str | None = None,
    input_type: InputType = "auto",
    layer: str | None = None,
    gene_key: str | None = None,
    min_genes: int = 500,
    max_pct_mito: float = 10.0,
    meta: Mapping[str, Any] | None = None,
    allow_unmapped: bool = False,
) -> IngestReport:
    """Ingest one h5ad file or in-memory AnnData (see :class:`IngestSpec` for the options).

    Returns
    -------
    IngestReport
        Cells before/after QC, genes mapped, label counts, ``status``.

    Raises
    ------
    InputError
        For any bad input; the store is left unchanged.
    """
    spec = IngestSpec(
        dataset_id=dataset_id,
        label_key=label_key,
        sensitive=tuple(str(s) for s in sensitive),
        resistant=tuple(str(s) for s in resistant),
        sample_key=sample_key,
        patient_key=patient_key,
        patient_scope=patient_scope,
        input_type=input_type,
        layer=layer,
        gene_key=gene_key,
        min_genes=min_genes,
        max_pct_mito=max_pct_mito,
        meta=tuple(sorted((k, str(v)) for k, v in (meta or {}).items())),
        allow_unmapped=bool(allow_unmapped),
    )
    return write_prepared(store, [prepare(path, spec)])[0]


def ingest_anndata(store: Store, adata: Any, *, dataset_id: str, **options: Any) -> IngestReport:
    """Ingest an in-memory :class:`anndata.AnnData` (scanpy users' object) like a file.

    ``adata`` is not modified; the options are those of :func:`ingest_h5ad`. Its content hash
    (X, layers, names, obs) makes a repeated ingest of the same object a no-op.

    Raises
    ------
    InputError
        For any bad input (not an AnnData included); the store is left unchanged.
    """
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        msg = (
            f"ingest_anndata needs an anndata.AnnData, got {type(adata).__name__}; use ingest_h5ad for files"
        )
        raise InputError(msg)
    return ingest_h5ad(store, adata, dataset_id=dataset_id, **options)
