"""The evaluation grid: many models × heads × protocols × categories × values × seeds in one call,
their (run × fold) tasks in parallel on an executor, results written by this process alone.

The driver plans every run with :func:`classify.evaluate.plan_runs` (fold sets are persisted once and
shared), answers finished runs from the catalog, and writes each run's inputs once per (embedding
revision, cell selection): ``X.npy`` (the run's embedding rows, read from the store once),
``uid.npy``, ``sensitive.npy``, ``fold.npy`` and ``group.npy`` in a ``.grid-<pid>`` folder of the
store. A task trains and scores one fold of one run (:func:`classify.runs.run_fold`) from those files
(memory-mapped, so workers on one machine share the pages); the driver collects a run's folds and
writes the run in one transaction. An interrupted grid resumes: finished runs come from the catalog.

Executors: ``local`` with one worker runs the tasks in this process; more workers are a process pool;
``ray`` runs them as Ray tasks (``--address`` joins a cluster whose nodes see the store's path).
Each task's head uses ``threads`` threads, recorded in the run spec: stored metrics equal those of
the sequential :func:`classify.evaluate.evaluate` with the same ``threads``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scdrugmap.classify.evaluate import (
    PlannedRun,
    RunOutcome,
    embeddings_for,
    plan_runs,
    run_row,
    split_groups,
    store_confidence_metrics,
)
from scdrugmap.classify.heads import HeadSpec
from scdrugmap.classify.runs import combine_folds, head_fit_predict, run_fold, write_run
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError, StoreError
from scdrugmap.store.progress import track

__all__ = ["FoldTask", "GridSpec", "run_fold_task", "run_grid"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridSpec:
    """The axes of a grid; every combination is evaluated (values: all of a category when empty).

    Attributes
    ----------
    models, heads, protocols, categories
        Non-empty tuples (e.g. ``("pca",)``, ``("logreg", "mlp")``, ``("pooled", "cross")``).
    values
        Category values to evaluate; empty = every value with labelled cells.
    seeds
        Fold-assignment and head seeds.
    options
        Further :func:`classify.evaluate.plan_runs` keywords shared by all runs (``k``,
        ``grouping``, ``positive_class``, ``head_params``, ``shots``, ``min_confidence``,
        ``prevalence``).
    """

    models: tuple[str, ...]
    heads: tuple[str, ...] = ("mlp",)
    protocols: tuple[str, ...] = ("pooled",)
    categories: tuple[str, ...] = ("tissue",)
    values: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    options: tuple[tuple[str, Any], ...] = ()

    def combinations(self) -> Iterator[dict[str, Any]]:
        """Keyword sets for :func:`plan_runs`, one per (model, head, protocol, category, value, seed)."""
        for model, head, protocol, category, seed in itertools.product(
            self.models, self.heads, self.protocols, self.categories, self.seeds
        ):
            for value in self.values or (None,):
                yield {"model": model, "head": head, "protocol": protocol, "category": category,
                       "value": value, "seed": int(seed), **dict(self.options)}  # fmt: skip


@dataclass(frozen=True)
class FoldTask:
    """One fold of one run (picklable; sent to workers)."""

    inputs: str
    run_id: str
    fold: int
    head: HeadSpec
    seed: int
    positive_is_sensitive: bool
    shots: int
    prevalence: float
    threads: int


_INPUTS: dict[str, Any] = {}


def _load_inputs(folder: str) -> dict[str, np.ndarray]:
    if _INPUTS.get("folder") != folder:
        arrays = {
            n: np.load(Path(folder) / f"{n}.npy", mmap_mode="r")
            for n in ("X", "uid", "sensitive", "fold", "group")
        }
        _INPUTS.clear()
        _INPUTS.update(folder=folder, arrays=arrays)
    return _INPUTS["arrays"]


def run_fold_task(task: FoldTask) -> tuple[str, int, list[dict[str, Any]], pd.DataFrame | None]:
    """Train and score one fold from the run's input files (a worker's whole job).

    Returns
    -------
    tuple
        ``(run_id, fold, metric rows, predictions or None)`` as :func:`classify.runs.run_fold`.
    """
    import torch

    torch.set_num_threads(task.threads)
    a = _load_inputs(task.inputs)
    y = np.asarray(a["sensitive"]).astype(int)
    if not task.positive_is_sensitive:
        y = 1 - y
    X = np.asarray(a["X"])
    fit_predict = head_fit_predict(
        task.head, X, y, np.asarray(a["group"]), seed=task.seed, threads=task.threads
    )
    rows, preds = run_fold(
        np.asarray(a["uid"]), y, np.asarray(a["fold"]), task.fold, fit_predict,
        shots=task.shots, seed=task.seed, prevalence=task.prevalence,
    )  # fmt: skip
    return task.run_id, task.fold, rows, preds


# -- executors of fold tasks ------------------------------------------------------------------
def _run_local(tasks: Sequence[FoldTask], workers: int) -> Iterator[tuple]:
    if workers <= 1:
        for t in tasks:
            yield run_fold_task(t)
        return
    import multiprocessing as mp
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        it = iter(tasks)
        running = {pool.submit(run_fold_task, t): t for t in itertools.islice(it, 2 * workers)}
        try:
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    running.pop(fut)
                    yield fut.result()
                    nxt = next(it, None)
                    if nxt is not None:
                        running[pool.submit(run_fold_task, nxt)] = nxt
        except BrokenProcessPool as exc:
            msg = "an evaluation worker died (killed or out of memory); rerun the same command: finished runs are kept"
            raise StoreError(msg) from exc


def _run_ray(tasks: Sequence[FoldTask], workers: int, threads: int, address: str | None) -> Iterator[tuple]:
    try:
        import ray
    except ImportError as exc:
        msg = "--executor ray needs Ray: pip install 'scdrugmap[ray]' (or pip install ray)"
        raise InputError(msg) from exc
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        ray.init(**({"address": address} if address else {"num_cpus": workers * threads}), **kwargs)
    try:
        remote = ray.remote(num_cpus=threads, max_retries=1)(run_fold_task)
        pending = [remote.remote(t) for t in tasks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started:
            ray.shutdown()


# -- the driver -------------------------------------------------------------------------------
def _write_inputs(
    store: Store, root: Path, plan: PlannedRun, cache: dict[str, tuple[str, int]]
) -> tuple[str, int]:
    """The run's input folder (shared by runs of the same revision and cells) and its excluded count."""
    cells = plan.cells
    key = hashlib.sha256(
        f"{plan.spec.model}/{plan.spec.revision}/{plan.spec.grouping}".encode()
        + cells["cell_uid"].to_numpy(np.int64).tobytes()
        + cells["fold"].to_numpy(np.int64).tobytes()
    ).hexdigest()[:16]
    if key in cache:
        return cache[key]
    X, ok = embeddings_for(store, plan.spec.model, plan.spec.revision, plan.fs, cells)
    if not ok.all():
        log.warning(
            "%d cells have a NaN %s embedding (no known genes) and are left out",
            int((~ok).sum()),
            plan.spec.model,
        )
    kept = cells.loc[ok].reset_index(drop=True)
    folder = root / key
    folder.mkdir(parents=True)
    # integer codes in the sorted order of the group keys: StratifiedGroupKFold (the mlp's inner
    # split) orders groups by np.unique, so the codes split exactly as the keys do
    raw = split_groups(kept, plan.spec.grouping)
    group = raw.astype(np.int64) if plan.spec.grouping == "cell" else pd.factorize(raw, sort=True)[0]
    for name, arr in (
        ("X", np.ascontiguousarray(X[ok], dtype=np.float32)),
        ("uid", kept["cell_uid"].to_numpy(np.int64)),
        ("sensitive", (kept["label"] == "sensitive").to_numpy(np.int8)),
        ("fold", kept["fold"].to_numpy(np.int64)),
        ("group", group.astype(np.int64)),
    ):
        np.save(folder / f"{name}.npy", arr)
    cache[key] = (str(folder), int((~ok).sum()))
    return cache[key]


