"""How well an embedding separates resistant from sensitive cells, without any head.

Per dataset and per value of a category (e.g. tissue), on the model's embedding of the labelled
cells (standardised per feature; reduced to 50 principal components when wider; at most
``max_cells`` cells, a seeded stratified subsample):

- ``silhouette`` — mean silhouette width of the label (Euclidean), in [-1, 1]; 0 = no separation;
- ``silhouette_shuffled`` — the same with the labels permuted (a shuffled embedding's score);
- ``knn_purity`` — mean fraction of each cell's ``k`` nearest neighbours (itself excluded) that
  share its label; ``knn_purity_expected`` = Σ p_label² is its value for a random embedding.

Scores go to the ``separation`` table (one row per revision × scope × value); the head metrics of
the same model and category value are shown beside them by :func:`separation_with_metrics`
(both it and ``GET /analysis/separation`` read :func:`separation_rows`). A UMAP
of the embedding coloured by label, dataset and cancer type is written as PNG and SVG.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scdrugmap.classify.analyze.plots import embedding_panels, safe_stem, save_figure
from scdrugmap.classify.analyze.tables import analysis_dir, existing_tables, now, replace_rows
from scdrugmap.store.catalog import Store
from scdrugmap.store.embeddings import open_array, read_rows, resolve_revision
from scdrugmap.store.errors import InputError
from scdrugmap.store.progress import progress

__all__ = [
    "SeparationOutcome",
    "run_separation",
    "separation_rows",
    "separation_scores",
    "separation_with_metrics",
    "umap_coords",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeparationOutcome:
    """Scores (one row per scope × value) and figure paths."""

    model: str
    revision: str
    scores: pd.DataFrame
    figures: tuple[Path, ...]


def _prepare(X: np.ndarray, n_pcs: int = 50) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(axis=0)
    X = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    if X.shape[1] > n_pcs and X.shape[0] > n_pcs:
        from sklearn.decomposition import PCA

        X = PCA(n_components=n_pcs, random_state=0).fit_transform(X)
    return X


def separation_scores(X: np.ndarray, labels: np.ndarray, *, k: int = 15, seed: int = 0) -> dict[str, float]:
    """Silhouette, shuffled silhouette and kNN purity of ``labels`` in embedding ``X``.

    Parameters
    ----------
    X
        ``(n_cells, dim)`` embedding (finite).
    labels
        ``(n_cells,)`` two or more classes.
    k
        Neighbours for the purity.

    Returns
    -------
    dict
        ``silhouette, silhouette_shuffled, knn_purity, knn_purity_expected``.

    Raises
    ------
    InputError
        Fewer than 2 cells per class.
    """
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors

    labels = np.asarray(labels).astype(str)
    _, counts = np.unique(labels, return_counts=True)
    if counts.size < 2 or counts.min() < 2:
        msg = "separation needs ≥ 2 cells of each of two labels"
        raise InputError(msg)
    Z = _prepare(X)
    rng = np.random.default_rng(seed)
    kk = int(min(k, len(labels) - 1))
    nn = NearestNeighbors(n_neighbors=kk + 1).fit(Z)
    idx = nn.kneighbors(Z, return_distance=False)[:, 1:]
    p = counts / counts.sum()
    return {
        "silhouette": float(silhouette_score(Z, labels)),
        "silhouette_shuffled": float(silhouette_score(Z, rng.permutation(labels))),
        "knn_purity": float((labels[idx] == labels[:, None]).mean()),
        "knn_purity_expected": float((p**2).sum()),
    }


def _subsample(cells: pd.DataFrame, max_cells: int, seed: int) -> pd.DataFrame:
    if len(cells) <= max_cells:
        return cells
    frac = max_cells / len(cells)
    return cells.groupby("label", group_keys=False).sample(frac=frac, random_state=seed)


def umap_coords(X: np.ndarray, *, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-D UMAP (umap-learn) of a standardised, PCA-reduced embedding; ``(n_cells, 2)``."""
    import umap

    Z = _prepare(X)
    reducer = umap.UMAP(n_neighbors=int(min(n_neighbors, len(Z) - 1)), random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(Z))


