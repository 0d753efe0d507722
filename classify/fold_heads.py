"""The model that scores new cells: the mean of a run's fold heads, with validated calibration.

The run's calibrators are fitted on its out-of-fold predictions, i.e. on scores of *fold heads*
(each trained without the cells it scored). New cells are therefore scored by the same kind of
model: every fold head is re-trained exactly as in the evaluation (same training cells, head,
hyper-parameters, seed ``seed + fold``, grouping for internal validation, few-shot cells) and
their probabilities are averaged. A head re-fitted on all cells would be a different, more
confident model than the one the calibrator describes.

Saved once per run under ``<store>/heads/<run_id>/`` (built in a temporary folder, then moved)::

    ensemble.json      run, model, revision, positive class, folds, calibrators, default
                       calibration and its out-of-study figures
    fold-<f>/          one head per fold (:func:`classify.persist.save_head`)
    train_rows.npz     ``hash`` (uint64 content hash of each training cell's expression row,
                       :func:`row_hashes`) and ``cell_uid``: recognises cells that trained the head

The calibration checks also go to the catalog table ``calibration_checks``
(:mod:`classify.calibration_check`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.classify.calibrate import fit_calibrator
from scdrugmap.classify.calibration_check import default_calibration, out_of_study_checks, store_checks
from scdrugmap.classify.heads import HeadSpec, make_head
from scdrugmap.classify.persist import load_head, save_head
from scdrugmap.classify.runs import fold_masks
from scdrugmap.store.catalog import Store
from scdrugmap.store.embeddings import read_embedding
from scdrugmap.store.errors import InputError
from scdrugmap.store.progress import track

__all__ = ["FoldEnsemble", "calibration_meta", "fold_ensemble", "lora_meta", "oof_predictions", "row_hashes"]

FORMAT = 2


@dataclass
class FoldEnsemble:
    """A run's fold heads and calibration.

    Attributes
    ----------
    heads
        Fitted fold heads (``predict_proba(X) -> (n,)``).
    meta
        ``ensemble.json``: ``run_id, model, revision, positive_class, folds, calibrators``
        (platt/isotonic maps fitted on all out-of-fold predictions), ``default_calibration``,
        ``default_reason``, ``out_of_study`` (pooled figures per method), ``n_train``.
    train_hash, train_uid
        uint64 / int64 ``(n_train,)``: content hashes of the training cells' expression rows.
    """

    heads: list[Any]
    meta: dict[str, Any]
    train_hash: np.ndarray
    train_uid: np.ndarray

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Mean positive-class probability of the fold heads, ``(n,)``."""
        return np.mean([h.predict_proba(X) for h in self.heads], axis=0)


def row_hashes(X: Any) -> np.ndarray:
    """uint64 ``(n_rows,)`` content hash of each row of an expression matrix.

    Rows are hashed as float32 CSR (sorted column indices, explicit zeros dropped), so the same
    cells hash equally whether read from the user's file or from the store's QC-filtered copy.
    """
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    X.sum_duplicates()
    X.eliminate_zeros()
    X.sort_indices()
    out = np.empty(X.shape[0], dtype=np.uint64)
    ind, data, ptr = X.indices.astype(np.int32), X.data, X.indptr
    width = np.int64(X.shape[1]).tobytes()
    for i in range(X.shape[0]):
        h = hashlib.blake2b(width, digest_size=8)
        h.update(ind[ptr[i] : ptr[i + 1]].tobytes())
        h.update(data[ptr[i] : ptr[i + 1]].tobytes())
        out[i] = np.frombuffer(h.digest(), dtype=np.uint64)[0]
    return out


def oof_predictions(store: Store, run_id: str) -> pd.DataFrame:
    """The run's out-of-fold predictions: ``cell_uid, fold, probability, label, dataset_id, study``."""
    return store.query(
        "SELECT p.cell_uid, p.fold, p.probability, c.label, c.dataset_id, COALESCE(d.study, d.dataset_id) AS study "
        "FROM predictions p JOIN cells c USING (cell_uid) JOIN datasets d USING (dataset_id) "
        "WHERE p.run_id = ? ORDER BY p.cell_uid",
        [run_id],
    )


def _run_cells(store: Store, row: pd.Series) -> pd.DataFrame:
    """The run's cells with their test fold and split groups, as the evaluation used them."""
    from scdrugmap.classify.folds import group_keys

    cells = store.query(
        "SELECT f.cell_uid, f.fold, c.label, c.dataset_id, c.sample_id, c.patient_id, "
        "COALESCE(d.study, d.dataset_id) AS study FROM folds f JOIN cells c USING (cell_uid) "
        "JOIN datasets d USING (dataset_id) WHERE f.fold_set_id = ? ORDER BY f.cell_uid",
        [row["fold_set_id"]],
    )
    min_conf = row.get("min_confidence")
    if pd.notna(min_conf) and int(min_conf):
        from scdrugmap.classify.analyze.confidence import confident_datasets

        kept = confident_datasets(store, cells, min_confidence=int(min_conf),
                                  what=f"{row['category']} = {row['value']!r}", protocol=str(row["protocol"]))  # fmt: skip
        cells = cells[cells["dataset_id"].isin(kept)].reset_index(drop=True)
    cells["group"] = group_keys(cells, "sample" if row["grouping"] == "cell" else row["grouping"])
    return cells


