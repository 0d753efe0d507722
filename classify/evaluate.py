"""Pooled-data and cross-data evaluation of frozen embeddings + a head; results into the catalog.

A run is keyed by its full spec (:class:`RunSpec`: embedding revision, head and its
hyper-parameters, protocol, fold set, seed, positive class, label-confidence filter). Evaluating
the same spec again answers from the catalog unless ``rerun=True``. Each run writes its
``eval_runs`` row, one ``metrics`` row per fold × metric and one ``predictions`` row per test cell,
in one transaction; then its metrics per label-confidence stratum (``confidence_metrics``).

``min_confidence=K`` keeps only cells of datasets with ≥ K stars (effective stars:
:func:`classify.analyze.confidence.dataset_confidence`) on both the training and the test side. The
cells keep their folds of the persisted (unfiltered) fold set, so a filtered run is scored on the
same partition as the unfiltered one; folds left without test cells get NULL metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pandas as pd

from scdrugmap.classify.analyze.confidence import confidence_metrics, confident_datasets
from scdrugmap.classify.folds import (
    FoldSet,
    Grouping,
    Protocol,
    category_values,
    get_fold_set,
    labelled_cells,
)
from scdrugmap.classify.heads import HeadSpec
from scdrugmap.classify.runs import head_fit_predict, run_folds, write_run
from scdrugmap.embedder.base import spec_hash
from scdrugmap.store.catalog import Store
from scdrugmap.store.embeddings import read_embedding, resolve_revision
from scdrugmap.store.errors import InputError, StoreError

__all__ = ["PlannedRun", "RunOutcome", "RunSpec", "evaluate", "plan_runs", "summarise"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's results (hashed into ``run_id``)."""

    model: str
    revision: str
    strategy: Literal["frozen"]
    head: HeadSpec
    protocol: Protocol
    category: str
    value: str
    fold_set_id: str
    grouping: str
    k: int
    seed: int
    positive_class: Literal["sensitive", "resistant"]
    shots: int = 0
    min_confidence: int = 0
    selection: str = ""
    prevalence: float = 0.0

    @property
    def run_id(self) -> str:
        """``run-`` + 16 hex of the spec hash.

        ``min_confidence`` (stars) and ``selection`` (hash of the cells the filter kept, so a run is
        not reused after stars change) enter the hash only when a filter is set: unfiltered runs
        keep the ids they had before the filter existed.
        """
        spec = asdict(self)
        if not self.min_confidence:
            del spec["min_confidence"], spec["selection"]
        if not self.prevalence:  # test-side subsampling (``prevalence``) likewise
            del spec["prevalence"]
        return "run-" + spec_hash(spec)


@dataclass(frozen=True)
class RunOutcome:
    """A finished (or reused) run."""

    run_id: str
    spec: RunSpec
    reused: bool
    n_cells: int
    n_excluded: int


def embeddings_for(
    store: Store, model: str, revision: str, fs: FoldSet, cells: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray]:
    """Embedding rows ``(n_cells, dim)`` of ``cells`` and a bool mask of finite rows.

    Raises
    ------
    StoreError
        When cells of the fold set have no embedding of this revision.
    """
    uids = cells["cell_uid"].to_numpy(dtype=np.int64)
    done = store.query(
        "SELECT f.cell_uid FROM folds f SEMI JOIN embedded_cells e ON e.cell_uid = f.cell_uid AND e.revision = ? "
        "WHERE f.fold_set_id = ?",
        [revision, fs.fold_set_id],
    )
    missing = np.setdiff1d(uids, done["cell_uid"].to_numpy(dtype=np.int64))
    if missing.size:
        ds = store.query(
            "SELECT DISTINCT dataset_id FROM cells WHERE list_contains(?, cell_uid) ORDER BY 1",
            [missing[:10000].tolist()],
        )["dataset_id"].tolist()
        msg = (
            f"{missing.size} cells of {fs.spec.category} = {fs.spec.value!r} have no {model} embedding "
            f"(revision {revision}); run `scdrugmap embed --model {model} --datasets {','.join(ds)}`"
        )
        raise StoreError(msg)
    X = read_embedding(store, model, revision, uids)
    ok = np.isfinite(X).all(axis=1)
    return X, ok


