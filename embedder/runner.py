"""Stream the cells of selected datasets through an embedder into the store, resumably.

For each dataset the runner reads the store's copy, records gene coverage, and embeds the
cells that the catalog does not yet list as done, one Zarr chunk at a time: compute the rows,
write the chunk (read-modify-write, one writer), then record the rows in ``embedded_cells``
in one transaction. Models whose cells attend to each other (``attends_across_cells``, e.g.
CellPLM) embed a dataset's cells all at once, in ``cell_uid`` order, so the batch composition
follows the model's recorded rule even when a run resumes. A crash (even ``kill -9``) leaves at worst a chunk whose rows are not yet
recorded; the next run recomputes exactly those rows, so nothing is duplicated or missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from scdrugmap.embedder.base import Embedder, load_embedder
from scdrugmap.embedder.executor import EmbedJob, Executor, plan_shards
from scdrugmap.embedder.reading import read_dataset, rows_in_memory
from scdrugmap.store.catalog import Store
from scdrugmap.store.embed_records import mark_done, record_coverage, refresh_counts
from scdrugmap.store.embeddings import ensure_array, iter_chunks, write_rows
from scdrugmap.store.errors import InputError, StoreError
from scdrugmap.store.progress import progress as progress_of

__all__ = ["EmbedResult", "embed_datasets", "restore_embedder", "select_datasets"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedResult:
    """Outcome of an embedding run."""

    model: str
    revision: str
    dim: int
    n_selected: int
    n_embedded_now: int
    n_done: int
    status: str


def select_datasets(
    store: Store, datasets: list[str] | None = None, where: str | None = None
) -> pd.DataFrame:
    """Datasets with expression chosen by ids and/or a SQL ``WHERE`` on the datasets table.

    Raises
    ------
    InputError
        Unknown dataset ids, an empty selection, or a bad ``where`` expression.
    """
    df = store.datasets(where)
    if datasets:
        unknown = sorted(set(datasets) - set(store.datasets()["dataset_id"]))
        if unknown:
            msg = f"unknown dataset id(s) {unknown}; see `scdrugmap datasets`"
            raise InputError(msg)
        df = df[df["dataset_id"].isin(datasets)]
    df = df[df["has_expression"].fillna(False).astype(bool)]
    if df.empty:
        msg = "no datasets with an expression matrix match the selection; see `scdrugmap datasets`"
        raise InputError(msg)
    return df.reset_index(drop=True)


class _Silent(contextlib.nullcontext):
    """No progress (``progress=False``): the runner's loops still call ``update``."""

    def __enter__(self) -> _Silent:
        return self

    def update(self, n: int = 1) -> None:
        """Count nothing."""


def _read_dataset(store: Store, dataset_id: str, *, backed: bool = False) -> ad.AnnData:
    return read_dataset(store.dataset_file(dataset_id), dataset_id, backed=backed)


def _fit_state(store: Store, emb: Embedder, revision: str, selection: pd.DataFrame) -> None:
    path = store.fits_dir / f"{revision}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            emb.set_state({k: z[k] for k in z.files})
        return
    # backed: X stays on disk until the fit takes its (subsampled) rows, one dataset at a time
    adatas = [_read_dataset(store, d, backed=True) for d in selection["dataset_id"]]
    try:
        emb.fit(adatas)
    finally:
        for a in adatas:
            a.file.close()
    store.fits_dir.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **emb.get_state())
    os.replace(tmp, path)


def _register(
    store: Store,
    emb: Embedder,
    revision: str,
    selection: pd.DataFrame,
    checkpoint: Any,
    options: dict[str, Any],
) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    spec = {
        "model": emb.name,
        "spec": emb.spec(),
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "options": {k: v for k, v in options.items() if k not in ("device", "batch_size")},
        "content_hashes": sorted(selection["content_hash"]) if emb.requires_fit else [],
    }
    with store.transaction() as con:
        row = con.execute("SELECT spec FROM embeddings WHERE revision = ?", [revision]).fetchone()
        if row is None:
            con.execute(
                "INSERT INTO embeddings VALUES (?, ?, ?, 'float32', ?, ?, ?, 0, 0, 'partial', ?, ?)",
                [
                    revision,
                    emb.name,
                    int(emb.dim),
                    json.dumps({**spec, "datasets": sorted(selection["dataset_id"])}, default=str),
                    json.dumps(emb.versions()),
                    f"embeddings.zarr/{emb.name}/{revision}/embedding",
                    now,
                    now,
                ],
            )
        else:
            old = json.loads(row[0])
            old["datasets"] = sorted(set(old.get("datasets", [])) | set(selection["dataset_id"]))
            con.execute("UPDATE embeddings SET spec = ? WHERE revision = ?", [json.dumps(old), revision])
        refresh_counts(con, revision)


