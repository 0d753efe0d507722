"""What a prediction writes: obs columns, the embedding in obsm, provenance in uns, and the summary.

Conventions (scanpy-friendly, every value h5ad-writable so ``sc.read_h5ad`` reads it back):

- ``obs['scdrugmap_p_sensitive']`` — calibrated probability that the cell is **sensitive**
  (whatever the run's positive class), ``scdrugmap_p_sensitive_raw`` before calibration;
- ``obs['scdrugmap_call']`` — ``sensitive`` / ``resistant`` / ``abstain`` / ``not_scored``;
- ``obs['scdrugmap_status']`` — ``scored`` (a new cell, scored by the fold-head ensemble),
  ``out_of_fold`` (a cell that trained the head: its cross-validation out-of-fold prediction) or
  ``not_scored``; ``obs['scdrugmap_reason']`` says why (QC failure with the figures, …);
- ``obsm['X_scdrugmap_<model>']`` — the embedding the head read (NaN rows: not embedded; never
  scanpy's own ``X_pca``);
- ``uns['scdrugmap']`` — run id, model, revision, head, positive class, calibration (method, why,
  out-of-study Brier/ECE), QC (thresholds, counts per reason), counts, figures, versions.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from scdrugmap.store.catalog import Store

__all__ = ["CALLS", "STATUSES", "annotate", "build_summary", "h5ad_safe"]

CALLS = ["sensitive", "resistant", "abstain", "not_scored"]
STATUSES = ["scored", "out_of_fold", "not_scored"]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("scdrugmap", "numpy", "scikit-learn", "anndata", "scanpy", "torch", "lightgbm"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "absent"
    return out


def _reason_counts(cells: pd.DataFrame, min_genes: int, max_pct_mito: float) -> dict[str, int]:
    r = cells["reason"].astype(str)
    genes, mito = r.str.contains("detected genes"), r.str.contains("mitochondrial")
    kinds = {
        f"≤ {min_genes} detected genes": genes & ~mito,
        f"≥ {max_pct_mito:g} % mitochondrial counts": mito & ~genes,
        f"≤ {min_genes} detected genes and ≥ {max_pct_mito:g} % mitochondrial counts": genes & mito,
        "no gene known to the model is expressed": r.str.startswith("no gene known"),
        "trained the head but has no out-of-fold prediction": r.str.contains("no out-of-fold"),
    }
    return {k: int(v.sum()) for k, v in kinds.items() if v.any()}


def _figures(store: Store, dataset_id: str | None, cells: pd.DataFrame, pos: str) -> dict[str, Any]:
    """Accuracy of answered labelled cells: new cells and (separately) out-of-fold cells."""
    if dataset_id is None:
        return {"labelled": False}
    lab = store.query("SELECT obs_name, label FROM cells WHERE dataset_id = ?", [dataset_id])
    label = pd.Series(lab["label"].to_numpy(), index=lab["obs_name"].astype(str)).reindex(cells.index)
    out: dict[str, Any] = {"labelled": True, "dataset_id": dataset_id}
    for status, key in (("scored", "new_cells"), ("out_of_fold", "out_of_fold_cells")):
        sel = (cells["status"] == status).to_numpy() & label.notna().to_numpy()
        answered = sel & (cells["call"] != "abstain").to_numpy()
        acc = float((cells["call"][answered] == label[answered]).mean()) if answered.any() else None
        out[key] = {"n_labelled": int(sel.sum()), "n_answered": int(answered.sum()), "accuracy_answered": acc}
    out["note"] = (
        "out-of-fold cells trained the head: their figures are cross-validation predictions, not a test on new cells"
    )
    return out


def build_summary(
    store: Store,
    row: pd.Series,
    meta: dict[str, Any],
    cells: pd.DataFrame,
    *,
    qc: Any,
    x_kind: str,
    min_genes: int,
    max_pct_mito: float,
    calibration: str,
    method: str,
    abstain: tuple[float, float] | None,
    dataset_id: str | None,
) -> dict[str, Any]:
    """The prediction's summary (also ``uns['scdrugmap']``): provenance, QC, calibration, counts, figures."""
    call, status = cells["call"], cells["status"]
    pos = str(meta["positive_class"])
    why = meta["default_reason"] if calibration == "auto" else f"{calibration} requested"
    return {
        "run_id": str(row["run_id"]),
        "model": str(row["model"]),
        "revision": str(row["revision"]),
        "head": str(row["head"]),
        "strategy": str(row["strategy"]),
        "training": f"{row['protocol']} {row['category']} = {row['value']}",
        "positive_class": pos,
        "scoring": "mean of the run's fold heads"
        if row["strategy"] == "frozen"
        else "one LoRA fold's adapter + head",
        "probability": "scdrugmap_p_sensitive = calibrated probability of the sensitive class",
        "calibration": {
            "requested": calibration,
            "method": method,
            "reason": why,
            "out_of_study": meta.get("out_of_study", {}),
            "n_studies": int(meta.get("n_studies", 0)),
        },
        "abstain": list(abstain) if abstain else [],
        "qc": {
            "applied": bool(qc.applied),
            "x_kind": str(x_kind),
            "min_genes": int(min_genes),
            "max_pct_mito": float(max_pct_mito),
            "n_failed": int(cells["reason"].astype(str).str.startswith("failed QC").sum()),
            "reasons": _reason_counts(cells, min_genes, max_pct_mito),
        },
        "counts": {
            "cells": len(cells),
            "scored": int((status == "scored").sum()),
            "out_of_fold": int((status == "out_of_fold").sum()),
            "not_scored": int((status == "not_scored").sum()),
            "sensitive": int((call == "sensitive").sum()),
            "resistant": int((call == "resistant").sum()),
            "abstain": int((call == "abstain").sum()),
        },
        "figures": _figures(store, dataset_id, cells, pos),
        "versions": _versions(),
    }