def _evaluate_one(
    store: Store, spec: RunSpec, fs: FoldSet, rerun: bool, cells: pd.DataFrame, *, threads: int = 1
) -> RunOutcome:
    run_id = spec.run_id
    old = store.query(
        "SELECT n_cells, n_excluded FROM eval_runs WHERE run_id = ? AND status = 'complete'", [run_id]
    )
    if not old.empty and not rerun:
        return RunOutcome(run_id, spec, True, int(old["n_cells"].iloc[0]), int(old["n_excluded"].iloc[0]))
    t0 = time.perf_counter()
    kept_folds = set(cells["fold"])
    X, ok = embeddings_for(store, spec.model, spec.revision, fs, cells)
    if not ok.all():
        log.warning(
            "%d cells have a NaN %s embedding (no known genes) and are left out", int((~ok).sum()), spec.model
        )
    cells = cells.loc[ok].reset_index(drop=True)
    X = X[ok]
    y = (cells["label"] == spec.positive_class).to_numpy().astype(int)

    fit_predict = head_fit_predict(spec.head, X, y, split_groups(cells, spec.grouping), seed=spec.seed,
                                   threads=threads)  # fmt: skip
    metrics, preds = run_folds(
        cells["cell_uid"].to_numpy(), y, cells["fold"].to_numpy(), len(fs.fold_names), fit_predict,
        shots=spec.shots, seed=spec.seed, prevalence=spec.prevalence,
    )  # fmt: skip
    row = run_row(spec, fs, cells, kept_folds, metrics, n_excluded=int((~ok).sum()), threads=threads,
                  duration_s=time.perf_counter() - t0)  # fmt: skip
    write_run(store, row, metrics, preds)
    return RunOutcome(run_id, spec, False, len(cells), int((~ok).sum()))


def split_groups(cells: pd.DataFrame, grouping: str) -> np.ndarray:
    """The unit heads that validate internally (mlp) keep together: the folds' own unit."""
    return cells["cell_uid"].to_numpy() if grouping == "cell" else cells["group"].to_numpy()


def run_row(
    spec: RunSpec,
    fs: FoldSet,
    cells: pd.DataFrame,
    kept_folds: set[int],
    metrics: pd.DataFrame,
    *,
    n_excluded: int,
    threads: int,
    duration_s: float,
) -> dict[str, Any]:
    """The ``eval_runs`` row of a finished run (``metrics`` gets the reason of folds a
    label-confidence filter emptied). ``threads`` per fit is recorded in the stored spec."""
    if spec.min_confidence:
        emptied = sorted(set(fs.cells["fold"]) - kept_folds)
        gone = metrics["fold"].isin(emptied)
        metrics.loc[gone, "reason"] = f"no test cells from datasets with ≥ {spec.min_confidence} stars"
    return {
        "run_id": spec.run_id,
        "model": spec.model,
        "revision": spec.revision,
        "strategy": spec.strategy,
        "head": spec.head.name,
        "head_params": json.dumps(spec.head.as_dict()),
        "protocol": spec.protocol,
        "category": spec.category,
        "value": spec.value,
        "fold_set_id": spec.fold_set_id,
        "grouping": spec.grouping,
        "k": spec.k,
        "seed": spec.seed,
        "positive_class": spec.positive_class,
        "spec": json.dumps({**asdict(spec), "threads": int(threads)}, default=str),
        "versions": json.dumps(_versions()),
        "n_cells": len(cells),
        "n_excluded": n_excluded,
        "status": "complete",
        "created_at": datetime.now(UTC).replace(tzinfo=None),
        "duration_s": duration_s,
        "min_confidence": spec.min_confidence,
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("scikit-learn", "lightgbm", "torch", "numpy")}


