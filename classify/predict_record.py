"""Predict-time records of catalog datasets, apart from cross-validation results.

A prediction on a file that is an ingested dataset is recorded in its own tables, never in
``eval_runs`` / ``metrics`` (so it is never averaged with cross-validation metrics)::

    predict_runs     pred_id, head_run, dataset_id, calibration, abstain, summary JSON, created_at
    predict_metrics  pred_id, cells ('new' | 'out_of_fold'), metric, value, n, reason
    predict_cells    pred_id, cell_uid, status, call, p_sensitive

``predict_metrics`` of ``out_of_fold`` cells are their cross-validation predictions (the cells
trained the head); no in-sample figure exists anywhere.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from scdrugmap.store.catalog import Store

__all__ = ["PREDICT_DDL", "record"]

PREDICT_DDL = """
CREATE TABLE IF NOT EXISTS predict_runs (
    pred_id VARCHAR PRIMARY KEY, head_run VARCHAR, dataset_id VARCHAR, calibration VARCHAR, abstain JSON,
    summary JSON, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS predict_metrics (
    pred_id VARCHAR, cells VARCHAR, metric VARCHAR, value DOUBLE, n INTEGER, reason VARCHAR
);
CREATE TABLE IF NOT EXISTS predict_cells (
    pred_id VARCHAR, cell_uid BIGINT, status VARCHAR, call VARCHAR, p_sensitive DOUBLE
);
"""


def record(store: Store, run_id: str, dataset_id: str, cells: pd.DataFrame, summary: dict[str, Any]) -> str:
    """Replace the record of (head, dataset, calibration, abstain); return its ``pred_id``."""
    cal, band = summary["calibration"]["method"], summary["abstain"]
    key = json.dumps({"run": run_id, "dataset": dataset_id, "calibration": cal, "abstain": band})
    pred_id = "pred-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    names = store.query("SELECT obs_name, cell_uid FROM cells WHERE dataset_id = ?", [dataset_id])
    uid = pd.Series(names["cell_uid"].to_numpy(), index=names["obs_name"].astype(str)).reindex(cells.index)
    p = cells["p_pos"].to_numpy(float)
    p_sens = p if summary["positive_class"] == "sensitive" else 1.0 - p
    per_cell = pd.DataFrame({"pred_id": pred_id, "cell_uid": uid.to_numpy(), "status": cells["status"].to_numpy(),
                             "call": cells["call"].to_numpy(), "p_sensitive": p_sens})  # fmt: skip
    per_cell = per_cell[per_cell["cell_uid"].notna()].astype({"cell_uid": np.int64})
    rows = []
    for key_, which in (("new_cells", "new"), ("out_of_fold_cells", "out_of_fold")):
        f = summary["figures"].get(key_, {})
        acc = f.get("accuracy_answered")
        rows.append({"pred_id": pred_id, "cells": which, "metric": "accuracy_answered", "value": acc,
                     "n": f.get("n_answered", 0), "reason": None if acc is not None else "no labelled answered cells"})  # fmt: skip
    metrics = pd.DataFrame(rows, columns=["pred_id", "cells", "metric", "value", "n", "reason"])
    with store.transaction() as con:
        con.execute(PREDICT_DDL)
        for table in ("predict_runs", "predict_metrics", "predict_cells"):
            con.execute(f"DELETE FROM {table} WHERE pred_id = ?", [pred_id])
        con.execute(
            "INSERT INTO predict_runs VALUES (?, ?, ?, ?, ?, ?, ?)",
            [pred_id, run_id, dataset_id, cal, json.dumps(band), json.dumps(summary, default=str),
             datetime.now(UTC).replace(tzinfo=None)],
        )  # fmt: skip
        for name, df in (("predict_metrics", metrics), ("predict_cells", per_cell)):
            con.register("_rows", df)
            con.execute(f"INSERT INTO {name} ({', '.join(df.columns)}) SELECT * FROM _rows")
            con.unregister("_rows")
    return pred_id
