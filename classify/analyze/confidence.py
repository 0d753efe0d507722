"""Label confidence stars (scDrugAtlas rule) and metrics per confidence stratum.

The rule (:func:`confidence_stars`) lives in :mod:`store.confidence` (it also derives the stars
at ingest):

- 3 stars — cells from recurrent / relapsed / metastatic samples, PDX or mouse tumours, known
  intrinsic resistance, or regained proliferation after > 6 months (> 180 days) of drug;
- 2 stars — 1–6 months (30–180 days) of drug exposure;
- 1 star — < 1 month (< 30 days) of exposure.

Stars come from two places. At ingest, ``datasets.label_confidence`` is given explicitly
(``--meta label_confidence=K``) or derived from the evidence fields (``exposure_days``,
``sample_origin``, ``intrinsic_resistance``); ``datasets.confidence_source`` says which. Later,
``scdrugmap analyze confidence set`` records stars in the ``label_confidence`` table (``source`` =
``explicit`` when set by hand, ``derived`` when computed from evidence); such a row overrides the
ingest value (:func:`dataset_confidence`). :func:`confidence_metrics` scores an evaluation run's
predictions separately for each stratum (``confidence_metrics`` table).
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from scdrugmap.classify.analyze.tables import ensure_tables, existing_tables, now, replace_rows
from scdrugmap.store.catalog import Store
from scdrugmap.store.confidence import confidence_stars
from scdrugmap.store.errors import InputError

__all__ = [
    "by_confidence",
    "confidence_metrics",
    "confidence_stars",
    "confident_datasets",
    "dataset_confidence",
    "set_confidence",
]


def set_confidence(
    store: Store,
    dataset_id: str,
    *,
    stars: int | None = None,
    exposure_days: float | None = None,
    sample_origin: str | None = None,
    intrinsic_resistance: bool | None = None,
) -> tuple[int, str]:
    """Record a dataset's stars, given explicitly or derived from evidence.

    Raises
    ------
    InputError
        Unknown dataset, stars outside 1–3, or no evidence and no stars.
    """
    if store.query("SELECT 1 FROM datasets WHERE dataset_id = ?", [dataset_id]).empty:
        msg = f"dataset {dataset_id!r} is not in the store"
        raise InputError(msg)
    evidence: dict[str, Any] = {"exposure_days": exposure_days, "sample_origin": sample_origin,
                                "intrinsic_resistance": intrinsic_resistance}  # fmt: skip
    if stars is not None:
        if stars not in (1, 2, 3):
            msg = f"stars must be 1, 2 or 3, got {stars}"
            raise InputError(msg)
        value, source, reason = stars, "explicit", "set explicitly"
    else:
        derived, reason = confidence_stars(**evidence)
        if derived is None:
            msg = f"{dataset_id}: {reason}; give --stars or evidence"
            raise InputError(msg)
        value, source = derived, "derived"
    row = pd.DataFrame([{"dataset_id": dataset_id, "stars": value, "source": source,
                         "evidence": json.dumps({**evidence, "reason": reason}), "created_at": now()}])  # fmt: skip
    replace_rows(store, [("label_confidence", row)], key={"dataset_id": dataset_id})
    return value, reason


def dataset_confidence(store: Store) -> pd.DataFrame:
    """Effective stars per dataset: a ``label_confidence`` table row, else the ingest value.

    Read only (the ``label_confidence`` table may not exist yet: then every value is the ingest one).

    Returns
    -------
    pandas.DataFrame
        One row per dataset, ordered by id: ``dataset_id``, ``stars`` (1–3, NULL = none),
        ``source`` (``explicit`` / ``derived``; NULL without stars), ``set_at`` (``ingest`` or
        ``analyze`` = ``scdrugmap analyze confidence set``), ``reason`` (of an ``analyze`` row),
        and the ingest evidence ``exposure_days``, ``sample_origin``, ``intrinsic_resistance``.
    """
    if "label_confidence" in existing_tables(store):
        join = " LEFT JOIN label_confidence l USING (dataset_id)"
        stars, source, reason = "l.stars", "l.source", "json_extract_string(l.evidence, '$.reason')"
    else:
        join, stars, source, reason = "", "NULL", "NULL", "NULL"
    return store.query(
        f"SELECT d.dataset_id, CAST(COALESCE({stars}, d.label_confidence) AS INTEGER) AS stars, "
        f"CASE WHEN {stars} IS NOT NULL THEN {source} "
        "     WHEN d.label_confidence IS NOT NULL THEN COALESCE(d.confidence_source, 'explicit') END AS source, "
        f"CASE WHEN {stars} IS NOT NULL THEN 'analyze' WHEN d.label_confidence IS NOT NULL THEN 'ingest' END "
        f"    AS set_at, {reason} AS reason, "
        f"d.exposure_days, d.sample_origin, d.intrinsic_resistance FROM datasets d{join} ORDER BY d.dataset_id"
    )


def confidence_metrics(store: Store, run_id: str) -> pd.DataFrame:
    """Metrics of a run's predictions per label-confidence stratum (0 = unknown).

    Returns
    -------
    pandas.DataFrame
        ``run_id, stars, metric, value, reason, n_cells, n_datasets`` (also stored).

    Raises
    ------
    InputError
        Unknown run or no predictions.
    """
    from scdrugmap.classify.metrics import fold_metrics

    run = store.query("SELECT positive_class FROM eval_runs WHERE run_id = ?", [run_id])
    if run.empty:
        msg = f"no evaluation run {run_id!r}"
        raise InputError(msg)
    conf = dataset_confidence(store)
    pred = store.query(
        "SELECT p.probability, c.label, c.dataset_id FROM predictions p JOIN cells c USING (cell_uid) "
        "WHERE p.run_id = ? AND c.label IS NOT NULL",
        [run_id],
    )
    if pred.empty:
        msg = f"run {run_id} has no predictions of labelled cells"
        raise InputError(msg)
    pred["stars"] = pred["dataset_id"].map(conf.set_index("dataset_id")["stars"]).fillna(0).astype(int)
    positive = str(run["positive_class"].iloc[0])
    rows = []
    for stars, part in pred.groupby("stars", sort=True):
        y = (part["label"] == positive).to_numpy().astype(int)
        for metric, (value, reason) in fold_metrics(y, part["probability"].to_numpy()).items():
            rows.append({"run_id": run_id, "stars": int(stars), "metric": metric, "value": value, "reason": reason,
                         "n_cells": len(part), "n_datasets": int(part["dataset_id"].nunique())})  # fmt: skip
    out = pd.DataFrame(rows)
    replace_rows(store, [("confidence_metrics", out)], key={"run_id": run_id})
    return out


def confident_datasets(
    store: Store, cells: pd.DataFrame, *, min_confidence: int, what: str, protocol: str
) -> list[str]:
    """Datasets of ``cells`` with ≥ ``min_confidence`` effective stars, checked to be evaluable.

    Parameters
    ----------
    store
        The store.
    cells
        Labelled cells of one category value (``dataset_id``, ``label``, ``study`` columns).
    min_confidence
        Stars, 1–3; datasets without stars are left out.
    what
        ``"<category> = <value>"`` for messages.
    protocol
        ``pooled`` (both classes must remain) or ``cross`` (≥ 2 studies must remain).

    Returns
    -------
    list of str
        The kept dataset ids, sorted.

    Raises
    ------
    InputError
        No labelled cell remains, one class only (pooled), or fewer than 2 studies (cross).
    """
    stars = dataset_confidence(store).set_index("dataset_id")["stars"]
    cell_stars = pd.to_numeric(cells["dataset_id"].map(stars), errors="coerce").astype("Float64").fillna(0)
    kept = cells.loc[(cell_stars >= min_confidence).to_numpy(dtype=bool)]
    fix = (
        "lower --min-confidence, or give datasets stars (ingest --meta label_confidence=K or the evidence "
        "exposure_days / sample_origin / intrinsic_resistance; or `scdrugmap analyze confidence set`)"
    )
    if kept.empty:
        counts = cell_stars.astype(int).value_counts().sort_index()
        have = ", ".join(f"{'no stars' if s == 0 else f'{s} star(s)'}: {n}" for s, n in counts.items())
        msg = f"no labelled cells of {what} come from datasets with ≥ {min_confidence} stars (cells by stars: {have}); {fix}"
        raise InputError(msg)
    if protocol == "cross" and kept["study"].nunique() < 2:
        msg = (
            f"cross-data evaluation of {what} needs ≥ 2 studies with ≥ {min_confidence} stars, found "
            f"{sorted(kept['study'].unique())}; {fix}"
        )
        raise InputError(msg)
    if protocol == "pooled" and kept["label"].nunique() < 2:
        msg = f"cells of {what} with ≥ {min_confidence} stars are all {kept['label'].iloc[0]}; pooled CV needs both classes; {fix}"
        raise InputError(msg)
    return sorted(kept["dataset_id"].unique())


def by_confidence(
    store: Store, run_ids: list[str], *, metrics: tuple[str, ...] = ("auroc", "f1")
) -> pd.DataFrame:
    """Stored metrics per label-confidence stratum of runs, one row per run × stratum.

    Metrics are computed on the run's out-of-fold predictions pooled over folds (not a mean over
    folds), by :func:`classify.analyze.confidence.confidence_metrics` after each evaluation.

    Parameters
    ----------
    store
        The store.
    run_ids
        Runs to report.
    metrics
        Metric columns (default AUROC and F1).

    Returns
    -------
    pandas.DataFrame
        ``run_id, category, value, min_confidence, stars (0 = no stars), n_cells, n_datasets`` and one
        column per metric (NaN = undefined, e.g. one class in the stratum).
    """
    cols = ["run_id", "category", "value", "min_confidence", "stars", "n_cells", "n_datasets", *metrics]
    if not run_ids:
        return pd.DataFrame(columns=cols)
    ensure_tables(store)
    df = store.query(
        "SELECT r.run_id, r.category, r.value, COALESCE(r.min_confidence, 0) AS min_confidence, c.stars, "
        "c.n_cells, c.n_datasets, c.metric, c.value AS score "
        "FROM confidence_metrics c JOIN eval_runs r USING (run_id) "
        "WHERE list_contains(?, c.run_id) AND list_contains(?, c.metric)",
        [list(run_ids), list(metrics)],
    )
    if df.empty:
        return pd.DataFrame(columns=cols)
    keys = ["run_id", "category", "value", "min_confidence", "stars", "n_cells", "n_datasets"]
    wide = df.set_index([*keys, "metric"])["score"].unstack("metric")
    wide = wide.reindex(columns=list(metrics)).reset_index()
    wide["_order"] = wide["run_id"].map({r: i for i, r in enumerate(run_ids)})
    return wide.sort_values(["_order", "stars"])[cols].reset_index(drop=True)