def run_separation(
    store: Store,
    model: str,
    *,
    revision: str | None = None,
    category: str = "tissue",
    k: int = 15,
    max_cells: int = 5000,
    seed: int = 0,
    umap: bool = True,
    figures_dir: Path | None = None,
) -> SeparationOutcome:
    """Score every labelled dataset and ``category`` value on ``model``'s embedding; store and plot.

    Parameters
    ----------
    store
        The store.
    model, revision
        Embedding (latest revision by default).
    category
        Dataset field whose values are scored on their pooled cells (also ``dataset``).
    k, max_cells, seed
        kNN size, subsample cap per scope, seed.
    umap
        Draw the UMAP figure (at most 20,000 cells).
    figures_dir
        Report folder (default ``<store>/analysis/figures``).

    Returns
    -------
    SeparationOutcome

    Raises
    ------
    InputError
        Unknown category, or no embedded labelled cells.
    """
    from scdrugmap.classify.folds import CATEGORIES

    if category not in CATEGORIES:
        msg = f"unknown category {category!r}; choose one of: {', '.join(CATEGORIES)}"
        raise InputError(msg)
    rev = resolve_revision(store, model, revision)
    cells = store.query(
        f"SELECT c.cell_uid, c.label, c.dataset_id, d.cancer_type, CAST(d.{category} AS VARCHAR) AS cat "
        "FROM cells c JOIN datasets d USING (dataset_id) SEMI JOIN embedded_cells e "
        "ON e.cell_uid = c.cell_uid AND e.revision = ? WHERE c.label IS NOT NULL ORDER BY c.cell_uid",
        [rev],
    )
    if cells.empty:
        msg = f"no labelled cell has a {model} embedding (revision {rev})"
        raise InputError(msg)
    arr = open_array(store, model, rev)
    rows = []
    scopes = (
        [("dataset", "dataset_id"), (category, "cat")]
        if category != "dataset_id"
        else [("dataset", "dataset_id")]
    )
    parts = [(scope, value, part) for scope, col in scopes
             for value, part in cells.dropna(subset=[col]).groupby(col, sort=True)]  # fmt: skip
    bar = progress(f"analyze separation {model}", len(parts) + int(umap), unit="steps")
    with bar:
        for scope, value, part in parts:
            bar.set_stage(f"{scope} {value}")
            sub = _subsample(part, max_cells, seed)
            X = read_rows(arr, sub["cell_uid"].to_numpy())
            ok = np.isfinite(X).all(axis=1)
            try:
                s = separation_scores(X[ok], sub["label"].to_numpy()[ok], k=k, seed=seed)
            except InputError as exc:
                log.warning("%s %s = %s: %s", model, scope, value, exc)
                bar.update()
                continue
            lab = sub["label"].to_numpy()[ok]
            rows.append({"model": model, "revision": rev, "scope": scope, "value": str(value), "n_cells": int(ok.sum()),
                         "n_resistant": int((lab == "resistant").sum()), "n_sensitive": int((lab == "sensitive").sum()),
                         **s, "k": k, "seed": seed, "created_at": now()})  # fmt: skip
            bar.update()
        scores = pd.DataFrame(rows)
        replace_rows(store, [("separation", scores)], key={"revision": rev})
        figures: tuple[Path, ...] = ()
        if umap:
            bar.set_stage("UMAP")
            sub = _subsample(cells, 20_000, seed)
            X = read_rows(arr, sub["cell_uid"].to_numpy())
            ok = np.isfinite(X).all(axis=1)
            sub = sub[ok]
            coords = umap_coords(X[ok], seed=seed)
            pd.DataFrame(
                {"cell_uid": sub["cell_uid"].to_numpy(), "umap1": coords[:, 0], "umap2": coords[:, 1]}
            ).to_parquet(analysis_dir(store, "umap") / f"{model}_{rev}.parquet", index=False)
            fig = embedding_panels(
                coords,
                {"label": sub["label"].to_numpy(), "dataset": sub["dataset_id"].to_numpy(),
                 "cancer type": sub["cancer_type"].fillna("unknown").to_numpy()},
                title=f"{model} embedding (revision {rev}), UMAP",
            )  # fmt: skip
            mean_sil = (
                scores.loc[scores["scope"] == "dataset", "silhouette"].mean() if len(scores) else float("nan")
            )
            caption = (
                f"UMAP of the {model} embedding (revision {rev}, {len(sub)} labelled cells) coloured by label, dataset "
                f"and cancer type; mean per-dataset label silhouette {mean_sil:.3f} (table separation)."
            )
            figures = tuple(save_figure(fig, figures_dir or analysis_dir(store, "figures"), safe_stem("umap", model, rev),
                                        caption))  # fmt: skip
            bar.update()
    return SeparationOutcome(model, rev, scores, figures)


