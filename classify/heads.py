"""Classifier heads on frozen embeddings (the layer-freezing strategy).

Every head standardises its input (scikit-learn's ``StandardScaler`` fitted on the training fold,
in a ``Pipeline`` with the head) and returns the probability of the positive class. All are seeded
and deterministic on CPU.

- ``mlp``: scDrugMap's network (``d → 512 → 512 → 2``, ReLU, AdamW) trained to convergence:
  lr 1e-3, early stopping on a grouped inner validation split, at least 300 optimiser steps,
  optional class weighting (:mod:`classify.mlp_head`). Use it for results.
- ``mlp_paper``: scDrugMap's head exactly, AdamW lr 1e-4, 10 epochs, batch 256, cross-entropy;
  no early stopping (fixed epochs as in scDrugMap's training script), seeded shuffling; torch.
  Use it only to reproduce the paper: on small data it makes a few dozen steps and is undertrained.
- ``logreg``: :class:`sklearn.linear_model.LogisticRegression` (L2, C = 1, lbfgs).
- ``lightgbm``: :class:`lightgbm.LGBMClassifier` (200 trees, lr 0.05, 31 leaves, deterministic).
- ``rf``: :class:`sklearn.ensemble.RandomForestClassifier` (300 trees).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from scdrugmap.store.errors import InputError

__all__ = ["HEADS", "MLP_HEADS", "HeadName", "HeadSpec", "ScaledHead", "make_head"]

HeadName = Literal["mlp", "mlp_paper", "logreg", "lightgbm", "rf"]
HEADS: tuple[str, ...] = ("mlp", "mlp_paper", "logreg", "lightgbm", "rf")
MLP_HEADS = ("mlp", "mlp_paper")  # torch networks of the same architecture

_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {
        "hidden": 512,
        "lr": 1e-3,
        "batch_size": 128,
        "weight_decay": 0.01,
        "max_epochs": 200,
        "min_steps": 300,
        "patience": 10,
        "val_fraction": 0.2,
        "class_weight": "none",
    },
    "mlp_paper": {"hidden": 512, "lr": 1e-4, "epochs": 10, "batch_size": 256, "weight_decay": 0.01},
    "logreg": {"C": 1.0, "max_iter": 2000},
    "lightgbm": {"n_estimators": 200, "learning_rate": 0.05, "num_leaves": 31},
    "rf": {"n_estimators": 300, "max_features": "sqrt"},
}


@dataclass(frozen=True)
class HeadSpec:
    """A head and its hyper-parameters (defaults filled in), hashed into the run id."""

    name: str
    params: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    @classmethod
    def create(cls, name: str, params: dict[str, Any] | None = None) -> HeadSpec:
        """Validate ``name``/``params`` and fill in defaults.

        Raises
        ------
        InputError
            Unknown head or hyper-parameter.
        """
        if name not in _DEFAULTS:
            msg = f"unknown head {name!r}; choose one of: {', '.join(HEADS)}"
            raise InputError(msg)
        given = dict(params or {})
        unknown = sorted(set(given) - set(_DEFAULTS[name]))
        if unknown:
            msg = (
                f"unknown hyper-parameter(s) {unknown} for head {name!r}; allowed: {sorted(_DEFAULTS[name])}"
            )
            raise InputError(msg)
        merged = {**_DEFAULTS[name], **given}
        if merged.get("class_weight", "none") not in ("none", "balanced"):
            msg = f"class_weight must be none or balanced, got {merged['class_weight']!r}"
            raise InputError(msg)
        from scdrugmap.classify.head_params import check_head_values

        check_head_values(name, merged)  # epochs=-1, batch_size=0, lr=abc … refused
        return cls(name, tuple(sorted(merged.items())))

    @classmethod
    def stored(cls, name: str, params: dict[str, Any]) -> HeadSpec:
        """The spec of a stored run or saved head: ``mlp`` runs made before ``mlp_paper`` existed
        (fixed ``epochs``) are ``mlp_paper`` heads."""
        if name == "mlp" and "epochs" in params:
            name = "mlp_paper"
        return cls.create(name, params)

    def as_dict(self) -> dict[str, Any]:
        """Hyper-parameters as a dict."""
        return dict(self.params)


def _as_float32(Z: np.ndarray) -> np.ndarray:
    return np.asarray(Z, dtype=np.float32)


class ScaledHead:
    """A head behind scikit-learn's :class:`~sklearn.preprocessing.StandardScaler` in a
    :class:`~sklearn.pipeline.Pipeline` (``scale`` → ``float32`` → ``head``); BLAS limited to ``threads``.

    The scaler's mean and standard deviation (ddof 0; constant features get 1) are fitted on the
    training fold; the head sees float32 z-scores.

    Parameters
    ----------
    inner
        Unfitted head with ``fit(X, y)`` (``fit(X, y, groups=)`` when ``accepts_groups``) and
        ``predict_proba(X) -> (n, 2)``.
    threads
        BLAS/OpenMP threads while fitting and predicting (:func:`threadpoolctl.threadpool_limits`).
    """

    def __init__(self, inner: Any, *, threads: int = 1) -> None:
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import FunctionTransformer, StandardScaler

        self.pipeline = Pipeline(
            [("scale", StandardScaler()), ("float32", FunctionTransformer(_as_float32)), ("head", inner)]
        )
        self.threads = int(threads)

    @property
    def inner(self) -> Any:
        """The head (last step of :attr:`pipeline`)."""
        return self.pipeline.steps[-1][1]

    @inner.setter
    def inner(self, head: Any) -> None:
        self.pipeline.steps[-1] = ("head", head)

    @property
    def mean(self) -> np.ndarray:
        """Training-fold feature means ``(d,)`` (the scaler's ``mean_``)."""
        return self.pipeline.named_steps["scale"].mean_

    @mean.setter
    def mean(self, value: np.ndarray) -> None:  # a saved head (classify.persist)
        scaler = self.pipeline.named_steps["scale"]
        scaler.mean_ = np.asarray(value)
        scaler.n_features_in_ = len(scaler.mean_)

    @property
    def std(self) -> np.ndarray:
        """Training-fold feature standard deviations ``(d,)``, 1 for constant features (``scale_``)."""
        return self.pipeline.named_steps["scale"].scale_

    @std.setter
    def std(self, value: np.ndarray) -> None:
        scaler = self.pipeline.named_steps["scale"]
        scaler.scale_ = np.asarray(value)
        scaler.var_ = scaler.scale_.astype(np.float64) ** 2

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> ScaledHead:
        """Fit the scaler and the head on ``X`` ``(n, d)``; ``groups`` reach heads that split
        internally (``mlp``)."""
        from threadpoolctl import threadpool_limits

        params = {"head__groups": groups} if getattr(self.inner, "accepts_groups", False) else {}
        with threadpool_limits(limits=self.threads):
            self.pipeline.fit(X, y, **params)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probability of the positive class ``(n,)``."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=self.threads):  # the head may be a loaded booster or torch net,
            Z = self.pipeline[:-1].transform(X)  # which scikit-learn's fitted check does not know
            return self.inner.predict_proba(Z)[:, 1]


def make_head(spec: HeadSpec, *, seed: int, threads: int = 1) -> Any:
    """Build an unfitted head with ``fit(X, y)`` and ``predict_proba(X) -> (n,)`` (positive class).

    Parameters
    ----------
    spec
        From :meth:`HeadSpec.create`.
    seed
        Random seed (weights, shuffling, bagging).
    threads
        Threads the head may use (torch, BLAS, LightGBM, random forest). Results are deterministic
        for a given thread count; the evaluation records it in the run spec.
    """
    p = spec.as_dict()
    threads = max(1, int(threads))
    if spec.name in MLP_HEADS:
        from scdrugmap.classify.mlp_head import MLPHead, TunedMLPHead

        net = TunedMLPHead(seed=seed, **p) if spec.name == "mlp" else MLPHead(seed=seed, **p)
        net.threads = threads
        return ScaledHead(net, threads=threads)
    if spec.name == "logreg":
        from sklearn.linear_model import LogisticRegression

        return ScaledHead(
            LogisticRegression(C=p["C"], max_iter=p["max_iter"], random_state=seed), threads=threads
        )
    if spec.name == "lightgbm":
        from lightgbm import LGBMClassifier

        return ScaledHead(
            LGBMClassifier(
                n_estimators=p["n_estimators"],
                learning_rate=p["learning_rate"],
                num_leaves=p["num_leaves"],
                random_state=seed,
                deterministic=True,
                force_row_wise=True,
                n_jobs=threads,
                verbose=-1,
            ),
            threads=threads,
        )
    from sklearn.ensemble import RandomForestClassifier

    return ScaledHead(
        RandomForestClassifier(
            n_estimators=p["n_estimators"], max_features=p["max_features"], random_state=seed, n_jobs=threads
        ),
        threads=threads,
    )
