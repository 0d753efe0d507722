"""Save and load trained heads without pickles (safetensors + JSON, LightGBM's text format).

A saved head is a directory::

    head.json          kind, hyper-parameters, calibrator, provenance (model, revision, run)
    head.safetensors   standardisation mean/std and the head's weights
    lightgbm.txt       LightGBM booster (``Booster.model_to_string``), lightgbm heads only

Loading gives bit-identical predictions on CPU. Random forests have no pickle-free format in
scikit-learn and are refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from scdrugmap.classify.heads import MLP_HEADS, HeadSpec, ScaledHead, make_head
from scdrugmap.classify.mlp_head import MLPHead
from scdrugmap.store.errors import InputError, StoreError

__all__ = ["load_head", "save_head"]


def save_head(model: ScaledHead, spec: HeadSpec, directory: Path, *, extra: dict[str, Any]) -> None:
    """Write a fitted head atomically to ``directory``.

    Parameters
    ----------
    model
        Fitted head from :func:`classify.heads.make_head`.
    spec
        Its :class:`HeadSpec`.
    directory
        Target directory (replaced if present).
    extra
        JSON-serialisable provenance (model, revision, calibrator, …) stored in ``head.json``.

    Raises
    ------
    InputError
        For heads that cannot be saved without pickle (``rf``).
    """
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {
        "scaler.mean": np.ascontiguousarray(model.mean),  # dtypes kept: bit-identical reload
        "scaler.std": np.ascontiguousarray(model.std),
    }
    inner = model.inner
    if spec.name in MLP_HEADS:
        for k, v in inner.net.state_dict().items():
            tensors[f"net.{k}"] = v.detach().cpu().numpy()
    elif spec.name == "logreg":
        tensors["coef"] = np.ascontiguousarray(inner.coef_)
        tensors["intercept"] = np.ascontiguousarray(inner.intercept_)
        tensors["classes"] = inner.classes_.astype(np.int64)
    elif spec.name != "lightgbm":
        msg = f"{spec.name!r} heads cannot be saved without pickle; train the run with --head mlp, logreg or lightgbm"
        raise InputError(msg)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "head.safetensors"))
    if spec.name == "lightgbm":
        (tmp / "lightgbm.txt").write_text(inner.booster_.model_to_string())
    meta = {"head": spec.name, "params": spec.as_dict(), "n_features": len(model.mean), **extra}
    (tmp / "head.json").write_text(json.dumps(meta, indent=1, default=str))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


class _Booster:
    """predict_proba over a LightGBM Booster loaded from text."""

    def __init__(self, text: str) -> None:
        import lightgbm

        self.booster = lightgbm.Booster(model_str=text)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        p = self.booster.predict(X)
        return np.column_stack([1 - p, p])


def load_head(directory: Path) -> tuple[ScaledHead, dict[str, Any]]:
    """Load a head written by :func:`save_head`.

    Returns
    -------
    tuple
        ``(head with predict_proba(X) -> (n,), head.json contents)``.

    Raises
    ------
    StoreError
        When the directory is missing or incomplete.
    """
    from safetensors.numpy import load_file

    meta_path = directory / "head.json"
    if not meta_path.exists():
        msg = f"no saved head at {directory}; train it with `scdrugmap predict --head RUN_ID` first"
        raise StoreError(msg)
    meta = json.loads(meta_path.read_text())
    tensors = load_file(str(directory / "head.safetensors"))
    spec = HeadSpec.stored(meta["head"], meta["params"])
    scaled = make_head(spec, seed=0)
    scaled.mean, scaled.std = tensors["scaler.mean"], tensors["scaler.std"]
    if spec.name in MLP_HEADS:
        import torch

        mlp: MLPHead = scaled.inner
        mlp.build(int(meta["n_features"]))
        state = {k[4:]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("net.")}
        mlp.net.load_state_dict(state, strict=True)
        mlp.net.eval()
    elif spec.name == "logreg":
        lr = scaled.inner
        lr.coef_, lr.intercept_, lr.classes_ = tensors["coef"], tensors["intercept"], tensors["classes"]
        lr.n_features_in_ = int(meta["n_features"])
    else:
        scaled.inner = _Booster((directory / "lightgbm.txt").read_text())
    return scaled, meta
