"""Per-fold classification metrics, with undefined values kept as NULL plus a reason.

Positive class = ``sensitive`` by default (as in scDrugMap). AUPRC is average precision on
probabilities (:func:`sklearn.metrics.average_precision_score`). A metric that is undefined
for a fold — AUROC/AUPRC/MCC/balanced accuracy with one class in the test fold, precision
with no positive prediction, recall with no positive cell, F1 when both are undefined — is
returned as ``None`` with the reason, never as 0.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

__all__ = ["METRICS", "fold_metrics"]

METRICS = ("f1", "auroc", "auprc", "accuracy", "precision", "recall", "balanced_accuracy", "mcc")


def fold_metrics(
    y_true: np.ndarray, probability: np.ndarray, *, threshold: float = 0.5
) -> dict[str, tuple[float | None, str | None]]:
    """Compute :data:`METRICS` for one test fold.

    Parameters
    ----------
    y_true
        bool or 0/1 ``(n_cells,)``: 1 = positive class.
    probability
        float ``(n_cells,)`` probability of the positive class.
    threshold
        Probability at or above which a cell is called positive.

    Returns
    -------
    dict
        ``{metric: (value or None, reason or None)}``.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probability, dtype=float)
    pred = (p >= threshold).astype(int)
    out: dict[str, tuple[float | None, str | None]] = {}
    both = np.unique(y).size == 2
    one_class = f"test fold has only {'positive' if y.size and y[0] == 1 else 'negative'} cells"
    if y.size == 0:
        return dict.fromkeys(METRICS, (None, "empty test fold"))
    out["accuracy"] = (float(skm.accuracy_score(y, pred)), None)
    if both:
        out["auroc"] = (float(skm.roc_auc_score(y, p)), None)
        out["auprc"] = (float(skm.average_precision_score(y, p)), None)
        out["balanced_accuracy"] = (float(skm.balanced_accuracy_score(y, pred)), None)
        out["mcc"] = (float(skm.matthews_corrcoef(y, pred)), None)
    else:
        for m in ("auroc", "auprc", "balanced_accuracy", "mcc"):
            out[m] = (None, one_class)
    tp = int(((pred == 1) & (y == 1)).sum())
    n_pred_pos = int(pred.sum())
    n_pos = int(y.sum())
    prec = tp / n_pred_pos if n_pred_pos else None
    rec = tp / n_pos if n_pos else None
    out["precision"] = (prec, None) if prec is not None else (None, "no cell predicted positive")
    out["recall"] = (rec, None) if rec is not None else (None, "no positive cell in the test fold")
    if prec is None and rec is None:
        out["f1"] = (None, "no positive cell and no positive prediction")
    else:
        denom = 2 * tp + (n_pred_pos - tp) + (n_pos - tp)
        out["f1"] = (2 * tp / denom, None)
    return {m: out[m] for m in METRICS}
