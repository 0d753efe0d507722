"""Out-of-study validation of probability calibration, stored per run; the default calibration.

A calibrator fitted on some studies must be judged on a study it has not seen, because that is
what a new file is. For every study ``s`` among a run's out-of-fold predictions, Platt and
isotonic maps are fitted on the out-of-fold predictions of the *other* studies and applied to
``s``; the Brier score (:func:`sklearn.metrics.brier_score_loss`) and the expected calibration
error (:func:`classify.calibrate.expected_calibration_error`, 10 equal-width bins) of the raw and
the calibrated probabilities are computed per held-out study and pooled over them (study ``*``).
Rows go to the ``calibration_checks`` table::

    run_id, method, study, n, brier_raw, brier_calibrated, ece_raw, ece_calibrated, reason

The default calibration (:func:`default_calibration`) is the method with the lowest pooled
out-of-study Brier *if* it is lower than the raw Brier; otherwise ``none`` (also when fewer than
two studies allow the check): calibration is applied only where it was shown to help.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd

from scdrugmap.classify.calibrate import expected_calibration_error, fit_calibrator
from scdrugmap.store.catalog import Store

__all__ = ["CHECKS_DDL", "calibration_checks", "default_calibration", "out_of_study_checks", "store_checks"]

Method = Literal["platt", "isotonic"]
METHODS: tuple[Method, ...] = ("platt", "isotonic")

CHECKS_DDL = """CREATE TABLE IF NOT EXISTS calibration_checks (
    run_id VARCHAR, method VARCHAR, study VARCHAR, n INTEGER, brier_raw DOUBLE, brier_calibrated DOUBLE,
    ece_raw DOUBLE, ece_calibrated DOUBLE, reason VARCHAR
)"""


def _brier(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(y, np.clip(p, 0.0, 1.0), pos_label=1))


def out_of_study_checks(probability: np.ndarray, y: np.ndarray, study: np.ndarray) -> pd.DataFrame:
    """Leave-one-study-out calibration checks of out-of-fold probabilities.

    Parameters
    ----------
    probability
        ``(n,)`` out-of-fold probabilities of the positive class.
    y
        ``(n,)`` 0/1 truth.
    study
        ``(n,)`` study of each cell.

    Returns
    -------
    pandas.DataFrame
        One row per method × held-out study plus a pooled row (``study = "*"``) per method:
        ``method, study, n, brier_raw, brier_calibrated, ece_raw, ece_calibrated, reason``.
        A study whose other studies hold one class only is skipped (NaN figures, ``reason``); the
        pooled row covers the validated studies (NaN with a reason when there are none).
    """
    p = np.asarray(probability, dtype=float)
    y = np.asarray(y).astype(int)
    study = np.asarray(study).astype(str)
    rows: list[dict[str, Any]] = []
    for method in METHODS:
        held_p, held_c, held_y = [], [], []
        for s in sorted(set(study)):
            test, rest = study == s, study != s
            row: dict[str, Any] = {"method": method, "study": s, "n": int(test.sum())}
            if np.unique(y[rest]).size < 2:
                rows.append({**row, "reason": "the other studies hold one class (or there are none)"})
                continue
            cal = fit_calibrator(p[rest], y[rest], method=method)(p[test])
            held_p.append(p[test])
            held_c.append(cal)
            held_y.append(y[test])
            rows.append({**row, **_figures(y[test], p[test], cal), "reason": None})
        if held_y:
            yy, pp, cc = np.concatenate(held_y), np.concatenate(held_p), np.concatenate(held_c)
            rows.append(
                {"method": method, "study": "*", "n": len(yy), **_figures(yy, pp, cc), "reason": None}
            )
        else:
            rows.append(
                {"method": method, "study": "*", "n": 0, "reason": "fewer than two studies to validate on"}
            )
    cols = ["method", "study", "n", "brier_raw", "brier_calibrated", "ece_raw", "ece_calibrated", "reason"]
    return pd.DataFrame(rows).reindex(columns=cols)


def _figures(y: np.ndarray, raw: np.ndarray, cal: np.ndarray) -> dict[str, float]:
    return {
        "brier_raw": _brier(y, raw),
        "brier_calibrated": _brier(y, cal),
        "ece_raw": expected_calibration_error(raw, y),
        "ece_calibrated": expected_calibration_error(cal, y),
    }


def default_calibration(checks: pd.DataFrame) -> tuple[str, str]:
    """``(method, why)``: the method that lowers pooled out-of-study Brier most, else ``none``."""
    pooled = checks[(checks["study"] == "*") & checks["brier_calibrated"].notna()]
    if pooled.empty:
        return "none", "calibration could not be validated out of study (fewer than two studies)"
    best = pooled.sort_values("brier_calibrated").iloc[0]
    raw = float(best["brier_raw"])
    if float(best["brier_calibrated"]) < raw:
        return str(best["method"]), (
            f"{best['method']} lowers out-of-study Brier {raw:.3f} → {float(best['brier_calibrated']):.3f}"
        )
    return "none", (
        f"no calibration lowers out-of-study Brier (raw {raw:.3f}, best {best['method']} "
        f"{float(best['brier_calibrated']):.3f}): raw probabilities are used"
    )


def store_checks(store: Store, run_id: str, checks: pd.DataFrame) -> None:
    """Replace the run's ``calibration_checks`` rows (one transaction)."""
    rows = checks.assign(run_id=run_id)[["run_id", *checks.columns]]
    with store.transaction() as con:
        con.execute(CHECKS_DDL)
        con.execute("DELETE FROM calibration_checks WHERE run_id = ?", [run_id])
        con.register("_checks", rows)
        con.execute(f"INSERT INTO calibration_checks ({', '.join(rows.columns)}) SELECT * FROM _checks")
        con.unregister("_checks")


def calibration_checks(store: Store, run_id: str) -> pd.DataFrame:
    """The stored checks of a run (empty when none were stored)."""
    from scdrugmap.classify.analyze.tables import existing_tables

    if "calibration_checks" not in existing_tables(store):
        return pd.DataFrame()
    return store.query("SELECT * FROM calibration_checks WHERE run_id = ? ORDER BY method, study", [run_id])
