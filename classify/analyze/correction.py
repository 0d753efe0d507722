"""Uncorrected vs batch-corrected embeddings side by side (``scdrugmap evaluate --corrected``).

:func:`correction_table` pairs the runs of a source embedding and of its Harmony-corrected revision
(:mod:`classify.analyze.harmony`) on the same persisted folds and stores every metric of every fold
in the ``correction_metrics`` table; :func:`compare_correction` evaluates both first;
:func:`batch_mixing` measures how strongly the batches separate before and after correction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scdrugmap.classify.analyze.tables import ensure_tables, now, replace_frame
from scdrugmap.store.catalog import Store
from scdrugmap.store.embeddings import read_embedding
from scdrugmap.store.errors import InputError

if TYPE_CHECKING:
    from scdrugmap.classify.analyze.harmony import CorrectionOutcome

__all__ = ["batch_mixing", "compare_correction", "correction_table", "evaluate_pair"]


def batch_mixing(
    store: Store, outcome: CorrectionOutcome, *, max_cells: int = 3000, k: int = 15, seed: int = 0
) -> pd.DataFrame:
    """How strongly the batches separate before and after correction (lower = better mixed).

    Silhouette of the batch labels and kNN batch purity (:func:`~classify.analyze.separation.separation_scores`)
    on the same seeded subsample of at most ``max_cells`` corrected cells.

    Returns
    -------
    pandas.DataFrame
        One row per ``embedding`` (``uncorrected``, ``corrected``); columns ``embedding, model,
        revision, batch_silhouette, batch_knn_purity, batch_knn_purity_expected``.

    Raises
    ------
    InputError
        Fewer than 2 cells in each of two batches in the subsample.
    """
    from scdrugmap.classify.analyze.separation import separation_scores

    uids = store.query(
        "SELECT cell_uid FROM embedded_cells WHERE revision = ? ORDER BY 1", [outcome.revision]
    )
    uids = uids["cell_uid"].to_numpy(dtype=np.int64)
    if uids.size > max_cells:
        uids = np.sort(np.random.default_rng(seed).choice(uids, max_cells, replace=False))
    batch = batch_labels(store, uids, outcome.batch_key).to_numpy()
    names, counts = np.unique(batch, return_counts=True)
    keep = np.isin(batch, names[counts >= 2])  # a batch of one cell has no silhouette
    uids, batch = uids[keep], batch[keep]
    rows = []
    for tag, model, rev in (("uncorrected", outcome.source_model, outcome.source_revision),
                            ("corrected", outcome.model, outcome.revision)):  # fmt: skip
        s = separation_scores(read_embedding(store, model, rev, uids), batch, k=k, seed=seed)
        rows.append({"embedding": tag, "model": model, "revision": rev, "batch_silhouette": s["silhouette"],
                     "batch_knn_purity": s["knn_purity"], "batch_knn_purity_expected": s["knn_purity_expected"]})  # fmt: skip
    return pd.DataFrame(rows)


def correction_table(
    store: Store,
    outcome: CorrectionOutcome,
    uncorrected_runs: Sequence[str],
    corrected_runs: Sequence[str],
    *,
    metric: str = "auroc",
) -> pd.DataFrame:
    """Side-by-side metrics of paired runs (uncorrected vs corrected embedding, same folds); stored.

    Every metric of every fold goes to the ``correction_metrics`` table (one row per run pair ×
    fold × metric, plus fold ``mean``: the mean over the folds where the metric is defined, as
    ``scdrugmap results``); a repeated comparison of the same runs replaces its rows.

    Parameters
    ----------
    store
        The store.
    outcome
        The correction (:func:`~classify.analyze.harmony.correct_embedding` /
        :func:`~classify.analyze.harmony.load_correction`).
    uncorrected_runs, corrected_runs
        Run ids of the two embeddings, paired by category value (same fold set).
    metric
        Metric of the returned table.

    Returns
    -------
    pandas.DataFrame
        ``category, value, protocol, head, fold, <metric>_uncorrected, <metric>_corrected, difference``:
        one row per fold (its name: the held-out study for cross-data) and one ``mean`` row per value.

    Raises
    ------
    InputError
        Runs that do not pair up (different fold sets or values).
    """
    q = ("SELECT r.run_id, r.category, r.value, r.protocol, r.head, r.fold_set_id, f.fold_names, m.fold, "
         "m.metric, m.value AS v FROM eval_runs r JOIN metrics m USING (run_id) "
         "JOIN fold_sets f USING (fold_set_id) WHERE list_contains(?, r.run_id)")  # fmt: skip
    sides = {tag: store.query(q, [list(ids)]) for tag, ids in (("uncorrected", uncorrected_runs),
                                                               ("corrected", corrected_runs))}  # fmt: skip
    frames = []
    for tag, df in sides.items():
        df["fold"] = [
            json.loads(names)[int(i)] for names, i in zip(df["fold_names"], df["fold"], strict=True)
        ]
        mean = df.groupby(["run_id", "category", "value", "protocol", "head", "fold_set_id", "metric"],
                          as_index=False)["v"].mean().assign(fold="mean")  # fmt: skip
        df = pd.concat([df.drop(columns=["fold_names"]), mean], ignore_index=True)
        frames.append(df.rename(columns={"v": tag, "run_id": f"run_{tag}"}))
    key = ["category", "value", "protocol", "head", "fold_set_id", "fold", "metric"]
    both = frames[0].merge(frames[1], on=key, how="outer")
    if both[["run_uncorrected", "run_corrected"]].isna().any().any():
        msg = "the uncorrected and corrected runs do not pair up (different fold sets or category values)"
        raise InputError(msg)
    both["difference"] = both["corrected"] - both["uncorrected"]
    both = both.assign(revision=outcome.revision, source_revision=outcome.source_revision, created_at=now())
    ensure_tables(store)
    with store.transaction() as con:
        for (run_u, run_c), part in both.groupby(["run_uncorrected", "run_corrected"]):
            key = {"run_uncorrected": run_u, "run_corrected": run_c}
            replace_frame(con, "correction_metrics", part.drop(columns=["fold_set_id"]), key)
    out = both[both["metric"] == metric].copy()
    out["_mean"] = out["fold"] == "mean"
    out = out.sort_values(["category", "value", "_mean", "fold"]).rename(
        columns={"uncorrected": f"{metric}_uncorrected", "corrected": f"{metric}_corrected"}
    )
    cols = ["category", "value", "protocol", "head", "fold", f"{metric}_uncorrected", f"{metric}_corrected",
            "difference"]  # fmt: skip
    return out[cols].reset_index(drop=True)


def evaluate_pair(store: Store, outcome: CorrectionOutcome, **evaluate_options) -> tuple[list, list]:
    """Evaluate the uncorrected and the corrected embedding with the same options (same fold sets).

    ``evaluate_options`` go to :func:`classify.evaluate.evaluate` for both (not ``model`` /
    ``revision``: those come from ``outcome``).

    Returns
    -------
    (list of RunOutcome, list of RunOutcome)
        The uncorrected and the corrected runs, paired by category value.
    """
    from scdrugmap.classify.evaluate import evaluate

    return (
        evaluate(store, model=outcome.source_model, revision=outcome.source_revision, **evaluate_options),
        evaluate(store, model=outcome.model, revision=outcome.revision, **evaluate_options),
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
    **evaluate_options,
) -> pd.DataFrame:
    """Evaluate the uncorrected and the corrected embedding the same way; side-by-side metric.

    ``evaluate_options`` (``grouping``, ``k``, ``positive_class``, ``head_params``, ``shots``,
    ``rerun``) go to :func:`classify.evaluate.evaluate` for both embeddings.

    Returns
    -------
    pandas.DataFrame
        :func:`correction_table` of the two evaluations.
    """
    plain, corrected = evaluate_pair(store, outcome, head=head, protocol=protocol, category=category, value=value,
                                     seed=seed, **evaluate_options)  # fmt: skip
    return correction_table(
        store, outcome, [o.run_id for o in plain], [o.run_id for o in corrected], metric=metric
    )


def batch_sql(batch_key: str) -> str:
    """SQL expression of a batch key over ``cells c JOIN datasets d``; InputError for an unknown key."""
    from scdrugmap.classify.folds import CATEGORIES

    if batch_key == "sample_id":
        return "COALESCE(c.dataset_id || '/' || c.sample_id, c.dataset_id)"
    if batch_key in CATEGORIES:
        return f"COALESCE(CAST(d.{batch_key} AS VARCHAR), 'unknown')"
    msg = f"unknown batch key {batch_key!r}; use sample_id or a dataset field: {', '.join(CATEGORIES)}"
    raise InputError(msg)


def batch_labels(store: Store, uids: np.ndarray, batch_key: str) -> pd.Series:
    """Batch of each cell ``(len(uids),)`` indexed by cell_uid (``"unknown"`` when missing)."""
    df = store.query(
        f"SELECT c.cell_uid, {batch_sql(batch_key)} AS batch FROM cells c JOIN datasets d USING (dataset_id) "
        "WHERE list_contains(?, c.cell_uid)",
        [uids.tolist()],
    ).set_index("cell_uid")["batch"]
    return df.reindex(uids).fillna("unknown")