def run_grid(
    store: Store,
    grid: GridSpec,
    *,
    executor: str = "local",
    workers: int = 1,
    threads: int = 1,
    address: str | None = None,
    rerun: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[RunOutcome]:
    """Evaluate every run of ``grid``, folds in parallel; see the module docstring.

    Parameters
    ----------
    store
        The store (this process is the catalog's only writer).
    grid
        The axes.
    executor, workers, address
        ``local`` (``workers`` processes; 1 = in this process) or ``ray`` (``workers`` × ``threads``
        CPUs of a local Ray, or the cluster at ``address``).
    threads
        Threads per task (head fit), recorded in each run spec.
    rerun
        Recompute runs the catalog already holds.
    progress
        Called with one line per finished run.

    Returns
    -------
    list of RunOutcome
        In plan order (reused runs included).

    Raises
    ------
    InputError
        Bad axes or options (checked while planning, before anything is trained).
    """
    if executor not in ("local", "ray"):
        msg = f"unknown executor {executor!r}; choose local or ray"
        raise InputError(msg)
    if workers < 1 or threads < 1:
        msg = f"--workers and --threads must be ≥ 1, got {workers} and {threads}"
        raise InputError(msg)
    plans: dict[str, PlannedRun] = {}
    for kw in grid.combinations():
        for plan in plan_runs(store, **kw):
            plans.setdefault(plan.spec.run_id, plan)
    outcomes: dict[str, RunOutcome] = {}
    todo = []
    for run_id, plan in plans.items():
        old = store.query(
            "SELECT n_cells, n_excluded FROM eval_runs WHERE run_id = ? AND status = 'complete'", [run_id]
        )
        if not old.empty and not rerun:
            outcomes[run_id] = RunOutcome(
                run_id, plan.spec, True, int(old["n_cells"].iloc[0]), int(old["n_excluded"].iloc[0])
            )
            store_confidence_metrics(store, run_id)
        else:
            todo.append(plan)
    root = store.path / f".grid-{os.getpid()}"
    try:
        inputs: dict[str, tuple[str, int]] = {}
        tasks, meta = [], {}
        for plan in todo:
            folder, excluded = _write_inputs(store, root, plan, inputs)
            spec = plan.spec
            n_folds = len(plan.fs.fold_names)
            meta[spec.run_id] = (plan, excluded, n_folds, time.perf_counter(), [None] * n_folds)
            tasks += [
                FoldTask(
                    folder,
                    spec.run_id,
                    f,
                    spec.head,
                    spec.seed,
                    spec.positive_class == "sensitive",
                    spec.shots,
                    spec.prevalence,
                    threads,
                )
                for f in range(n_folds)
            ]
        results = (
            _run_local(tasks, workers) if executor == "local" else _run_ray(tasks, workers, threads, address)
        )
        for run_id, fold, rows, preds in track(results, "evaluate grid", total=len(tasks), unit="folds"):
            plan, excluded, n_folds, t0, parts = meta[run_id]
            parts[fold] = (rows, preds)
            if all(p is not None for p in parts):
                metrics, pred = combine_folds(parts)
                n_kept = len(plan.cells) - excluded
                row = run_row(plan.spec, plan.fs, plan.cells, set(plan.cells["fold"]), metrics, n_excluded=excluded,
                              threads=threads, duration_s=time.perf_counter() - t0)  # fmt: skip
                row["n_cells"] = n_kept
                write_run(store, row, metrics, pred)
                store_confidence_metrics(store, run_id)
                outcomes[run_id] = RunOutcome(run_id, plan.spec, False, n_kept, excluded)
                if progress is not None:
                    progress(f"{run_id} {plan.spec.model}/{plan.spec.head.name} {plan.spec.protocol} "
                             f"{plan.spec.category}={plan.spec.value!r}: done ({len(outcomes)}/{len(plans)})")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return [outcomes[r] for r in plans if r in outcomes]