def embed_datasets(
    store: Store,
    model: str,
    *,
    checkpoint: str | Path | None = None,
    datasets: list[str] | None = None,
    where: str | None = None,
    options: dict[str, Any] | None = None,
    chunk_rows: int | None = None,
    progress: bool = True,
    embedder: Embedder | None = None,
    executor: Executor | None = None,
    threads: int = 1,
) -> EmbedResult:
    """Embed the selected datasets with ``model`` into the store (resumable).

    Parameters
    ----------
    store
        The store.
    model
        Registered embedder name (see ``scdrugmap embed --help``).
    checkpoint
        Checkpoint directory for models that have one.
    datasets, where
        Selection (default: every dataset with expression).
    options
        Keyword options for the embedder's ``load``.
    chunk_rows
        Rows per Zarr chunk for a new array (default: ≥ 1 MiB per chunk).
    progress
        Show a progress bar.
    embedder
        An already-loaded embedder (overrides ``model``/``checkpoint``/``options``; always
        embeds in this process).
    executor
        Scatter chunk-aligned shards over worker processes or Ray actors
        (:func:`embedder.executor.make_executor`); None or one local worker embeds in this
        process. Models whose cells attend to each other (CellPLM) always embed here.
    threads
        Intra-op threads per worker of ``executor``.

    Returns
    -------
    EmbedResult
        Revision, counts and status (``complete`` when every selected cell is done).

    Raises
    ------
    InputError
        Bad selection or options; a counts-only model on non-count data.
    CheckpointError
        Bad checkpoint directory.
    """
    selection = select_datasets(store, datasets, where)
    emb = embedder or load_embedder(model, checkpoint, **(options or {}))
    if emb.input_kind == "counts":
        bad = selection.loc[selection["x_kind"] != "counts", "dataset_id"].tolist()
        if bad:
            msg = f"model {emb.name!r} needs raw counts, but dataset(s) {bad} hold scaled/log-normalised values; deselect them"
            raise InputError(msg)
    revision = emb.revision(selection["content_hash"].tolist())
    if emb.requires_fit:
        _fit_state(store, emb, revision, selection)
    arr = ensure_array(
        store, emb.name, revision, dim=int(emb.dim), n_rows=store.n_cells_total(), chunk_rows=chunk_rows
    )
    _register(store, emb, revision, selection, checkpoint, options or {})
    pending_all = store.query(
        "SELECT c.dataset_id, c.cell_uid FROM cells c WHERE list_contains(?, c.dataset_id) "
        "AND c.cell_uid NOT IN (SELECT cell_uid FROM embedded_cells WHERE revision = ?) ORDER BY c.cell_uid",
        [selection["dataset_id"].tolist(), revision],
    )
    scatter = (
        executor is not None
        and embedder is None
        and not getattr(emb, "attends_across_cells", False)
        and (executor.kind != "local" or executor.workers > 1)
    )
    # store.progress: a bar on a terminal, plain lines otherwise, silent with --quiet / progress=False
    bar_cm = progress_of(f"embed {emb.name}", len(pending_all), unit="cells") if progress else _Silent()
    with bar_cm as bar:
        if scatter:
            for dataset_id in pending_all["dataset_id"].unique():
                adata = _read_dataset(store, str(dataset_id), backed=True)
                try:
                    _record_coverage(store, emb, revision, str(dataset_id), adata)
                finally:
                    adata.file.close()
            job = EmbedJob(str(store.path.resolve()), model, str(checkpoint) if checkpoint else None,
                           dict(options or {}), revision, threads=int(threads))  # fmt: skip
            n_now = _run_scattered(
                store, executor, job, plan_shards(pending_all, arr.chunks[0]), revision, bar
            )
        else:
            n_now = _run_serial(store, emb, arr, pending_all, revision, bar)
    with store.transaction() as con:
        n_sel, n_done = refresh_counts(con, revision)
    report = getattr(emb, "padding_report", None)
    if report is not None and report.padded_unsorted:
        log.info("length sorting saved %.0f %% of padding tokens", 100 * report.saved_fraction)
    return EmbedResult(
        model=emb.name,
        revision=revision,
        dim=int(arr.shape[1]),
        n_selected=len(
            store.query(
                "SELECT 1 FROM cells WHERE list_contains(?, dataset_id)", [selection["dataset_id"].tolist()]
            )
        ),
        n_embedded_now=n_now,
        n_done=n_done,
        status="complete" if n_done >= n_sel else "partial",
    )


def _record_coverage(store: Store, emb: Embedder, revision: str, dataset_id: str, adata: ad.AnnData) -> None:
    cov = emb.coverage(adata)
    with store.transaction() as con:
        record_coverage(con, revision, dataset_id, emb.name, cov)
    if cov["genes"] < 0.5:
        log.warning(
            "%s covers only %.0f %% of the genes (%.0f %% of counts) of dataset %s",
            emb.name,
            100 * cov["genes"],
            100 * cov["counts"],
            dataset_id,
        )