def _train_hashes(store: Store, cells: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    import anndata as ad

    hashes, uids = [], []
    for ds in sorted(set(cells["dataset_id"])):
        path = store.dataset_file(ds)
        if not path.exists():
            continue
        a = ad.read_h5ad(path)
        if a.n_vars == 0 or "cell_uid" not in a.obs:
            continue
        hashes.append(row_hashes(a.X))
        uids.append(a.obs["cell_uid"].to_numpy(dtype=np.int64))
    if not hashes:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    h, u = np.concatenate(hashes), np.concatenate(uids)
    keep = np.isin(u, cells["cell_uid"].to_numpy(dtype=np.int64))
    return h[keep], u[keep]


def calibration_meta(store: Store, row: pd.Series) -> dict[str, Any]:
    """Calibrators fitted on all out-of-fold predictions, their out-of-study check (stored) and the default.

    Returns
    -------
    dict
        ``calibrators`` (platt/isotonic maps; empty when the out-of-fold predictions hold one
        class), ``default_calibration``, ``default_reason``, ``out_of_study`` (pooled figures per
        method), ``n_studies``.
    """
    oof = oof_predictions(store, str(row["run_id"]))
    y_oof = (oof["label"] == row["positive_class"]).to_numpy().astype(int)
    p_oof = oof["probability"].to_numpy(dtype=float)
    calibrators = (
        {m: fit_calibrator(p_oof, y_oof, method=m).to_dict() for m in ("platt", "isotonic")}
        if np.unique(y_oof).size == 2
        else {}
    )
    checks = out_of_study_checks(p_oof, y_oof, oof["study"].to_numpy())
    store_checks(store, str(row["run_id"]), checks)
    method, why = default_calibration(checks)
    pooled = checks[checks["study"] == "*"].set_index("method").drop(columns=["study"])
    figures = {m: {k: None if pd.isna(v) else v if isinstance(v, str) else float(v) for k, v in r.items()}
               for m, r in pooled.to_dict("index").items()}  # fmt: skip
    return {"calibrators": calibrators, "default_calibration": method, "default_reason": why,
            "out_of_study": figures, "n_studies": int(oof["study"].nunique())}  # fmt: skip


def lora_meta(store: Store, row: pd.Series, fold: int) -> dict[str, Any]:
    """Provenance, calibration and training-row hashes of one fold of a LoRA run (hashes cached)."""
    cache = store.path / "heads" / str(row["run_id"]) / "lora_train_rows.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            h, u = z["hash"], z["cell_uid"]
    else:
        h, u = _train_hashes(store, _run_cells(store, row))
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, hash=h, cell_uid=u)
        os.replace(tmp, cache)
    return {"run_id": row["run_id"], "model": row["model"], "revision": row["revision"], "head": row["head"],
            "positive_class": row["positive_class"], "folds": [fold], **calibration_meta(store, row),
            "train_hash": h, "train_uid": u}  # fmt: skip


def _build(store: Store, row: pd.Series, directory: Path) -> None:
    cells = _run_cells(store, row)
    X = read_embedding(store, row["model"], row["revision"], cells["cell_uid"].to_numpy())
    ok = np.isfinite(X).all(axis=1)
    cells, X = cells.loc[ok].reset_index(drop=True), X[ok]
    y = (cells["label"] == row["positive_class"]).to_numpy().astype(int)
    spec_json = json.loads(row["spec"]) if row["spec"] else {}
    groups = cells["cell_uid"].to_numpy() if row["grouping"] == "cell" else cells["group"].to_numpy()
    hspec = HeadSpec.stored(row["head"], json.loads(row["head_params"]))
    n_folds = int(store.query("SELECT n_folds FROM fold_sets WHERE fold_set_id = ?", [row["fold_set_id"]])
                  ["n_folds"].iloc[0])  # fmt: skip
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        folds = []
        for f in track(range(n_folds), "fold heads", unit="folds"):
            train, _ = fold_masks(cells["fold"].to_numpy(), y, f, shots=int(spec_json.get("shots", 0)),
                                  seed=int(row["seed"]), prevalence=float(spec_json.get("prevalence", 0.0)))  # fmt: skip
            if np.unique(y[train]).size < 2:
                continue  # as in the evaluation: no head for a one-class training side
            head = make_head(hspec, seed=int(row["seed"]) + f).fit(X[train], y[train], groups=groups[train])
            save_head(head, hspec, tmp / f"fold-{f}", extra={"run_id": row["run_id"], "fold": f})
            folds.append(f)
        if not folds:
            msg = (
                f"run {row['run_id']}: no fold has both classes on its training side; nothing to predict with"
            )
            raise InputError(msg)
        h, u = _train_hashes(store, cells)
        np.savez(tmp / "train_rows.npz", hash=h, cell_uid=u)
        meta = {
            "format": FORMAT, "run_id": row["run_id"], "model": row["model"], "revision": row["revision"],
            "head": row["head"], "positive_class": row["positive_class"], "folds": folds,
            **calibration_meta(store, row), "n_train": len(cells),
        }  # fmt: skip
        (tmp / "ensemble.json").write_text(json.dumps(meta, indent=1, default=str))
        if directory.exists():
            shutil.rmtree(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fold_ensemble(store: Store, row: pd.Series) -> FoldEnsemble:
    """The run's fold-head ensemble (trained, checked and saved on first use).

    Parameters
    ----------
    store
        The store holding the run.
    row
        The run's complete ``eval_runs`` row (frozen strategy).

    Returns
    -------
    FoldEnsemble

    Raises
    ------
    InputError
        No fold with both classes, or a head type that cannot be saved (``rf``).
    """
    directory = store.path / "heads" / str(row["run_id"])
    meta_path = directory / "ensemble.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("format") != FORMAT:  # absent, or an older single refitted head: build
        _build(store, row, directory)
        meta = json.loads(meta_path.read_text())
    heads = [load_head(directory / f"fold-{f}")[0] for f in meta["folds"]]
    with np.load(directory / "train_rows.npz", allow_pickle=False) as z:
        h, u = z["hash"], z["cell_uid"]
    return FoldEnsemble(heads, meta, h, u)
