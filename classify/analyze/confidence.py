"""Label confidence stars (scDrugAtlas rule) and metrics per confidence stratum.

Rule (:func:`confidence_stars`), from the evidence behind a dataset's resistant/sensitive labels:

- 3 stars — cells from recurrent / relapsed / metastatic samples, PDX or mouse tumours, known
  intrinsic resistance, or regained proliferation after > 6 months (> 180 days) of drug;
- 2 stars — 1–6 months (30–180 days) of drug exposure;
- 1 star — < 1 month (< 30 days) of exposure.

Stars are kept in the ``label_confidence`` table (``source`` = ``explicit`` when set by hand,
``derived`` when computed from evidence); a dataset without a row there falls back to
``datasets.label_confidence`` (set at ingest with ``--meta label_confidence=K``).
:func:`confidence_metrics` scores an evaluation run's predictions separately for each stratum
(``confidence_metrics`` table).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from classify.analyze.tables import ensure_tables, now, replace_rows
from store.catalog import Store
from store.errors import InputError

__all__ = ["confidence_metrics", "confidence_stars", "dataset_confidence", "set_confidence"]

_THREE_STAR_ORIGINS = {
    "recurrent",
    "relapsed",
    "relapse",
    "metastatic",
    "metastasis",
    "pdx",
    "mouse",
    "xenograft",
}


def confidence_stars(
    *,
    exposure_days: float | None = None,
    sample_origin: str | None = None,
    intrinsic_resistance: bool | None = None,
) -> tuple[int | None, str]:
    """Stars for a dataset's labels from its evidence (see module docstring).

    Returns
    -------
    (int or None, str)
        Stars (None when there is no evidence) and the reason.

    Raises
    ------
    InputError
        Negative exposure.
    """
    origin = (sample_origin or "").strip().lower()
    if origin in _THREE_STAR_ORIGINS:
        return 3, f"sample origin {origin}"
    if intrinsic_resistance:
        return 3, "known intrinsic resistance"
    if exposure_days is None or (isinstance(exposure_days, float) and np.isnan(exposure_days)):
        return None, "no evidence (exposure_days, sample_origin, intrinsic_resistance)"
    days = float(exposure_days)
    if days < 0:
        msg = f"exposure_days={exposure_days} must be ≥ 0"
        raise InputError(msg)
    if days > 180:
        return 3, f"{days:g} days of drug (> 6 months)"
    if days >= 30:
        return 2, f"{days:g} days of drug (1–6 months)"
    return 1, f"{days:g} days of drug (< 1 month)"


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
    """Effective stars per dataset: ``dataset_id, stars, source`` (table, else ingest metadata)."""
    ensure_tables(store)
    return store.query(
        "SELECT d.dataset_id, COALESCE(l.stars, d.label_confidence) AS stars, "
        "CASE WHEN l.stars IS NOT NULL THEN l.source WHEN d.label_confidence IS NOT NULL THEN 'ingest' END AS source "
        "FROM datasets d LEFT JOIN label_confidence l USING (dataset_id) ORDER BY d.dataset_id"
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
    from classify.metrics import fold_metrics

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
