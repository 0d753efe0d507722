"""One gene across every dataset: expression by label, a test, and a UMAP coloured by expression.

For each dataset with expression whose genes include SYMBOL (HGNC symbol, case-insensitive): cells
per label, mean of the analysed values (log1p CP10k for counts, X otherwise) per label and
overall, fraction expressing (value > 0; for scaled input above the gene's minimum), the effect
(log2 fold change resistant vs sensitive for counts/log-normalised input, difference of means for
scaled input) and a two-sided Mann–Whitney U p-value (cells as units — see ``analyze de`` for
sample-level tests). Rows go to ``gene_views``.

The per-dataset UMAP is computed from expression (highly variable genes → PCA → UMAP) once per
dataset content and cached in ``<store>/analysis/umap/expr_<dataset>_<hash>.parquet``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from scdrugmap.classify.analyze.data import load_expression, select_dataset_ids
from scdrugmap.classify.analyze.plots import safe_stem, save_figure
from scdrugmap.classify.analyze.separation import umap_coords
from scdrugmap.classify.analyze.tables import analysis_dir, now, replace_rows
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError
from scdrugmap.store.progress import track

__all__ = ["GeneViewOutcome", "expression_umap", "gene_view"]


@dataclass(frozen=True)
class GeneViewOutcome:
    """Per-dataset statistics of the gene and figure paths."""

    gene: str
    table: pd.DataFrame
    figures: tuple[Path, ...]


def expression_umap(
    store: Store, adata, dataset_id: str, *, seed: int = 0, max_cells: int = 20_000
) -> pd.DataFrame:
    """Cached expression UMAP of a dataset: ``cell_uid, umap1, umap2`` (≤ ``max_cells`` cells)."""
    import scanpy as sc

    h = store.query("SELECT content_hash FROM datasets WHERE dataset_id = ?", [dataset_id])[
        "content_hash"
    ].iloc[0]
    path = analysis_dir(store, "umap") / f"expr_{safe_stem(dataset_id)}_{str(h)[:12]}_{seed}.parquet"
    if path.exists():
        return pd.read_parquet(path)
    work = adata
    if work.n_obs > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(work.n_obs, max_cells, replace=False))
        work = work[keep]
    work = work.copy()
    if work.uns["x_kind"] in ("counts", "lognorm") and work.n_vars > 2000:
        work.uns["log1p"] = {"base": None}
        sc.pp.highly_variable_genes(work, n_top_genes=2000, flavor="seurat", subset=True)
    X = work.X.toarray() if sp.issparse(work.X) else np.asarray(work.X)
    coords = umap_coords(X, seed=seed)
    out = pd.DataFrame(
        {"cell_uid": work.obs["cell_uid"].to_numpy(), "umap1": coords[:, 0], "umap2": coords[:, 1]}
    )
    out.to_parquet(path, index=False)
    return out


def _stats(values: np.ndarray, labels: np.ndarray, x_kind: str, expressed: np.ndarray) -> dict:
    res, sen = labels == "resistant", labels == "sensitive"
    row = {
        "n_resistant": int(res.sum()), "n_sensitive": int(sen.sum()), "n_unlabelled": int((~res & ~sen).sum()),
        "mean_all": float(values.mean()), "frac_all": float(expressed.mean()),
        "value_kind": "log1p CP10k" if x_kind == "counts" else x_kind,
    }  # fmt: skip
    for name, m in (("resistant", res), ("sensitive", sen)):
        row[f"mean_{name}"] = float(values[m].mean()) if m.any() else None
        row[f"frac_{name}"] = float(expressed[m].mean()) if m.any() else None
    row["log2fc"] = row["p"] = None
    if res.sum() >= 2 and sen.sum() >= 2:
        if x_kind in ("counts", "lognorm"):
            e = np.expm1(values)
            row["log2fc"] = float(np.log2(e[res].mean() + 1) - np.log2(e[sen].mean() + 1))
        else:
            row["log2fc"] = row["mean_resistant"] - row["mean_sensitive"]
        row["p"] = float(stats.mannwhitneyu(values[res], values[sen], alternative="two-sided").pvalue)
    return row


def gene_view(
    store: Store,
    symbol: str,
    *,
    datasets: Sequence[str] | None = None,
    where: str | None = None,
    umap: bool = True,
    figures_dir: Path | None = None,
) -> GeneViewOutcome:
    """Expression of ``symbol`` by label in every (selected) dataset; table, store and UMAP figure.

    Raises
    ------
    InputError
        When no selected dataset has the gene.
    """
    gene = symbol.strip().upper()
    rows, panels = [], []
    for did in track(select_dataset_ids(store, datasets, where), f"analyze gene {gene}", unit="datasets",
                     stage=str):  # fmt: skip
        adata = load_expression(store, did, labelled_only=False)
        match = np.flatnonzero(adata.var_names.str.upper() == gene)
        if match.size == 0:
            continue
        col = adata.X[:, int(match[0])]
        values = np.asarray(col.toarray() if sp.issparse(col) else col, dtype=float).ravel()
        expressed = values > (values.min() + 1e-6 if adata.uns["x_kind"] == "scaled" else 0)
        labels = adata.obs["label"].astype(object).fillna("unlabelled").to_numpy()
        rows.append({"gene": gene, "dataset_id": did, **_stats(values, labels, adata.uns["x_kind"], expressed),
                     "created_at": now()})  # fmt: skip
        if umap and adata.n_obs >= 10:
            coords = expression_umap(store, adata, did)
            val = pd.Series(values, index=adata.obs["cell_uid"].to_numpy())
            panels.append((did, coords, val.reindex(coords["cell_uid"]).to_numpy(), rows[-1]["value_kind"]))
    if not rows:
        msg = f"gene {symbol!r} is in no selected dataset (genes are HGNC symbols; see the genes table)"
        raise InputError(msg)
    table = pd.DataFrame(rows)
    replace_rows(store, [("gene_views", table)], key={"gene": gene})
    figures: tuple[Path, ...] = ()
    if panels:
        figures = _figure(panels, gene, figures_dir or analysis_dir(store, "figures"))
    return GeneViewOutcome(gene, table.drop(columns="created_at"), figures)


def _figure(panels: list, gene: str, out_dir: Path) -> tuple[Path, ...]:
    n = len(panels)
    ncol = min(4, n)
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.8 * ncol, 3.4 * nrow), squeeze=False)
    for ax, (did, coords, vals, kind) in zip(axes.ravel(), panels, strict=False):
        order = np.argsort(vals)
        sc = ax.scatter(coords["umap1"].to_numpy()[order], coords["umap2"].to_numpy()[order], c=vals[order], s=3,
                        cmap="magma_r", linewidths=0)  # fmt: skip
        fig.colorbar(sc, ax=ax, shrink=0.8, label=kind)
        ax.set_title(did, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    fig.suptitle(f"{gene} expression (UMAP of each dataset's expression)", fontsize=10)
    fig.tight_layout()
    caption = f"{gene}: expression on a UMAP of each of {n} dataset(s) (own expression UMAP per dataset); table gene_views."
    return tuple(save_figure(fig, out_dir, safe_stem("gene", gene), caption))
