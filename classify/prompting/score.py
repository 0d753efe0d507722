"""Per-fold metrics of a prompt run: coverage, all cells (abstain = wrong) and answered cells.

Metric names in the ``metrics`` table:

- ``coverage``: answered cells / test cells;
- the usual names (``f1``, ``auroc``, ``auprc``, ``accuracy``, ``precision``, ``recall``,
  ``balanced_accuracy``, ``mcc``): **all** test cells, an abstention counted as the wrong class
  (for AUROC/AUPRC it gets probability 1 − truth, ranked worst) — directly comparable with heads;
- ``<metric>_answered``: only the cells that got an answer.

Threshold metrics use the model's stated answers; AUROC/AUPRC need probabilities from token
log-probabilities and are NULL with a reason when the run has none (never computed from hard
labels).
"""

from __future__ import annotations

import numpy as np

from scdrugmap.classify.metrics import METRICS, fold_metrics

__all__ = ["NO_LOGPROBS", "PROMPT_METRICS", "prompt_fold_metrics"]

PROMPT_METRICS: tuple[str, ...] = ("coverage", *METRICS, *(f"{m}_answered" for m in METRICS))
NO_LOGPROBS = "no probabilities: the run did not ask for log-probabilities (hard labels only)"
_RANKED = ("auroc", "auprc")

Value = tuple[float | None, str | None]


def _scores(y: np.ndarray, call: np.ndarray, prob: np.ndarray, no_prob: str | None) -> dict[str, Value]:
    out = fold_metrics(y, call.astype(float))
    for m in _RANKED:
        out[m] = (None, no_prob) if no_prob else fold_metrics(y, prob)[m]
    return out


def prompt_fold_metrics(
    y_true: np.ndarray, call: np.ndarray, probability: np.ndarray, *, logprobs: bool
) -> dict[str, Value]:
    """Metrics of one test fold.

    Parameters
    ----------
    y_true
        0/1 ``(n,)``: 1 = positive class.
    call
        float ``(n,)``: 1 = answered positive, 0 = answered negative, NaN = abstained.
    probability
        float ``(n,)``: probability of the positive class from log-probabilities, NaN when absent.
    logprobs
        Whether the run asked for log-probabilities (chooses the NULL reason for AUROC/AUPRC).

    Returns
    -------
    dict
        ``{metric: (value or None, reason or None)}`` for :data:`PROMPT_METRICS`.
    """
    y = np.asarray(y_true).astype(int)
    call = np.asarray(call, dtype=float)
    prob = np.asarray(probability, dtype=float)
    if y.size == 0:
        return dict.fromkeys(PROMPT_METRICS, (None, "empty test fold"))
    answered = np.isfinite(call)
    n_ans = int(answered.sum())
    out: dict[str, Value] = {"coverage": (n_ans / y.size, None)}
    missing_p = int((answered & ~np.isfinite(prob)).sum())
    if not logprobs:
        no_prob = NO_LOGPROBS
    elif missing_p:
        no_prob = f"no probabilities: {missing_p} of {n_ans} answered cells have no usable log-probabilities"
    else:
        no_prob = None
    wrong = 1.0 - y
    out.update(_scores(y, np.where(answered, call, wrong), np.where(answered, prob, wrong), no_prob))
    if n_ans == 0:
        out.update({f"{m}_answered": (None, "no answered cell in the test fold") for m in METRICS})
    else:
        ans = _scores(y[answered], call[answered], prob[answered], no_prob)
        out.update({f"{m}_answered": v for m, v in ans.items()})
    return {m: out[m] for m in PROMPT_METRICS}