_SCORES = ("silhouette", "silhouette_shuffled", "knn_purity", "knn_purity_expected")
_SEPARATION_COLUMNS = ("model", "revision", "scope", "value", "n_cells", "n_resistant", "n_sensitive", *_SCORES,
                       "k", "created_at")  # fmt: skip
_HEAD_COLUMNS = ("revision", "scope", "value", "head", "mean")


def separation_rows(
    store: Store, *, model: str | None = None, metric: str = "auroc"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stored separation scores and the mean head metric of the pooled runs on the same values.

    The one query behind ``scdrugmap analyze separation`` and ``GET /analysis/separation``. It
    only reads: without a ``separation`` table (a store never analysed) both frames are empty
    (with their columns) and nothing is created.

    Parameters
    ----------
    store
        The store.
    model
        Only this model's rows (default every model).
    metric
        Metric averaged over the folds of each run (a ``metrics.metric`` name, e.g. ``auroc``).

    Returns
    -------
    scores : pandas.DataFrame
        One row per revision × scope × value, ordered by ``model, revision, scope, value``:
        ``model, revision, scope, value, n_cells, n_resistant, n_sensitive, silhouette,
        silhouette_shuffled, knn_purity, knn_purity_expected, k, created_at``.
    heads : pandas.DataFrame
        ``revision, scope, value, head, mean``: mean ``metric`` over the folds of the complete
        pooled evaluation runs (prediction runs excluded) of a revision on a category value
        (``scope`` = the category, ``dataset`` for ``dataset_id``), ordered by head.
    """
    if "separation" not in existing_tables(store):
        return pd.DataFrame(columns=list(_SEPARATION_COLUMNS)), pd.DataFrame(columns=list(_HEAD_COLUMNS))
    cond, params = (" WHERE model = ?", [model]) if model else ("", [])
    scores = store.query(
        f"SELECT {', '.join(_SEPARATION_COLUMNS)} FROM separation{cond} ORDER BY model, revision, scope, value",
        params,
    )
    heads = store.query(
        "SELECT r.revision, CASE WHEN r.category = 'dataset_id' THEN 'dataset' ELSE r.category END AS scope, "
        "r.value, r.head, AVG(m.value) AS mean FROM eval_runs r JOIN metrics m USING (run_id) "
        "WHERE m.metric = ? AND r.protocol = 'pooled' AND r.status = 'complete' AND r.strategy <> 'predict' "
        "GROUP BY ALL ORDER BY r.head, r.revision, scope, r.value",
        [metric],
    )
    return scores, heads


def separation_with_metrics(store: Store, *, model: str | None = None, metric: str = "auroc") -> pd.DataFrame:
    """Separation scores beside the mean head metric of pooled runs on the same category value.

    Reads :func:`separation_rows` (nothing is created; empty without separation scores).

    Returns
    -------
    pandas.DataFrame
        ``model, revision, scope, value, n_cells, silhouette, silhouette_shuffled, knn_purity,
        knn_purity_expected`` and one column ``<metric>_<head>`` per head with the mean ``metric``
        over folds (NaN where the head has no run on that value).
    """
    scores, heads = separation_rows(store, model=model, metric=metric)
    sep = scores[["model", "revision", "scope", "value", "n_cells", *_SCORES]]
    if heads.empty or sep.empty:
        return sep
    wide = heads.pivot_table(index=["revision", "scope", "value"], columns="head", values="mean").add_prefix(
        f"{metric}_"
    )
    return sep.merge(wide.reset_index(), on=["revision", "scope", "value"], how="left")