def evaluate(
    store: Store,
    *,
    model: str,
    head: str = "mlp",
    protocol: Protocol = "pooled",
    category: str = "tissue",
    value: str | None = None,
    grouping: Grouping | None = None,
    k: int = 10,
    seed: int = 0,
    positive_class: Literal["sensitive", "resistant"] = "sensitive",
    revision: str | None = None,
    head_params: dict[str, Any] | None = None,
    shots: int = 0,
    min_confidence: int = 0,
    rerun: bool = False,
    seeds: Sequence[int] | None = None,
    prevalence: float = 0.0,
    train_where: str = "",
    test_where: str = "",
    threads: int = 1,
) -> list[RunOutcome]:
    """Evaluate ``model``'s frozen embedding with a head on one or all values of a category.

    Parameters
    ----------
    store
        The store.
    model
        Embedding model name (its latest revision unless ``revision`` is given).
    head
        ``mlp`` (trained to convergence), ``mlp_paper`` (scDrugMap's fixed 10 epochs), ``logreg``,
        ``lightgbm`` or ``rf``; ``head_params`` override its defaults.
    protocol
        ``pooled`` (k-fold CV within the value), ``cross`` (leave-one-study-out) or ``external``
        (train on the ``train_where`` datasets of the value, default the primary collection; test on
        the ``test_where`` ones, default the others).
    category, value
        E.g. ``tissue`` / ``"Cell line"``; ``value=None`` evaluates every value that has
        labelled cells (values whose split is impossible are skipped with a warning).
    grouping
        ``patient``, ``sample`` or ``cell`` (pooled); default patient when patient ids exist, else
        sample when sample ids exist, else cell.
    k, seed
        Pooled folds and seed (fold assignment, head initialisation).
    positive_class
        Class whose probability is stored and scored (default ``sensitive``, as scDrugMap).
    shots
        Few-shot: K labelled cells per class of each held-out side join the training side
        (and are not evaluated); 0 = zero-shot / plain CV.
    min_confidence
        1–3: only cells of datasets with at least this many label-confidence stars train and are
        scored (datasets without stars are left out); 0 = every labelled cell.
    rerun
        Recompute even when the catalog holds this run.
    seeds
        Repeat with each seed (fold assignment and head initialisation): one fold set and one run
        per seed (``seed`` is then ignored). Summaries give the mean and 95 % interval over seeds.
    prevalence
        0 < P < 1: subsample every test side to a positive-class fraction of P (seeded); 0 = as is.
    train_where, test_where
        ``external`` only: SQL conditions on ``datasets`` columns for the two sides.
    threads
        Threads each head fit may use (recorded in the run spec; results are deterministic for a
        thread count). :func:`classify.grid.run_grid` runs many runs and folds in parallel.

    Returns
    -------
    list of RunOutcome
        One per category value evaluated.

    Raises
    ------
    InputError
        Bad options, or (for a single value) a split that cannot be made, or no labelled cells
        with ``min_confidence`` stars.
    StoreError
        Missing embeddings for the selected cells.

    Notes
    -----
    After each run (also one answered from the catalog) its metrics per label-confidence stratum
    are computed from its predictions and stored in ``confidence_metrics``
    (:func:`classify.analyze.confidence.by_confidence` reads them).
    """
    if min_confidence not in (0, 1, 2, 3):
        msg = f"--min-confidence must be 1, 2 or 3 (stars), got {min_confidence}"
        raise InputError(msg)
    if shots < 0:
        msg = f"--shots must be ≥ 0, got {shots}"
        raise InputError(msg)
    if not 0 <= prevalence < 1:
        msg = f"--prevalence must be a fraction between 0 and 1 (exclusive), got {prevalence}"
        raise InputError(msg)
    if seeds is not None:
        if not seeds:
            msg = "--seeds needs at least one seed, e.g. 0,1,2"
            raise InputError(msg)
        kw = {"model": model, "head": head, "protocol": protocol, "category": category, "value": value,
              "grouping": grouping, "k": k, "positive_class": positive_class, "revision": revision,
              "head_params": head_params, "shots": shots, "min_confidence": min_confidence, "rerun": rerun,
              "prevalence": prevalence, "train_where": train_where, "test_where": test_where,
              "threads": threads}  # fmt: skip
        return [o for s in dict.fromkeys(int(x) for x in seeds) for o in evaluate(store, seed=s, **kw)]
    plans = plan_runs(
        store, model=model, head=head, protocol=protocol, category=category, value=value, grouping=grouping,
        k=k, seed=seed, positive_class=positive_class, revision=revision, head_params=head_params, shots=shots,
        min_confidence=min_confidence, prevalence=prevalence, train_where=train_where, test_where=test_where,
    )  # fmt: skip
    outcomes = []
    for plan in plans:
        outcomes.append(_evaluate_one(store, plan.spec, plan.fs, rerun, plan.cells, threads=threads))
        store_confidence_metrics(store, plan.spec.run_id)
    return outcomes