def _run_serial(store: Store, emb: Embedder, arr, pending: pd.DataFrame, revision: str, bar) -> int:
    """Embed in this process, dataset by dataset, one chunk at a time; returns cells embedded.

    Written chunks are recorded in the catalog in batches (every 16 chunks or 5 s, and at the end
    of each dataset): a chunk's rows are in the array before they are marked done, so a rerun after
    an interruption redoes at most the unrecorded chunks of the last batch.
    """
    n_now, done, last = 0, [], time.monotonic()

    def flush() -> None:
        if done:
            with store.transaction() as con:
                mark_done(con, revision, np.concatenate(done))
            done.clear()

    try:
        for dataset_id, part in pending.groupby("dataset_id", sort=True):
            across = getattr(emb, "attends_across_cells", False)
            # backed unless the model embeds the whole dataset at once: only a chunk's rows in memory
            adata = _read_dataset(store, str(dataset_id), backed=not across)
            _record_coverage(store, emb, revision, str(dataset_id), adata)
            row_of = pd.Series(np.arange(adata.n_obs), index=adata.obs["cell_uid"].to_numpy())
            whole = None
            if across:
                # cells attend to each other (CellPLM): embed the whole dataset in cell_uid order so the
                # batches follow the model's recorded rule whatever was done before an interruption
                whole = np.asarray(emb.embed(adata), dtype=np.float32)
            for _, uids in iter_chunks(part["cell_uid"].to_numpy(), arr.chunks[0]):
                rows = row_of.loc[uids].to_numpy()
                values = (
                    whole[rows]
                    if whole is not None
                    else np.asarray(emb.embed(rows_in_memory(adata, rows)), dtype=np.float32)
                )
                if values.shape != (uids.size, arr.shape[1]):
                    msg = f"{emb.name} returned shape {values.shape}, expected {(uids.size, arr.shape[1])}"
                    raise StoreError(msg)
                write_rows(arr, uids, values)
                done.append(uids)
                n_now += uids.size
                bar.update(uids.size)
                if len(done) >= 16 or time.monotonic() - last > 5:
                    flush()
                    last = time.monotonic()
            if adata.isbacked:
                adata.file.close()
            flush()  # before the next dataset is read: an interruption there loses no recorded chunk
    finally:
        flush()  # what was written is recorded, also when an error propagates
    return n_now


def _run_scattered(store: Store, executor: Executor, job: EmbedJob, shards, revision: str, bar) -> int:
    """Shards over ``executor``; the finished ones are recorded in batches (one catalog writer:
    this process), and always before an error propagates, so a rerun redoes only the rest."""
    n_now, batch, last = 0, [], time.monotonic()

    def flush() -> None:
        if batch:
            with store.transaction() as con:
                mark_done(con, revision, np.concatenate(batch))
            batch.clear()

    try:
        for _, uids in executor.map(job, shards):
            batch.append(uids)
            n_now += uids.size
            bar.update(uids.size)
            if len(batch) >= 16 or time.monotonic() - last > 5:
                flush()
                last = time.monotonic()
    finally:
        flush()
    return n_now


def restore_embedder(store: Store, revision: str, *, checkpoint: str | Path | None = None) -> Embedder:
    """Rebuild the embedder that produced ``revision`` (for embedding new cells the same way).

    Parameters
    ----------
    store
        The store.
    revision
        An embedding revision made by :func:`embed_datasets`.
    checkpoint
        Checkpoint directory, when it moved since the embedding run.

    Returns
    -------
    Embedder
        Loaded with the recorded options (and fitted state for pca/hvg).

    Raises
    ------
    InputError
        When the revision was imported (no embedder), or the checkpoint/options now give a
        different revision (the model changed).
    """
    row = store.query("SELECT model, spec FROM embeddings WHERE revision = ?", [revision])
    if row.empty:
        msg = f"embedding revision {revision!r} is not in the store"
        raise StoreError(msg)
    spec = json.loads(row["spec"].iloc[0])
    if "imported_from" in spec:
        msg = f"revision {revision} was imported from {spec['imported_from']}; it has no embedder to apply to new cells"
        raise InputError(msg)
    emb = load_embedder(
        str(row["model"].iloc[0]), checkpoint or spec.get("checkpoint"), **spec.get("options", {})
    )
    if emb.requires_fit:
        path = store.fits_dir / f"{revision}.npz"
        with np.load(path, allow_pickle=False) as z:
            emb.set_state({k: z[k] for k in z.files})
    now = emb.revision(spec.get("content_hashes", []))
    if now != revision:
        msg = (
            f"the {emb.name} checkpoint/options now give revision {now}, not {revision}: the model differs from the "
            "one the head was trained on; give the original --checkpoint"
        )
        raise InputError(msg)
    return emb
