"""Harmony batch correction of a stored embedding, as a new evaluable revision (scDrugMap Suppl. Note 2).

:func:`correct_embedding` reads a model's embedding of every embedded cell (or a dataset
selection), runs Harmony (``harmonypy``; on the first ``n_pcs`` principal components when the
embedding is wider) with one batch per value of ``batch_key`` (a dataset field such as ``study``
or ``technology``, or ``sample_id``), and writes the corrected coordinates as model
``<model>_harmony`` (or ``name``) with its own revision: Zarr rows, an ``embeddings`` row whose
spec records ``corrected_from`` / ``batch_key`` / parameters, ``embedded_cells``, and a row in the
``corrections`` table. ``scdrugmap evaluate --model pca_harmony`` then evaluates it like any other
embedding, and :func:`compare_correction` puts both evaluations side by side.

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

from classify.analyze.tables import now, replace_rows
from store.catalog import Store
from store.embeddings import ensure_array, iter_chunks, open_array, read_rows, resolve_revision, write_rows
from store.errors import InputError
from store.metadata import check_identifier

__all__ = ["CorrectionOutcome", "HarmonySpec", "compare_correction", "correct_embedding", "write_embedding"]


@dataclass(frozen=True)
class HarmonySpec:
    """Harmony parameters (``theta`` diversity penalty, ``max_iter``; ``n_pcs`` for wide embeddings)."""

    theta: float = 2.0
    max_iter: int = 20
    n_pcs: int = 50
    seed: int = 0


@dataclass(frozen=True)
class CorrectionOutcome:
    """The corrected embedding's model name and revision, and its size."""

    model: str
    revision: str
    source_model: str
    source_revision: str
    batch_key: str
    n_cells: int
    n_batches: int
    dim: int


def _batches(store: Store, uids: np.ndarray, batch_key: str) -> pd.Series:
    from classify.folds import CATEGORIES

    if batch_key == "sample_id":
        expr = "COALESCE(c.dataset_id || '/' || c.sample_id, c.dataset_id)"
    elif batch_key in CATEGORIES:
        expr = f"CAST(d.{batch_key} AS VARCHAR)"
    else:
        msg = f"unknown batch key {batch_key!r}; use sample_id or a dataset field: {', '.join(CATEGORIES)}"
        raise InputError(msg)
    df = store.query(
        f"SELECT c.cell_uid, {expr} AS batch FROM cells c JOIN datasets d USING (dataset_id) "
        "WHERE list_contains(?, c.cell_uid)",
        [uids.tolist()],
    ).set_index("cell_uid")["batch"]
    return df.reindex(uids).fillna("unknown")


def write_embedding(
    store: Store,
    model: str,
    revision: str,
    uids: np.ndarray,
    values: np.ndarray,
    *,
    spec: dict,
    versions: dict | None = None,
) -> None:
    """Store a derived embedding: Zarr rows, an ``embeddings`` row (status complete) and ``embedded_cells``.

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
    """
    uids = np.asarray(uids, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32)
    if uids.size == 0 or np.any(np.diff(uids) <= 0) or values.shape[0] != uids.size:
        msg = "write_embedding() needs sorted unique uids and one row of values per uid"
        raise InputError(msg)
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

    Raises
    ------
    InputError
        Bad name or batch key, fewer than 2 batches, or no embedded cells.
    """
    import harmonypy

    spec = spec or HarmonySpec()
    name = name or f"{model}_harmony"
    check_identifier(name, what="model name")
    if name == model:
        msg = "the corrected embedding needs a model name different from the source"
        raise InputError(msg)
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
    batch = _batches(store, uids, batch_key)
    if batch.nunique() < 2:
        msg = f"batch key {batch_key!r} has one value in the selection; nothing to correct"
        raise InputError(msg)
    X = read_rows(open_array(store, model, src_rev), uids).astype(np.float64)
    ok = np.isfinite(X).all(axis=1)
    X, uids, batch = X[ok], uids[ok], batch[ok]
    if X.shape[1] > spec.n_pcs:
        from sklearn.decomposition import PCA

        X = PCA(n_components=spec.n_pcs, random_state=spec.seed).fit_transform(X - X.mean(axis=0))
    meta = pd.DataFrame({"batch": batch.astype(str).to_numpy()})
    ho = harmonypy.run_harmony(X, meta, ["batch"], theta=spec.theta, max_iter_harmony=spec.max_iter,
                               random_state=spec.seed, verbose=False)  # fmt: skip
    Z = np.asarray(ho.Z_corr, dtype=np.float32)
    Z = Z.T if Z.shape != X.shape else Z
    cells_hash = hashlib.sha256(uids.tobytes()).hexdigest()[:16]
    ident = {"source_revision": src_rev, "batch_key": batch_key, "spec": asdict(spec), "cells": cells_hash,
             "harmonypy": version("harmonypy")}  # fmt: skip
    rev = hashlib.sha256(json.dumps({"model": name, **ident}, sort_keys=True).encode()).hexdigest()[:16]
    ds = store.query("SELECT DISTINCT dataset_id FROM cells WHERE list_contains(?, cell_uid) ORDER BY 1",
                     [uids.tolist()])["dataset_id"].tolist()  # fmt: skip
    emb_spec = {
        "corrected_from": {"model": model, "revision": src_rev},
        "method": "harmony",
        **ident,
        "datasets": ds,
    }
    write_embedding(store, name, rev, uids, Z, spec=emb_spec, versions={"harmonypy": version("harmonypy")})
    stamp = now()
    row = pd.DataFrame([{"revision": rev, "model": name, "source_model": model, "source_revision": src_rev,
                         "method": "harmony", "batch_key": batch_key, "n_cells": len(uids),
                         "n_batches": int(batch.nunique()), "params": json.dumps(asdict(spec)), "created_at": stamp}])  # fmt: skip
    replace_rows(store, [("corrections", row)], key={"revision": rev})
    return CorrectionOutcome(
        name, rev, model, src_rev, batch_key, len(uids), int(batch.nunique()), int(Z.shape[1])
    )


def compare_correction(
    store: Store,
    outcome: CorrectionOutcome,
    *,
    head: str = "logreg",
    protocol: str = "cross",
    category: str = "tissue",
    value: str | None = None,
    metric: str = "auroc",
    seed: int = 0,
) -> pd.DataFrame:
    """Evaluate the uncorrected and the corrected embedding the same way; side-by-side metric.

    Returns
    -------
    pandas.DataFrame
        ``category, value, protocol, head, <metric>_uncorrected, <metric>_corrected, difference``
        (means over folds where defined).
    """
    from classify.evaluate import evaluate, summarise

    cols = {}
    for tag, (model, rev) in {"uncorrected": (outcome.source_model, outcome.source_revision),
                              "corrected": (outcome.model, outcome.revision)}.items():  # fmt: skip
        outs = evaluate(store, model=model, revision=rev, head=head, protocol=protocol, category=category,
                        value=value, seed=seed)  # fmt: skip
        s = summarise(store, [o.run_id for o in outs])
        cols[tag] = s[s["metric"] == metric].set_index("value")["mean"]
    out = pd.DataFrame(
        {f"{metric}_uncorrected": cols["uncorrected"], f"{metric}_corrected": cols["corrected"]}
    )
    out["difference"] = out[f"{metric}_corrected"] - out[f"{metric}_uncorrected"]
    return (
        out.rename_axis("value")
        .reset_index()
        .assign(category=category, protocol=protocol, head=head)[
            [
                "category",
                "value",
                "protocol",
                "head",
                f"{metric}_uncorrected",
                f"{metric}_corrected",
                "difference",
            ]
        ]
    )
