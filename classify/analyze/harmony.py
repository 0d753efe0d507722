"""Harmony batch correction of a stored embedding, as a new evaluable revision (scDrugMap Suppl. Note 2).

:func:`correct_embedding` reads a model's embedding of every embedded cell (or a dataset
selection), runs Harmony (``harmonypy``; on the first ``n_pcs`` principal components when the
embedding is wider) with one batch per value of ``batch_key`` (a dataset field such as ``study``
or ``technology``, or ``sample_id``), and writes the corrected coordinates as model
``<model>_harmony`` (or ``name``) with its own revision: first the Zarr rows, then, in one catalog
transaction, an ``embeddings`` row whose spec records ``corrected_from`` / ``batch_key`` /
parameters, ``embedded_cells`` and a row in the ``corrections`` table (a failure leaves no catalog
row and removes a new Zarr array). ``scdrugmap embed --correct harmony`` runs it right after
embedding; ``scdrugmap evaluate --model pca --corrected pca_harmony`` evaluates both revisions on
the same folds, and :func:`~classify.analyze.correction.correction_table` puts them side by side,
per fold (the held-out study of a cross-data run) and as the mean, into ``correction_metrics``.

Harmony is transductive: the corrected revision covers the cells it was fitted on only, and new
files cannot be embedded into it (``predict`` needs the uncorrected model).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version

import numpy as np
import pandas as pd

from scdrugmap.classify.analyze.correction import (
    batch_labels,
    batch_mixing,
    batch_sql,
    compare_correction,
    correction_table,
)
from scdrugmap.classify.analyze.tables import ensure_tables, now, replace_frame
from scdrugmap.store.catalog import Store
from scdrugmap.store.embeddings import (
    ensure_array,
    iter_chunks,
    read_embedding,
    resolve_revision,
    write_rows,
)
from scdrugmap.store.errors import InputError
from scdrugmap.store.metadata import check_identifier

__all__ = [
    "CorrectionOutcome",
    "HarmonySpec",
    "batch_mixing",
    "check_batch_key",
    "compare_correction",
    "correct_embedding",
    "correction_table",
    "load_correction",
    "write_embedding",
]


@dataclass(frozen=True)
class HarmonySpec:
    """Harmony parameters; the defaults are Harmony's own (theta 2, sigma 0.1, nclust min(N/30, 100)).

    ``theta`` diversity penalty, ``sigma`` soft-clustering bandwidth (larger = softer; batches so far
    apart that every cluster holds one batch are left uncorrected at 0.1 — try 0.2), ``nclust``
    clusters (None = Harmony's default), ``max_iter`` Harmony iterations, ``n_pcs`` principal
    components used when the embedding is wider, ``seed``.
    """

    theta: float = 2.0
    max_iter: int = 20
    n_pcs: int = 50
    seed: int = 0
    sigma: float = 0.1
    nclust: int | None = None

    @classmethod
    def from_options(cls, options: dict[str, str | float | int]) -> HarmonySpec:
        """Build from ``KEY=VALUE`` options (strings are converted).

        Raises
        ------
        InputError
            An unknown key or a value out of range.
        """
        kinds = {"theta": float, "sigma": float, "max_iter": int, "n_pcs": int, "seed": int, "nclust": int}
        out = {}
        for key, raw in options.items():
            if key not in kinds:
                msg = f"unknown Harmony option {key!r}; use {', '.join(kinds)}"
                raise InputError(msg)
            try:
                out[key] = kinds[key](raw)
            except (TypeError, ValueError):
                msg = (
                    f"Harmony option {key}={raw!r} is not a{'n integer' if kinds[key] is int else ' number'}"
                )
                raise InputError(msg) from None
        spec = cls(**out)
        limits = {"theta": spec.theta >= 0, "sigma": spec.sigma > 0, "max_iter": spec.max_iter >= 1,
                  "n_pcs": spec.n_pcs >= 2, "seed": spec.seed >= 0, "nclust": spec.nclust is None or spec.nclust >= 2}  # fmt: skip
        bad = [k for k, ok in limits.items() if not ok or not np.isfinite(float(getattr(spec, k) or 0))]
        if bad:
            msg = (f"Harmony option(s) out of range: {', '.join(f'{k}={getattr(spec, k)!r}' for k in bad)}; "
                   "theta ≥ 0, sigma > 0, max_iter ≥ 1, n_pcs ≥ 2, seed ≥ 0, nclust ≥ 2")  # fmt: skip
            raise InputError(msg)
        return spec


@dataclass(frozen=True)
class CorrectionOutcome:
    """The corrected embedding's model name and revision, and its size (``reused``: already stored)."""

    model: str
    revision: str
    source_model: str
    source_revision: str
    batch_key: str
    n_cells: int
    n_batches: int
    dim: int
    reused: bool = False


def check_batch_key(store: Store, batch_key: str, *, datasets: Sequence[str] | None = None) -> int:
    """Check that ``batch_key`` names a batch field with ≥ 2 values among the selected cells.

    Parameters
    ----------
    store
        The store.
    batch_key
        ``sample_id`` or a dataset field (``study``, ``dataset_id``, ``technology``, …).
    datasets
        Dataset ids of the selection (default every dataset).

    Returns
    -------
    int
        Number of batches (cells whose field is empty form one ``unknown`` batch).

    Raises
    ------
    InputError
        Unknown batch key, or fewer than 2 batches in the selection.
    """
    expr = batch_sql(batch_key)
    sql = f"SELECT COUNT(DISTINCT {expr}) AS n FROM cells c JOIN datasets d USING (dataset_id)"
    params: list = []
    if datasets is not None:
        sql += " WHERE list_contains(?, c.dataset_id)"
        params.append(list(datasets))
    n = int(store.query(sql, params)["n"].iloc[0])
    if n < 2:
        msg = (
            f"batch key {batch_key!r} has {n} value(s) in the selection; Harmony needs ≥ 2 batches "
            "(set the field at ingest with --meta, or choose another --batch-key)"
        )
        raise InputError(msg)
    return n


def write_embedding(
    store: Store,
    model: str,
    revision: str,
    uids: np.ndarray,
    values: np.ndarray,
    *,
    spec: dict,
    versions: dict | None = None,
    extra_rows: Sequence[tuple[str, pd.DataFrame]] = (),
) -> None:
    """Store a derived embedding: Zarr rows, then one transaction with its catalog rows.

    The catalog gets an ``embeddings`` row (status complete), ``embedded_cells`` and ``extra_rows``
    together; if writing fails, a Zarr array this call created is removed again.

    Parameters
    ----------
    store
        The store.
    model, revision
        Identity of the new embedding (a revision already present is replaced).
    uids
        int64 ``(n,)`` sorted cell uids.
    values
        float32 ``(n, dim)`` rows in the order of ``uids``.
    spec
        JSON-ready provenance written to ``embeddings.spec``.
    versions
        Package versions written to ``embeddings.versions``.
    extra_rows
        ``(table, frame)`` pairs inserted in the same transaction; rows of ``table`` whose
        ``revision`` is this revision are deleted first.

    Raises
    ------
    InputError
        Unsorted or duplicated uids, or a row count that does not match.
    """
    import zarr

    uids = np.asarray(uids, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32)
    if uids.size == 0 or np.any(np.diff(uids) <= 0) or values.shape[0] != uids.size:
        msg = "write_embedding() needs sorted unique uids and one row of values per uid"
        raise InputError(msg)
    root = zarr.open_group(store.zarr_path, mode="a", zarr_format=3)
    is_new = f"{model}/{revision}/embedding" not in root
    try:
        arr = ensure_array(store, model, revision, dim=values.shape[1], n_rows=store.n_cells_total())
        pos = 0
        for _, part in iter_chunks(uids, arr.chunks[0]):
            write_rows(arr, part, values[pos : pos + part.size])
            pos += part.size
        stamp = now()
        with store.transaction() as con:
            con.execute("DELETE FROM embedded_cells WHERE revision = ?", [revision])
            con.execute("DELETE FROM embeddings WHERE revision = ?", [revision])
            con.execute(
                "INSERT INTO embeddings VALUES (?, ?, ?, 'float32', ?, ?, ?, ?, ?, 'complete', ?, ?)",
                [revision, model, int(values.shape[1]), json.dumps(spec, default=str), json.dumps(versions or {}),
                 f"embeddings.zarr/{model}/{revision}/embedding", int(uids.size), int(uids.size), stamp, stamp],
            )  # fmt: skip
            con.register("_done", pd.DataFrame({"revision": revision, "cell_uid": uids}))
            con.execute("INSERT INTO embedded_cells SELECT * FROM _done")
            con.unregister("_done")
            for table, frame in extra_rows:
                replace_frame(con, table, frame, {"revision": revision})
    except BaseException:
        if is_new and f"{model}/{revision}" in root:
            del root[f"{model}/{revision}"]
        raise


def correct_embedding(
    store: Store,
    model: str,
    *,
    revision: str | None = None,
    batch_key: str = "study",
    name: str | None = None,
    datasets: Sequence[str] | None = None,
    spec: HarmonySpec | None = None,
) -> CorrectionOutcome:
    """Harmony-correct ``model``'s embedding and store it as a new model revision.

    Parameters
    ----------
    store
        The store.
    model, revision
        Source embedding (latest revision by default).
    batch_key
        ``sample_id`` or a dataset field (``study``, ``dataset_id``, ``technology``, …).
    name
        Model name of the corrected embedding (default ``<model>_harmony``).
    datasets
        Restrict to these datasets' cells (default every embedded cell).
    spec
        Harmony parameters.

    Returns
    -------
    CorrectionOutcome
        ``reused`` when the same correction (source revision, cells, key, parameters) is stored.

    Raises
    ------
    InputError
        Bad name or batch key, fewer than 2 batches, no embedded cells, or more clusters
        (``spec.nclust``) than cells. Nothing is written then.
    """
    spec = spec or HarmonySpec()
    name = name or f"{model}_harmony"
    check_identifier(name, what="model name")
    if name == model:
        msg = "the corrected embedding needs a model name different from the source"
        raise InputError(msg)
    batch_sql(batch_key)  # unknown key: refuse before reading anything
    src_rev = resolve_revision(store, model, revision)
    sql = "SELECT e.cell_uid FROM embedded_cells e JOIN cells c USING (cell_uid) WHERE e.revision = ?"
    params: list = [src_rev]
    if datasets:
        sql += " AND list_contains(?, c.dataset_id)"
        params.append(list(datasets))
    uids = store.query(sql + " ORDER BY e.cell_uid", params)["cell_uid"].to_numpy(dtype=np.int64)
    if uids.size == 0:
        msg = f"no cell has a {model} embedding (revision {src_rev}) in the selection"
        raise InputError(msg)
    X = read_embedding(store, model, src_rev, uids).astype(np.float64)
    ok = np.isfinite(X).all(axis=1)
    X, uids = X[ok], uids[ok]
    batch = batch_labels(store, uids, batch_key)
    n_batches = int(batch.nunique())
    if n_batches < 2:
        msg = f"batch key {batch_key!r} has one value in the selection; nothing to correct"
        raise InputError(msg)
    if spec.nclust is not None and spec.nclust > uids.size:
        msg = f"Harmony option nclust={spec.nclust} exceeds the {uids.size} cells to correct; use fewer clusters"
        raise InputError(msg)
    cells_hash = hashlib.sha256(uids.tobytes()).hexdigest()[:16]
    ident = {"source_revision": src_rev, "batch_key": batch_key, "spec": asdict(spec), "cells": cells_hash,
             "harmonypy": version("harmonypy")}  # fmt: skip
    rev = hashlib.sha256(json.dumps({"model": name, **ident}, sort_keys=True).encode()).hexdigest()[:16]
    ensure_tables(store)
    done = store.query(
        "SELECT e.dim FROM embeddings e JOIN corrections c USING (revision) "
        "WHERE e.revision = ? AND e.status = 'complete'",
        [rev],
    )
    if not done.empty:  # the same correction is stored: make it the latest revision of ``name`` again
        with store.transaction() as con:
            con.execute("UPDATE embeddings SET updated_at = ? WHERE revision = ?", [now(), rev])
        return CorrectionOutcome(name, rev, model, src_rev, batch_key, len(uids), n_batches,
                                 int(done["dim"].iloc[0]), reused=True)  # fmt: skip
    import harmonypy

    if X.shape[1] > spec.n_pcs:
        from sklearn.decomposition import PCA

        X = PCA(n_components=spec.n_pcs, random_state=spec.seed).fit_transform(X - X.mean(axis=0))
    meta = pd.DataFrame({"batch": batch.astype(str).to_numpy()})
    ho = harmonypy.run_harmony(X, meta, ["batch"], theta=spec.theta, sigma=spec.sigma, nclust=spec.nclust,
                               max_iter_harmony=spec.max_iter, random_state=spec.seed, verbose=False)  # fmt: skip
    Z = np.asarray(ho.Z_corr, dtype=np.float32)
    Z = Z.T if Z.shape != X.shape else Z
    ds = store.query("SELECT DISTINCT dataset_id FROM cells WHERE list_contains(?, cell_uid) ORDER BY 1",
                     [uids.tolist()])["dataset_id"].tolist()  # fmt: skip
    emb_spec = {"corrected_from": {"model": model, "revision": src_rev}, "method": "harmony", **ident,
                "datasets": ds}  # fmt: skip
    row = pd.DataFrame([{"revision": rev, "model": name, "source_model": model, "source_revision": src_rev,
                         "method": "harmony", "batch_key": batch_key, "n_cells": len(uids),
                         "n_batches": n_batches, "params": json.dumps(asdict(spec)), "created_at": now()}])  # fmt: skip
    write_embedding(store, name, rev, uids, Z, spec=emb_spec, versions={"harmonypy": version("harmonypy")},
                    extra_rows=[("corrections", row)])  # fmt: skip
    return CorrectionOutcome(name, rev, model, src_rev, batch_key, len(uids), n_batches, int(Z.shape[1]))


def load_correction(
    store: Store, model: str, *, revision: str | None = None, source_model: str | None = None,
    source_revision: str | None = None,
) -> CorrectionOutcome:  # fmt: skip
    """The stored correction ``model`` (latest revision unless given), checked against its source.

    Raises
    ------
    InputError
        ``model`` is not a corrected embedding, or was corrected from another model or revision
        than ``source_model`` / ``source_revision`` (a revision prefix is accepted).
    StoreError
        No embedding of ``model``.
    """
    rev = resolve_revision(store, model, revision)
    ensure_tables(store)
    row = store.query(
        "SELECT c.*, e.dim FROM corrections c JOIN embeddings e USING (revision) WHERE c.revision = ?", [rev]
    )
    if row.empty:
        msg = f"{model!r} (revision {rev}) is not a corrected embedding; make one with `scdrugmap embed --model M --correct harmony`"
        raise InputError(msg)
    r = row.iloc[0]
    if source_model is not None and r["source_model"] != source_model:
        msg = f"{model!r} was corrected from {r['source_model']!r}, not {source_model!r}; use --model {r['source_model']}"
        raise InputError(msg)
    if source_revision is not None and not str(r["source_revision"]).startswith(source_revision):
        msg = (
            f"{model!r} revision {rev} was corrected from {r['source_model']} revision {r['source_revision']}, "
            f"not {source_revision!r}; drop --revision or re-run `scdrugmap embed --correct harmony`"
        )
        raise InputError(msg)
    return CorrectionOutcome(model, rev, str(r["source_model"]), str(r["source_revision"]), str(r["batch_key"]),
                             int(r["n_cells"]), int(r["n_batches"]), int(r["dim"]), reused=True)  # fmt: skip
