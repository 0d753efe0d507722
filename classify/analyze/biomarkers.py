"""Biomarker genes: what a LightGBM classifier on expression uses to tell resistant from sensitive.

Features are the analysed expression values (log1p CP10k for counts, X as given for log-normalised
or scaled input) of genes expressed in ≥ 1 % of cells, the ``max_genes`` most variable if more.
A LightGBM model (deterministic, 100 trees, learning rate 0.1, 15 leaves, 63 bins, feature fraction 0.5)
is fitted on all cells with y = 1 for resistant. Importance per gene:

- ``mean_abs_shap`` — mean |SHAP value| over cells (TreeSHAP via LightGBM's ``pred_contrib=True``,
  log-odds units; no ``shap`` package needed); the ranking key;
- ``gain`` — total split gain (and its fraction of the total);
- ``direction`` — ``up`` when higher expression pushes towards resistant (positive correlation of
  the gene's SHAP values with its expression), else ``down``.

A grouped cross-validated AUROC (folds by sample when sample ids exist, at most 3 folds) says how
much the model (and so its ranking) can be trusted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.classify.analyze.data import load_selection, parse_labels
from scdrugmap.classify.analyze.plots import safe_stem, save_figure, violin_by_label
from scdrugmap.classify.analyze.tables import analysis_dir, make_id, now, replace_rows, versions
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError

__all__ = ["BiomarkerOutcome", "BiomarkerSpec", "fit_biomarkers", "run_biomarkers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BiomarkerSpec:
    """Model and feature settings (hashed into ``bm_id`` with the data identity)."""

    n_estimators: int = 100
    learning_rate: float = 0.1
    num_leaves: int = 15
    max_bin: int = 63
    feature_fraction: float = 0.5
    min_frac_expressing: float = 0.01
    max_genes: int = 5000
    seed: int = 0


@dataclass(frozen=True)
class BiomarkerOutcome:
    """Ranked genes (all kept genes), the CV AUROC and figure paths."""

    bm_id: str
    table: pd.DataFrame
    cv_auroc: float | None
    cv_folds: int
    figures: tuple[Path, ...]


def _features(adata: ad.AnnData, spec: BiomarkerSpec) -> tuple[np.ndarray, pd.Index]:
    X = adata.X
    dense = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)
    if adata.uns.get("x_kind") in ("counts", "lognorm"):
        keep = (dense > 0).mean(axis=0) >= spec.min_frac_expressing
    else:
        keep = dense.std(axis=0) > 0
    idx = np.flatnonzero(keep)
    if idx.size > spec.max_genes:
        var = dense[:, idx].var(axis=0)
        idx = np.sort(idx[np.argsort(-var, kind="stable")[: spec.max_genes]])
    if idx.size == 0:
        msg = "no gene passes the expression filter; nothing to rank"
        raise InputError(msg)
    return dense[:, idx], adata.var_names[idx]


def _model(spec: BiomarkerSpec):
    import lightgbm as lgb

    return lgb.LGBMClassifier(
        n_estimators=spec.n_estimators, learning_rate=spec.learning_rate, num_leaves=spec.num_leaves,
        colsample_bytree=spec.feature_fraction, max_bin=spec.max_bin, random_state=spec.seed, deterministic=True,
        force_row_wise=True, n_jobs=1, verbose=-1,
    )  # fmt: skip


def _cv_auroc(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, spec: BiomarkerSpec
) -> tuple[float | None, int]:
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is not None:
        per = pd.DataFrame({"g": groups, "y": y}).drop_duplicates()
        k = int(min(3, per["y"].value_counts().min()))
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=spec.seed) if k >= 2 else None
    else:
        k = int(min(3, np.bincount(y).min()))
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=spec.seed) if k >= 2 else None
    if splitter is None:
        return None, 0
    prob = np.full(len(y), np.nan)
    for train, test in splitter.split(X, y, groups):
        if np.unique(y[train]).size < 2:
            continue
        prob[test] = _model(spec).fit(X[train], y[train]).predict_proba(X[test])[:, 1]
    ok = np.isfinite(prob)
    return (float(roc_auc_score(y[ok], prob[ok])) if np.unique(y[ok]).size == 2 else None), k


def fit_biomarkers(
    adata: ad.AnnData, spec: BiomarkerSpec | None = None
) -> tuple[pd.DataFrame, float | None, int]:
    """Fit the LightGBM model and rank genes.

    Parameters
    ----------
    adata
        Labelled cells (obs ``label``, ``sample_id``, ``dataset_id``), analysis view of X.

    Returns
    -------
    (pandas.DataFrame, float or None, int)
        Table ``rank, gene, mean_abs_shap, gain, gain_fraction, direction, mean_resistant,
        mean_sensitive`` sorted by ``mean_abs_shap``; the CV AUROC (None when no split is
        possible); the number of CV folds.

    Raises
    ------
    InputError
        Fewer than 5 cells of a label.
    """
    spec = spec or BiomarkerSpec()
    y = (adata.obs["label"] == "resistant").to_numpy().astype(int)
    if min(y.sum(), (1 - y).sum()) < 5:
        msg = f"biomarkers need ≥ 5 cells of each label; have {int(y.sum())} resistant, {int((1 - y).sum())} sensitive"
        raise InputError(msg)
    X, genes = _features(adata, spec)
    model = _model(spec).fit(X, y)
    booster = model.booster_
    gain = booster.feature_importance(importance_type="gain")
    contrib = booster.predict(X, pred_contrib=True)[:, :-1]  # last column = expected value (bias)
    mean_abs = np.abs(contrib).mean(axis=0)
    xc, cc = X - X.mean(axis=0), contrib - contrib.mean(axis=0)
    cov = (xc * cc).sum(axis=0)
    table = pd.DataFrame({
        "gene": genes.astype(str), "mean_abs_shap": mean_abs, "gain": gain,
        "gain_fraction": gain / gain.sum() if gain.sum() > 0 else 0.0,
        "direction": np.where(cov >= 0, "up", "down"),
        "mean_resistant": X[y == 1].mean(axis=0), "mean_sensitive": X[y == 0].mean(axis=0),
    })  # fmt: skip
    table = table.sort_values(["mean_abs_shap", "gain"], ascending=False, kind="stable").reset_index(
        drop=True
    )
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    groups = None
    if adata.obs["sample_id"].notna().all():
        groups = (adata.obs["dataset_id"].astype(str) + "|" + adata.obs["sample_id"].astype(str)).to_numpy()
    auroc, folds = _cv_auroc(X, y, groups, spec)
    return table, auroc, folds


def run_biomarkers(
    store: Store,
    dataset_ids: Sequence[str],
    *,
    labels: str = "truth",
    top: int = 20,
    spec: BiomarkerSpec | None = None,
    figures_dir: Path | None = None,
) -> BiomarkerOutcome:
    """Rank biomarker genes of a dataset selection, store them and draw a violin plot of the top ones.

    Parameters
    ----------
    store
        The store.
    dataset_ids
        Datasets (several: pooled on shared genes, each normalised on its own).
    labels
        ``truth`` or ``run:RUN_ID``.
    top
        Genes kept in the catalog table and shown (violins show at most 20).
    spec
        Model settings.
    figures_dir
        Report folder (default ``<store>/analysis/figures``).

    Returns
    -------
    BiomarkerOutcome
        ``table`` holds the ``top`` genes.
    """
    spec = spec or BiomarkerSpec()
    if top < 1:
        msg = f"--top must be ≥ 1, got {top}"
        raise InputError(msg)
    src = parse_labels(labels)
    adata = load_selection(store, dataset_ids, labels=src)
    hashes = store.query(
        "SELECT content_hash FROM datasets WHERE list_contains(?, dataset_id) ORDER BY dataset_id",
        [list(dataset_ids)],
    )["content_hash"].tolist()
    ident = {"datasets": sorted(dataset_ids), "hashes": hashes, "labels": str(src), "spec": asdict(spec)}
    bm_id = make_id("bm", ident)
    table, auroc, folds = fit_biomarkers(adata, spec)
    head = table.head(top)
    run = pd.DataFrame([{
        "bm_id": bm_id, "dataset_ids": json.dumps(sorted(dataset_ids)), "labels": str(src), "n_cells": adata.n_obs,
        "n_genes": len(table), "cv_auroc": auroc, "cv_folds": folds, "params": json.dumps(asdict(spec)),
        "spec": json.dumps({**ident, "x_kind": adata.uns["x_kind"]}), "versions": versions("lightgbm"),
        "created_at": now(),
    }])  # fmt: skip
    replace_rows(
        store, [("biomarker_runs", run), ("biomarkers", head.assign(bm_id=bm_id))], key={"bm_id": bm_id}
    )
    shown = head["gene"].head(20).tolist()
    vals = adata[:, shown].X
    vals = np.asarray(vals.toarray() if sp.issparse(vals) else vals)
    name = "+".join(sorted(dataset_ids)) if len(dataset_ids) <= 3 else f"{len(dataset_ids)}datasets"
    unit = "log1p CP10k" if adata.uns["x_kind"] == "counts" else f"expression ({adata.uns['x_kind']})"
    fig = violin_by_label(vals, adata.obs["label"].to_numpy(), shown, title=f"{name}: top biomarkers (LightGBM SHAP)",
                          y_label=unit)  # fmt: skip
    auc_txt = f"{auroc:.3f}" if auroc is not None else "n/a"
    caption = (
        f"Violin plot of the {len(shown)} top biomarker genes of {name} ({src} labels) by label, ranked by mean |SHAP| "
        f"of a LightGBM model on expression ({len(table)} genes; {folds}-fold grouped CV AUROC {auc_txt}); {bm_id}."
    )
    paths = save_figure(
        fig, figures_dir or analysis_dir(store, "figures"), safe_stem("biomarkers", name), caption
    )
    return BiomarkerOutcome(bm_id, head, auroc, folds, tuple(paths))
