"""Run DE on store datasets, keep the tables in the catalog and draw volcano plots.

Tables: ``de_runs`` (one row per table: selection, labels, method, effect unit, counts, spec),
``de_results`` (one row per gene) and, for predicted labels, ``de_overlap`` (agreement with DE on
the true labels of the same cells — scDrugMap's case study as a metric).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scdrugmap.classify.analyze.data import load_selection, parse_labels
from scdrugmap.classify.analyze.de import (
    DEMethod,
    DESpec,
    bh,
    cell_level_de,
    de_overlap,
    group_summary,
    pseudobulk_de,
)
from scdrugmap.classify.analyze.plots import safe_stem, save_figure, volcano_plot
from scdrugmap.classify.analyze.tables import analysis_dir, make_id, now, replace_rows, versions
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError, StoreError

__all__ = ["RESULT_COLUMNS", "DEOutcome", "load_de_table", "run_de"]

log = logging.getLogger(__name__)

RESULT_COLUMNS = [
    "gene", "log2fc", "p", "padj", "mean_resistant", "mean_sensitive", "frac_resistant", "frac_sensitive",
    "significant",
]  # fmt: skip


@dataclass(frozen=True)
class DEOutcome:
    """One DE table: its id, spec, rows, test description, figures and (run labels) overlap."""

    de_id: str
    spec: DESpec
    table: pd.DataFrame
    info: dict
    figures: tuple[Path, ...]
    overlap: dict | None = None
    truth_de_id: str | None = None


def _effect_unit(x_kind: str) -> str:
    return "log2 fold change" if x_kind in ("counts", "lognorm") else "difference of mean values (z-scores)"


def _table(adata: ad.AnnData, spec: DESpec) -> tuple[pd.DataFrame, dict]:
    summary = group_summary(adata)
    if spec.method == "wilcoxon":
        test = cell_level_de(adata)
        info = {
            "test": f"cell-level Wilcoxon rank-sum (scanpy), Stouffer over {int(test['n_strata'].iloc[0])} dataset(s)"
        }
        test = test.drop(columns="n_strata")
    else:
        test, info = pseudobulk_de(adata, min_cells=spec.min_cells)
    df = summary.loc[test.index].copy()
    if "log2fc" in test:
        df["log2fc"] = test["log2fc"]
    df["p"] = test["p"].to_numpy(dtype=float)
    df["padj"] = bh(df["p"].to_numpy())
    df["significant"] = (df["padj"] < spec.alpha) & (df["log2fc"].abs() >= spec.min_log2fc)
    df = df.rename_axis("gene").reset_index().sort_values(["padj", "p"], na_position="last")
    return df[RESULT_COLUMNS].reset_index(drop=True), info


def _store_table(
    store: Store, de_id: str, spec: DESpec, adata: ad.AnnData, table: pd.DataFrame, info: dict
) -> None:
    lab = adata.obs["label"]
    samples = adata.obs.dropna(subset=["sample_id"]).groupby("label", observed=True)["sample_id"].nunique()
    run = pd.DataFrame([{
        "de_id": de_id, "dataset_ids": json.dumps(list(spec.dataset_ids)), "labels": spec.labels,
        "method": spec.method, "effect_unit": _effect_unit(adata.uns["x_kind"]), "alpha": spec.alpha,
        "min_log2fc": spec.min_log2fc, "n_cells": adata.n_obs, "n_resistant": int((lab == "resistant").sum()),
        "n_sensitive": int((lab == "sensitive").sum()),
        "n_samples_resistant": info.get("n_samples_resistant", int(samples.get("resistant", 0))),
        "n_samples_sensitive": info.get("n_samples_sensitive", int(samples.get("sensitive", 0))),
        "n_genes": len(table), "n_significant": int(table["significant"].sum()),
        "spec": json.dumps({**spec.as_dict(), **info, "x_kind": adata.uns["x_kind"]}),
        "versions": versions("scanpy", "pydeseq2", "scipy"), "created_at": now(),
    }])  # fmt: skip
    replace_rows(store, [("de_runs", run), ("de_results", table.assign(de_id=de_id))], key={"de_id": de_id})


def _one(store: Store, adata: ad.AnnData, spec: DESpec, fig_dir: Path) -> DEOutcome:
    de_id = make_id("de", spec.as_dict())
    table, info = _table(adata, spec)
    _store_table(store, de_id, spec, adata, table, info)
    name = "+".join(spec.dataset_ids) if len(spec.dataset_ids) <= 3 else f"{len(spec.dataset_ids)}datasets"
    title = f"{name}: resistant vs sensitive, {spec.method} ({spec.labels} labels)"
    fig = volcano_plot(table, title=title, x_label=_effect_unit(adata.uns["x_kind"]))
    caption = (
        f"Volcano plot, {title}; {info['test']}; {int(table['significant'].sum())} of {len(table)} genes "
        f"significant (BH-adjusted p < {spec.alpha}, |effect| ≥ {spec.min_log2fc}); DE table {de_id}."
    )
    paths = save_figure(
        fig,
        fig_dir,
        safe_stem(
            "volcano",
            name,
            spec.method,
            spec.labels.replace(":", "-"),
            "" if spec.cells == "labelled" else "predicted-cells",
        ),
        caption,
    )
    return DEOutcome(de_id, spec, table, info, tuple(paths))


def run_de(
    store: Store,
    dataset_ids: Sequence[str],
    *,
    labels: str = "truth",
    methods: Sequence[DEMethod] | None = None,
    alpha: float = 0.05,
    min_log2fc: float = 0.25,
    min_cells: int = 10,
    figures_dir: Path | None = None,
) -> list[DEOutcome]:
    """Resistant vs sensitive DE on one or several datasets.

    Parameters
    ----------
    store
        The store.
    dataset_ids
        Datasets to test (several: pooled on shared genes, stratified by dataset).
    labels
        ``truth`` or ``run:RUN_ID``; with a run, DE on the true labels of the same cells is run
        too and the overlap (Jaccard of significant genes, Spearman of log2FC) is stored.
    methods
        ``wilcoxon`` and/or ``pseudobulk``; default both, pseudobulk only when sample ids allow it
        (skipped with a warning otherwise).
    alpha, min_log2fc
        Significance: BH-adjusted p < alpha and |log2fc| ≥ min_log2fc.
    min_cells
        Smallest pseudo-sample (cells per sample and label).
    figures_dir
        Report folder (default ``<store>/analysis/figures``).

    Returns
    -------
    list of DEOutcome

    Raises
    ------
    InputError
        Bad options, a selection without both labels, or an explicitly requested test that
        cannot run.
    """
    if not 0 < alpha < 1 or min_log2fc < 0 or min_cells < 1:
        msg = f"alpha={alpha} must be in (0, 1), min_log2fc={min_log2fc} ≥ 0, min_cells={min_cells} ≥ 1"
        raise InputError(msg)
    src = parse_labels(labels)
    explicit = methods is not None
    methods = list(methods or ("wilcoxon", "pseudobulk"))
    adata = load_selection(store, dataset_ids, labels=src)
    hashes = store.query(
        "SELECT dataset_id, content_hash FROM datasets WHERE list_contains(?, dataset_id) ORDER BY 1",
        [list(dataset_ids)],
    )
    fig_dir = figures_dir or analysis_dir(store, "figures")
    out: list[DEOutcome] = []
    for method in methods:
        spec = DESpec(
            tuple(sorted(dataset_ids)),
            tuple(hashes["content_hash"]),
            str(src),
            method,
            alpha,
            min_log2fc,
            min_cells,
        )
        try:
            res = _one(store, adata, spec, fig_dir)
        except InputError as exc:
            if explicit:
                raise
            log.warning("%s test skipped: %s", method, exc)
            continue
        if src.kind == "run":
            res = _with_truth(store, adata, res, fig_dir)
        out.append(res)
    return out


def _with_truth(store: Store, adata: ad.AnnData, pred: DEOutcome, fig_dir: Path) -> DEOutcome:
    """DE on the true labels of the cells that have predictions, and the overlap."""
    truth = store.query(
        "SELECT cell_uid, label FROM cells WHERE list_contains(?, cell_uid)",
        [adata.obs["cell_uid"].astype(int).tolist()],
    ).set_index("cell_uid")["label"]
    tad = adata[adata.obs["cell_uid"].map(truth).notna().to_numpy()].copy()
    tad.obs["label"] = tad.obs["cell_uid"].map(truth).to_numpy()
    spec = replace(pred.spec, labels="truth", cells=f"cells predicted by {pred.spec.labels[4:]}")
    t = _one(store, tad, spec, fig_dir)
    ov = de_overlap(pred.table, t.table)
    row = pd.DataFrame([{
        "de_id": pred.de_id, "truth_de_id": t.de_id, **{k: v for k, v in ov.items() if k != "missed_genes"},
        "missed_genes": json.dumps(ov["missed_genes"]), "created_at": now(),
    }])  # fmt: skip
    replace_rows(store, [("de_overlap", row)], key={"de_id": pred.de_id})
    return replace(pred, overlap=ov, truth_de_id=t.de_id)


def load_de_table(
    store: Store | None, source: str, *, alpha: float = 0.05, min_log2fc: float = 0.25
) -> pd.DataFrame:
    """A DE table from the catalog (``de_id``) or a file (CSV/TSV/Parquet).

    A file needs columns ``gene`` and ``log2fc`` and one of ``significant`` / ``padj``; without
    ``significant`` it is padj < alpha and |log2fc| ≥ min_log2fc.

    Raises
    ------
    InputError
        Unknown id, unreadable file or missing columns.
    """
    path = Path(source)
    if path.is_file():
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep="\t" if path.suffix in (".tsv", ".txt") else ",")
    else:
        if store is None:
            msg = f"{source!r} is neither a file nor (without a store) a DE table id"
            raise InputError(msg)
        try:
            df = store.query("SELECT * FROM de_results WHERE de_id = ? ORDER BY padj", [source])
        except StoreError:
            raise
        except Exception:
            df = pd.DataFrame()
        if df.empty:
            msg = f'{source!r} is neither a file nor a DE table id (see `scdrugmap sql "SELECT * FROM de_runs"`)'
            raise InputError(msg)
    missing = {"gene", "log2fc"} - set(df.columns)
    if missing or not {"significant", "padj"} & set(df.columns):
        msg = f"DE table {source}: needs columns gene, log2fc and significant or padj; has {list(df.columns)}"
        raise InputError(msg)
    if "significant" not in df:
        df["significant"] = (df["padj"] < alpha) & (df["log2fc"].abs() >= min_log2fc)
    df["significant"] = df["significant"].fillna(False).astype(bool)
    df["gene"] = df["gene"].astype(str)
    return df[np.isfinite(df["log2fc"].astype(float)) | ~df["significant"]].reset_index(drop=True)
