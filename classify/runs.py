"""Fold loop and catalog writing shared by every training strategy (frozen heads, LoRA).

:func:`run_folds` trains/scores one model per persisted fold through a ``fit_predict``
callback and computes per-fold metrics; :func:`write_run` stores the run row, its metrics and
its predictions in one transaction (replacing an earlier run with the same id).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from scdrugmap.classify.metrics import METRICS, fold_metrics
from scdrugmap.store.catalog import Store
from scdrugmap.store.progress import track

__all__ = [
    "combine_folds",
    "completed_run",
    "fold_masks",
    "head_fit_predict",
    "run_fold",
    "run_folds",
    "write_run",
]

FitPredict = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def fold_masks(
    folds: np.ndarray, y: np.ndarray, fold: int, *, shots: int = 0, seed: int = 0, prevalence: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Train/test masks of one fold; with ``shots`` K, K cells per class of the test side train too.

    Few-shot adaptation (scDrugMap's cross-data setting extended): the K labelled cells per class
    are drawn from the held-out side with ``numpy.random.default_rng(seed + fold)`` and removed
    from the evaluated cells. With ``prevalence`` P (0 < P < 1), the test side is subsampled (seeded)
    to a positive fraction of P by dropping cells of the over-represented class; dropped cells are
    neither trained nor scored.

    Returns
    -------
    tuple of numpy.ndarray
        bool ``(n_cells,)`` train and test masks.
    """
    test = folds == fold
    train = ~test
    if shots > 0:
        rng = np.random.default_rng(seed + fold)
        for cls in (0, 1):
            idx = np.flatnonzero(test & (y == cls))
            take = rng.choice(idx, size=min(shots, idx.size), replace=False) if idx.size else idx
            train[take] = True
            test[take] = False
    if prevalence:
        test &= _subsample_to(test, y, prevalence, np.random.default_rng([seed, fold, 1]))
    return train, test


