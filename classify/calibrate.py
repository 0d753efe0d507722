"""Probability calibration (Platt or isotonic) fitted on out-of-fold predictions, and abstention.

Platt scaling fits a logistic regression on the logit of the head's probability
(Platt 1999; :class:`sklearn.linear_model.LogisticRegression`); isotonic regression fits a
monotone step function (Zadrozny & Elkan 2002; :class:`sklearn.isotonic.IsotonicRegression`).
Both are stored as plain arrays (no pickles) so they can be saved beside a head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from scdrugmap.store.errors import InputError

__all__ = ["Calibrator", "abstain_mask", "expected_calibration_error", "fit_calibrator", "parse_band"]

_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class Calibrator:
    """A fitted calibration map ``p → p'``.

    Attributes
    ----------
    method
        ``"platt"``, ``"isotonic"`` or ``"none"``.
    params
        Platt: ``(a, b)`` with ``p' = sigmoid(a · logit(p) + b)``. Isotonic: the step function's
        x thresholds followed by its y values (equal halves).
    """

    method: Literal["platt", "isotonic", "none"]
    params: tuple[float, ...] = field(default_factory=tuple)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, same shape as ``p``."""
        p = np.asarray(p, dtype=float)
        if self.method == "none":
            return p
        if self.method == "platt":
            a, b = self.params
            return 1.0 / (1.0 + np.exp(-(a * _logit(p) + b)))
        half = len(self.params) // 2
        xs, ys = np.asarray(self.params[:half]), np.asarray(self.params[half:])
        return np.interp(p, xs, ys)

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return {"method": self.method, "params": list(self.params)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Calibrator:
        """Inverse of :meth:`to_dict`."""
        return cls(d["method"], tuple(float(x) for x in d["params"]))  # type: ignore[arg-type]


def fit_calibrator(
    probability: np.ndarray, y: np.ndarray, *, method: Literal["platt", "isotonic", "none"] = "platt"
) -> Calibrator:
    """Fit a calibration map on out-of-fold probabilities.

    Parameters
    ----------
    probability
        ``(n,)`` uncalibrated probabilities of the positive class.
    y
        ``(n,)`` 0/1 truth.
    method
        ``platt``, ``isotonic`` or ``none``.

    Raises
    ------
    InputError
        Unknown method, or one class only (nothing to calibrate against).
    """
    if method == "none":
        return Calibrator("none")
    y = np.asarray(y).astype(int)
    if np.unique(y).size < 2:
        msg = "calibration needs out-of-fold predictions of both classes; use --calibration none"
        raise InputError(msg)
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(probability)[:, None], y)
        return Calibrator("platt", (float(lr.coef_[0, 0]), float(lr.intercept_[0])))
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(probability, y)
        return Calibrator(
            "isotonic", tuple(map(float, iso.X_thresholds_)) + tuple(map(float, iso.y_thresholds_))
        )
    msg = f"unknown calibration {method!r}; use platt, isotonic or none"
    raise InputError(msg)


def expected_calibration_error(probability: np.ndarray, y: np.ndarray, *, n_bins: int = 10) -> float:
    """ECE: bin-size-weighted mean |accuracy − confidence| over equal-width probability bins.

    Uses the positive-class probability as confidence (reliability diagram of the positive class).
    """
    p = np.asarray(probability, dtype=float)
    y = np.asarray(y).astype(float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(y[sel].mean() - p[sel].mean())
    return float(ece)


def parse_band(text: str | None) -> tuple[float, float] | None:
    """Parse ``"LOW,HIGH"`` (0 ≤ LOW ≤ HIGH ≤ 1) for ``--abstain``.

    Raises
    ------
    InputError
        Malformed or out-of-range band.
    """
    if not text:
        return None
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        low, high = -1.0, -1.0
    if not 0.0 <= low <= high <= 1.0:
        msg = f"--abstain {text!r} must be LOW,HIGH with 0 ≤ LOW ≤ HIGH ≤ 1 (e.g. 0.4,0.6)"
        raise InputError(msg)
    return low, high


def abstain_mask(probability: np.ndarray, band: tuple[float, float] | None) -> np.ndarray:
    """bool ``(n,)``: cells whose probability lies inside the uncertain band (inclusive)."""
    p = np.asarray(probability, dtype=float)
    if band is None:
        return np.zeros(p.shape, dtype=bool)
    return (p >= band[0]) & (p <= band[1])
