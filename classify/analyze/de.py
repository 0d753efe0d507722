"""Differential expression between resistant and sensitive cells.

Two tests, each stored as its own table (``de_runs.method`` says which one):

- ``wilcoxon`` — cell-level Wilcoxon rank-sum (``scanpy.tl.rank_genes_groups``, tie-corrected,
  normal approximation). Over several datasets the per-dataset z-scores are combined with
  Stouffer's method weighted by √n (stratified by dataset, so study effects are not tested).
  Cells of one sample are not independent: with sample-level labels this test over-calls.
- ``pseudobulk`` — one pseudo-sample per (dataset, sample, label) with ≥ ``min_cells`` cells
  (summed or averaged with ``scanpy.get.aggregate``).
  Raw counts: summed counts tested with PyDESeq2 (``~condition``, plus ``~dataset`` over several
  datasets; Wald test, no independent filtering). Log-normalised or scaled input has no counts:
  per-pseudo-sample means are compared with Welch's t-test (``pseudobulk`` still, recorded in
  ``spec.test``). Needs ≥ 2 pseudo-samples per label.

Columns: ``gene, log2fc, p, padj`` (Benjamini–Hochberg over tested genes), ``mean_resistant,
mean_sensitive`` (mean of the analysed values: log1p CP10k for counts, X otherwise),
``frac_resistant, frac_sensitive`` (fraction expressing: value > 0; for scaled input value above
the gene's minimum, i.e. above the original zeros), ``significant`` (padj < alpha and
|log2fc| ≥ min_log2fc). ``log2fc`` is log2(mean CP10k_res / mean CP10k_sen) computed from cells,
with scanpy's ε = 1e-9 (``rank_genes_groups``' ``logfoldchanges``; a pseudocount of 1 would shrink
the fold changes of lowly expressed genes below the threshold), DESeq2's MLE log2 fold change for
pseudobulk on counts; for scaled input it is the
difference of mean z-scores (``de_runs.effect_unit``). Positive = higher in resistant.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from scdrugmap.store.errors import InputError

__all__ = ["DEMethod", "DESpec", "bh", "cell_level_de", "de_overlap", "group_summary", "pseudobulk_de"]

log = logging.getLogger(__name__)

DEMethod = Literal["wilcoxon", "pseudobulk"]
LABELS = ("resistant", "sensitive")
_EPS = 1e-9  # scanpy's rank_genes_groups log fold change offset


@dataclass(frozen=True)
class DESpec:
    """Everything that determines a DE table (hashed into ``de_id``)."""

    dataset_ids: tuple[str, ...]
    content_hashes: tuple[str, ...]
    labels: str
    method: DEMethod
    alpha: float = 0.05
    min_log2fc: float = 0.25
    min_cells: int = 10
    cells: str = "labelled"

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values; NaN stays NaN."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(np.clip(p[ok], 0.0, 1.0), method="bh")
    return out


def _dense_cols(X) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def _col_mean(X, mask: np.ndarray) -> np.ndarray:
    n = max(
        int(mask.sum()), 1
    )  # explicit sum / n: scipy's sparse mean scales before summing (1 + ε for all-ones)
    return np.asarray(X[mask].sum(axis=0, dtype=np.float64)).ravel() / n


def group_summary(adata: ad.AnnData) -> pd.DataFrame:
    """Per-gene means, fractions expressing and the effect (``log2fc``) by label.

    Parameters
    ----------
    adata
        Output of :func:`classify.analyze.data.load_expression` / ``load_selection`` with obs
        ``label`` in {sensitive, resistant}.

    Returns
    -------
    pandas.DataFrame
        Index = gene; ``log2fc, mean_resistant, mean_sensitive, frac_resistant, frac_sensitive``.
    """
    X = adata.X
    lab = adata.obs["label"].to_numpy()
    res, sen = lab == "resistant", lab == "sensitive"
    out = pd.DataFrame(index=adata.var_names.copy())
    out["mean_resistant"] = _col_mean(X, res)
    out["mean_sensitive"] = _col_mean(X, sen)
    if adata.uns.get("x_kind") in ("counts", "lognorm"):
        E = X.expm1() if sp.issparse(X) else np.expm1(X)
        out["log2fc"] = np.log2(_col_mean(E, res) + _EPS) - np.log2(_col_mean(E, sen) + _EPS)
        expressed = (X > 0) if sp.issparse(X) else sp.csr_matrix(X > 0)
    else:
        out["log2fc"] = out["mean_resistant"] - out["mean_sensitive"]
        D = _dense_cols(X)
        for d in pd.unique(adata.obs["dataset_id"]):  # the original zeros sit at each gene's minimum
            m = (adata.obs["dataset_id"] == d).to_numpy()
            D[m] -= D[m].min(axis=0)
        expressed = sp.csr_matrix(D > 1e-6)
    out["frac_resistant"] = _col_mean(expressed.astype(np.float64), res)
    out["frac_sensitive"] = _col_mean(expressed.astype(np.float64), sen)
    return out


def _tested_genes(adata: ad.AnnData, min_cells: int = 3) -> np.ndarray:
    X = adata.X
    if adata.uns.get("x_kind") in ("counts", "lognorm"):
        n = np.asarray((X > 0).sum(axis=0)).ravel()
        return n >= min_cells
    return _dense_cols(X).std(axis=0) > 0


def cell_level_de(adata: ad.AnnData) -> pd.DataFrame:
    """Cell-level Wilcoxon rank-sum per gene, stratified by dataset (Stouffer).

    Returns
    -------
    pandas.DataFrame
        Index = gene (genes expressed in ≥ 3 cells, or non-constant for scaled input);
        ``z`` (positive = higher in resistant), ``p`` (two-sided), ``n_strata``.

    Raises
    ------
    InputError
        When no dataset has both labels.
    """
    import scanpy as sc

    genes = adata.var_names[_tested_genes(adata)]
    z_sum = pd.Series(0.0, index=genes)
    w2 = 0.0
    n_strata = 0
    for d in pd.unique(adata.obs["dataset_id"]):
        part = adata[(adata.obs["dataset_id"] == d).to_numpy(), genes].copy()
        counts = part.obs["label"].value_counts()
        if any(counts.get(k, 0) < 2 for k in LABELS):
            log.warning("dataset %s: fewer than 2 cells of a label; left out of the cell-level test", d)
            continue
        part.obs["_group"] = pd.Categorical(part.obs["label"].astype(str))
        part.uns["log1p"] = {"base": None}
        with warnings.catch_warnings():  # scanpy's own log fold change is meaningless for scaled input
            warnings.simplefilter("ignore", RuntimeWarning)
            sc.tl.rank_genes_groups(
                part, "_group", groups=["resistant"], reference="sensitive", method="wilcoxon",
                tie_correct=True, use_raw=False,
            )  # fmt: skip
        res = sc.get.rank_genes_groups_df(part, "resistant").set_index("names")
        w = np.sqrt(part.n_obs)
        z_sum = z_sum.add(w * res["scores"].reindex(genes).fillna(0.0).astype(float), fill_value=0.0)
        w2 += w * w
        n_strata += 1
    if n_strata == 0:
        msg = "no dataset has at least 2 resistant and 2 sensitive cells; the cell-level test cannot run"
        raise InputError(msg)
    z = z_sum / np.sqrt(w2)
    return pd.DataFrame({"z": z, "p": 2.0 * stats.norm.sf(np.abs(z)), "n_strata": n_strata})


def _pseudo_samples(adata: ad.AnnData, min_cells: int) -> tuple[pd.Series, pd.DataFrame]:
    obs = adata.obs
    if obs["sample_id"].isna().all():
        msg = "no sample ids: a pseudobulk test needs samples (ingest with --sample-key)"
        raise InputError(msg)
    key = obs["dataset_id"].astype(str) + "|" + obs["sample_id"].astype(str) + "|" + obs["label"].astype(str)
    key = key.where(obs["sample_id"].notna())
    sizes = key.value_counts()
    keep = sizes.index[sizes >= min_cells]
    meta = pd.DataFrame([k.split("|") for k in keep], columns=["dataset", "sample", "condition"], index=keep)
    n = meta["condition"].value_counts()
    if any(n.get(k, 0) < 2 for k in LABELS):
        msg = (
            f"pseudobulk needs ≥ 2 samples per label with ≥ {min_cells} cells each; have "
            f"{int(n.get('resistant', 0))} resistant and {int(n.get('sensitive', 0))} sensitive"
        )
        raise InputError(msg)
    return key, meta


def _aggregate(X, key: pd.Series, groups: pd.Index, how: Literal["sum", "mean"]) -> np.ndarray:
    """Per-pseudo-sample sums or means of ``X`` ``(n_cells, n_genes)`` -> ``(len(groups), n_genes)``.

    Rows follow ``groups``; cells whose ``key`` is not in ``groups`` are left out
    (:func:`scanpy.get.aggregate`).
    """
    import scanpy as sc

    ok = key.isin(groups).to_numpy()
    obs = pd.DataFrame({"_pb": pd.Categorical(key[ok].astype(str), categories=groups.astype(str))})
    part = ad.AnnData(X=X[ok], obs=obs.set_axis(pd.RangeIndex(int(ok.sum())).astype(str)))
    agg = sc.get.aggregate(part, by="_pb", func=how)
    return np.asarray(agg[groups.astype(str)].layers[how], dtype=np.float64)


def pseudobulk_de(adata: ad.AnnData, *, min_cells: int = 10) -> tuple[pd.DataFrame, dict]:
    """Sample-level test of resistant vs sensitive pseudo-samples.

    Returns
    -------
    (pandas.DataFrame, dict)
        Index = gene; ``p`` and, for counts, DESeq2's ``log2fc``; and a dict describing the test
        (``test``, ``n_samples_resistant``, ``n_samples_sensitive``).

    Raises
    ------
    InputError
        No sample ids or fewer than 2 usable pseudo-samples per label.
    """
    key, meta = _pseudo_samples(adata, min_cells)
    info = {
        "n_samples_resistant": int((meta["condition"] == "resistant").sum()),
        "n_samples_sensitive": int((meta["condition"] == "sensitive").sum()),
    }
    if "counts" in adata.layers:
        from pydeseq2.dds import DeseqDataSet
        from pydeseq2.ds import DeseqStats

        counts = pd.DataFrame(
            np.rint(_aggregate(adata.layers["counts"], key, meta.index, "sum")).astype(np.int64),
            index=meta.index, columns=adata.var_names,
        )  # fmt: skip
        counts = counts.loc[:, counts.sum(axis=0) >= 10]
        several = meta["dataset"].nunique() > 1
        design = "~dataset + condition" if several else "~condition"
        dds = DeseqDataSet(counts=counts, metadata=meta, design=design, quiet=True, n_cpus=1)
        dds.deseq2()
        res = DeseqStats(
            dds,
            contrast=["condition", "resistant", "sensitive"],
            independent_filter=False,
            quiet=True,
            n_cpus=1,
        )
        res.summary()
        df = res.results_df
        out = pd.DataFrame({"log2fc": df["log2FoldChange"], "p": df["pvalue"]}, index=df.index)
        info["test"] = f"PyDESeq2 Wald test on summed counts ({design})"
        return out, info
    means = _aggregate(adata.X, key, meta.index, "mean")
    r = (meta["condition"] == "resistant").to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        t = stats.ttest_ind(means[r], means[~r], axis=0, equal_var=False)
    out = pd.DataFrame({"p": t.pvalue}, index=adata.var_names)
    out = out[np.nanstd(means, axis=0) > 0]
    info["test"] = "Welch t-test on per-sample mean expression (no counts: log-normalised/scaled input)"
    return out, info


def de_overlap(pred: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """How well DE on predicted labels reproduces DE on true labels.

    Parameters
    ----------
    pred, truth
        DE tables (``gene, log2fc, significant``).

    Returns
    -------
    dict
        ``n_significant, n_significant_truth, n_shared, jaccard`` (of the significant gene sets;
        NaN when both are empty), ``spearman_log2fc`` (over genes in both tables), ``n_genes``,
        ``missed_genes`` (significant with true labels only, most significant first, ≤ 50).
    """
    a = set(pred.loc[pred["significant"], "gene"])
    b = set(truth.loc[truth["significant"], "gene"])
    both = pred.set_index("gene")[["log2fc"]].join(
        truth.set_index("gene")[["log2fc"]], rsuffix="_t", how="inner"
    )
    both = both.dropna()
    rho = stats.spearmanr(both["log2fc"], both["log2fc_t"]).statistic if len(both) > 2 else np.nan
    missed = truth[truth["significant"] & ~truth["gene"].isin(a)].sort_values("padj")["gene"].head(50)
    return {
        "n_significant": len(a),
        "n_significant_truth": len(b),
        "n_shared": len(a & b),
        "jaccard": len(a & b) / len(a | b) if a | b else float("nan"),
        "spearman_log2fc": float(rho),
        "n_genes": len(both),
        "missed_genes": missed.tolist(),
    }