def _subsample_to(test: np.ndarray, y: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    pos, neg = np.flatnonzero(test & (y == 1)), np.flatnonzero(test & (y == 0))
    keep = np.zeros_like(test)
    if pos.size == 0 or neg.size == 0:
        keep[test] = True
        return keep
    if pos.size / (pos.size + neg.size) > p:
        pos = rng.choice(pos, max(1, round(p * neg.size / (1 - p))), replace=False)
    else:
        neg = rng.choice(neg, max(1, min(neg.size, round(pos.size * (1 - p) / p))), replace=False)
    keep[pos] = keep[neg] = True
    return keep


def run_folds(
    cell_uids: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    n_folds: int,
    fit_predict: FitPredict,
    *,
    shots: int = 0,
    seed: int = 0,
    prevalence: float = 0.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and score per fold.

    Parameters
    ----------
    cell_uids
        int64 ``(n_cells,)``.
    y
        0/1 ``(n_cells,)`` (1 = positive class).
    folds
        ``(n_cells,)`` test-fold index of each cell.
    n_folds
        Number of folds.
    fit_predict
        ``(train_index, test_index, fold) -> probability (len(test_index),)``.
    shots, seed, prevalence
        Few-shot cells per class moved from the test side; test-side subsampling to a positive
        fraction (see :func:`fold_masks`).

    Returns
    -------
    tuple of pandas.DataFrame
        metrics (fold, metric, value, reason, n_train, n_test) and predictions
        (fold, cell_uid, probability). Folds whose training side has one class get NULL
        metrics with that reason and no predictions.
    """
    parts = [
        run_fold(cell_uids, y, folds, f, fit_predict, shots=shots, seed=seed, prevalence=prevalence)
        for f in track(range(n_folds), "evaluate", unit="folds")
    ]
    return combine_folds(parts)


def head_fit_predict(
    head: Any, X: np.ndarray, y: np.ndarray, groups: np.ndarray, *, seed: int, threads: int = 1
) -> FitPredict:
    """The ``fit_predict`` of a frozen-embedding run: a fresh head per fold, seeded ``seed + fold``.

    Parameters
    ----------
    head
        A :class:`classify.heads.HeadSpec`.
    X, y, groups
        ``(n_cells, d)`` embeddings, 0/1 labels and the split unit of each cell (heads that validate
        internally keep it grouped).
    seed, threads
        Run seed and the threads each fit may use (recorded in the run spec).
    """
    from scdrugmap.classify.heads import make_head

    def fit_predict(train: np.ndarray, test: np.ndarray, fold: int) -> np.ndarray:
        model = make_head(head, seed=seed + fold, threads=threads)
        return model.fit(X[train], y[train], groups=groups[train]).predict_proba(X[test])

    return fit_predict


def run_fold(
    cell_uids: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    fold: int,
    fit_predict: FitPredict,
    *,
    shots: int = 0,
    seed: int = 0,
    prevalence: float = 0.0,
) -> tuple[list[dict[str, Any]], pd.DataFrame | None]:
    """Train and score one fold (see :func:`run_folds`); the unit of work of the evaluation grid.

    Returns
    -------
    tuple
        The fold's metric rows (dicts: fold, metric, value, reason, n_train, n_test) and its
        predictions (fold, cell_uid, probability; None when the fold could not be scored).
    """
    train, test = fold_masks(folds, y, fold, shots=shots, seed=seed, prevalence=prevalence)
    n_train, n_test = int(train.sum()), int(test.sum())
    preds = None
    if np.unique(y[train]).size < 2:
        vals = dict.fromkeys(METRICS, (None, "training side has one class"))
    elif n_test == 0:
        vals = dict.fromkeys(METRICS, (None, "empty test fold"))
    else:
        prob = np.asarray(fit_predict(np.flatnonzero(train), np.flatnonzero(test), fold), dtype=float)
        vals = fold_metrics(y[test], prob)
        preds = pd.DataFrame({"fold": fold, "cell_uid": cell_uids[test], "probability": prob})
    rows = [
        {"fold": fold, "metric": m, "value": v, "reason": reason, "n_train": n_train, "n_test": n_test}
        for m, (v, reason) in vals.items()
    ]
    return rows, preds


def combine_folds(
    parts: list[tuple[list[dict[str, Any]], pd.DataFrame | None]],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`run_fold` results, in fold order, as the metrics and predictions tables of a run."""
    metric_rows = [r for rows, _ in parts for r in rows]
    pred_parts = [p for _, p in parts if p is not None]
    preds = (
        pd.concat(pred_parts, ignore_index=True)
        if pred_parts
        else pd.DataFrame({"fold": [], "cell_uid": [], "probability": []})
    )
    return pd.DataFrame(metric_rows), preds


def completed_run(store: Store, run_id: str) -> pd.Series | None:
    """The ``eval_runs`` row of a complete run, or None."""
    old = store.query("SELECT * FROM eval_runs WHERE run_id = ? AND status = 'complete'", [run_id])
    return None if old.empty else old.iloc[0]


def write_run(
    store: Store,
    row: dict[str, Any],
    metrics: pd.DataFrame,
    preds: pd.DataFrame,
    *,
    extra: dict[str, tuple[str, pd.DataFrame]] | None = None,
) -> None:
    """Replace run ``row['run_id']`` with this row, metrics and predictions, in one transaction.

    Parameters
    ----------
    store
        The store.
    row
        The ``eval_runs`` row (column → value).
    metrics, preds
        Per-fold metrics and per-cell predictions (``run_id`` is set here).
    extra
        Strategy-specific tables written in the same transaction: ``{table: (CREATE TABLE IF NOT
        EXISTS … DDL, rows with a run_id column)}``; their earlier rows of this run are replaced too.
    """
    run_id = row["run_id"]
    extra = extra or {}
    metrics = metrics.assign(run_id=run_id)[
        ["run_id", "fold", "metric", "value", "reason", "n_train", "n_test"]
    ]
    preds = preds.assign(run_id=run_id)[["run_id", "fold", "cell_uid", "probability"]]
    tables = {"metrics": metrics, "predictions": preds, **{name: df for name, (_, df) in extra.items()}}
    with store.transaction() as con:
        for ddl, _ in extra.values():
            con.execute(ddl)
        for table in ("eval_runs", *tables):
            con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
        con.execute(
            f"INSERT INTO eval_runs ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
            list(row.values()),
        )
        for name, df in tables.items():
            con.register("_rows", df)
            con.execute(f"INSERT INTO {name} ({', '.join(df.columns)}) SELECT * FROM _rows")
            con.unregister("_rows")