@dataclass(frozen=True)
class PlannedRun:
    """A run ready to execute: its spec, persisted fold set and the cells it trains and scores."""

    spec: RunSpec
    fs: FoldSet
    cells: pd.DataFrame


def plan_runs(
    store: Store,
    *,
    model: str,
    head: str = "mlp",
    protocol: Protocol = "pooled",
    category: str = "tissue",
    value: str | None = None,
    grouping: Grouping | None = None,
    k: int = 10,
    seed: int = 0,
    positive_class: Literal["sensitive", "resistant"] = "sensitive",
    revision: str | None = None,
    head_params: dict[str, Any] | None = None,
    shots: int = 0,
    min_confidence: int = 0,
    prevalence: float = 0.0,
    train_where: str = "",
    test_where: str = "",
) -> list[PlannedRun]:
    """Resolve one seed of :func:`evaluate` into runs, persisting their fold sets (catalog writes).

    Parameters and errors as :func:`evaluate`; nothing is trained. Values whose split is
    impossible are skipped with a warning unless ``value`` names one.
    """
    if positive_class not in ("sensitive", "resistant"):
        msg = f"positive class must be sensitive or resistant, got {positive_class!r}"
        raise InputError(msg)
    hspec = HeadSpec.create(head, head_params)
    rev = resolve_revision(store, model, revision)
    values = [value] if value is not None else category_values(store, category)
    if not values:
        msg = f"no dataset with labelled cells has a {category!r} value; set it at ingest (--meta {category}=...)"
        raise InputError(msg)
    outcomes = []
    for v in values:
        try:
            kept = (  # checked before the fold set is made: nothing is written for a bad filter
                confident_datasets(store, labelled_cells(store, category, v), min_confidence=min_confidence,
                                   what=f"{category} = {v!r}", protocol=protocol)
                if min_confidence
                else None
            )  # fmt: skip
            fs = get_fold_set(
                store, protocol=protocol, category=category, value=v, grouping=grouping, k=k, seed=seed,
                train_where=train_where, test_where=test_where,
            )  # fmt: skip
        except InputError as exc:
            if value is not None:
                raise
            log.warning("skipping %s = %r: %s", category, v, exc)
            continue
        cells = (
            fs.cells if kept is None else fs.cells[fs.cells["dataset_id"].isin(kept)].reset_index(drop=True)
        )
        spec = RunSpec(
            model=model,
            revision=rev,
            strategy="frozen",
            head=hspec,
            protocol=protocol,
            category=category,
            value=str(v),
            fold_set_id=fs.fold_set_id,
            grouping=fs.spec.grouping,
            k=fs.spec.k,
            seed=seed,
            positive_class=positive_class,
            shots=int(shots),
            min_confidence=int(min_confidence),
            selection=_selection_hash(cells) if kept is not None else "",
            prevalence=float(prevalence),
        )
        outcomes.append(PlannedRun(spec, fs, cells))
    if not outcomes:
        with_filter = f" with --min-confidence {min_confidence}" if min_confidence else ""
        msg = f"no value of {category!r} could be evaluated with protocol {protocol!r}{with_filter} (see warnings)"
        raise InputError(msg)
    return outcomes


def _selection_hash(cells: pd.DataFrame) -> str:
    return hashlib.sha256(cells["cell_uid"].to_numpy(dtype=np.int64).tobytes()).hexdigest()[:16]


def store_confidence_metrics(store: Store, run_id: str) -> None:
    """Compute and store a run's metrics per label-confidence stratum (``confidence_metrics``)."""
    try:
        confidence_metrics(store, run_id)
    except InputError as exc:  # a run without predictions (every fold undefined)
        log.warning("no metrics per confidence stratum for %s: %s", run_id, exc)


def summarise(store: Store, run_ids: list[str] | None = None, *, where: str | None = None) -> pd.DataFrame:
    """Mean ± sd per run × metric with baselines and flags (:func:`classify.summary.summarise`)."""
    from scdrugmap.classify.summary import summarise as _summarise

    return _summarise(store, run_ids, where=where)