def h5ad_safe(value: Any) -> Any:
    """A copy of a JSON-like value that h5ad can store (None dropped, mixed lists as JSON text)."""
    if isinstance(value, dict):
        return {str(k): h5ad_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        vals = [v for v in value if v is not None]
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in vals):
            return np.asarray(vals, dtype=float)
        if all(isinstance(v, str) for v in vals):
            return np.asarray(vals, dtype=object).astype(str)
        return json.dumps(vals, default=str)
    if isinstance(value, np.generic):
        return value.item()
    return value


def annotate(
    adata: Any, cells: pd.DataFrame, embedding: np.ndarray | None, summary: dict[str, Any], *, model: str
) -> Any:
    """Write the prediction into ``adata`` (modified and returned): obs, obsm, uns as the module says."""
    cells = cells.reindex(adata.obs_names.astype(str))
    p_pos, p_raw = cells["p_pos"].to_numpy(float), cells["p_pos_raw"].to_numpy(float)
    if summary["positive_class"] != "sensitive":
        p_pos, p_raw = 1.0 - p_pos, 1.0 - p_raw
    adata.obs["scdrugmap_p_sensitive"] = p_pos
    adata.obs["scdrugmap_p_sensitive_raw"] = p_raw
    adata.obs["scdrugmap_call"] = pd.Categorical(
        cells["call"].fillna("not_scored").to_numpy(), categories=CALLS
    )
    adata.obs["scdrugmap_status"] = pd.Categorical(
        cells["status"].fillna("not_scored").to_numpy(), categories=STATUSES
    )
    adata.obs["scdrugmap_reason"] = cells["reason"].fillna("").astype(str).to_numpy()
    if embedding is not None:
        adata.obsm[f"X_scdrugmap_{model}"] = embedding
    adata.uns["scdrugmap"] = h5ad_safe(summary)
    return adata


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Plain-text lines of a summary for the CLI: counts, QC reasons, calibration figures, figures."""
    c, q, cal = summary["counts"], summary["qc"], summary["calibration"]
    lines = [
        f"{c['scored']} new cells scored, {c['out_of_fold']} cells that trained the head given their out-of-fold "
        f"prediction, {c['not_scored']} not scored (of {c['cells']}); calls: {c['sensitive']} sensitive, "
        f"{c['resistant']} resistant, {c['abstain']} abstain (positive class {summary['positive_class']}; "
        "scdrugmap_p_sensitive is the probability of sensitive)"
    ]
    if q["applied"]:
        why = ", ".join(f"{n} {k}" for k, n in q["reasons"].items()) or "none"
        lines.append(
            f"QC (> {q['min_genes']} genes, < {q['max_pct_mito']:g} % mito): {q['n_failed']} failed — {why}"
        )
    else:
        lines.append(f"QC skipped: X holds {q['x_kind']} values, not raw counts")
    lines.append(f"calibration {cal['method']} ({cal['reason']})")
    for m, f in cal["out_of_study"].items():
        if f.get("brier_calibrated") is not None:
            lines.append(
                f"  out of study ({cal['n_studies']} studies, {int(f['n'])} cells) {m}: Brier {f['brier_raw']:.3f} raw → "
                f"{f['brier_calibrated']:.3f}, ECE {f['ece_raw']:.3f} → {f['ece_calibrated']:.3f}"
            )
    fig = summary["figures"]
    if fig.get("labelled"):
        new, oof = fig["new_cells"], fig["out_of_fold_cells"]
        if new["accuracy_answered"] is not None:
            lines.append(
                f"accuracy on {new['n_answered']} answered labelled new cells: {new['accuracy_answered']:.3f}"
            )
        if oof["accuracy_answered"] is not None:
            lines.append(
                f"cells that trained the head: out-of-fold (cross-validation) accuracy {oof['accuracy_answered']:.3f} "
                f"on {oof['n_answered']} answered cells — not a test on new cells"
            )
    return lines
