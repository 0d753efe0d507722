"""Expression and labels of ingested datasets, ready for the biology views.

The store's copy of a dataset (``Store.dataset_file``) has obs ``cell_uid``, ``label``,
``sample_id`` and var ``symbol``/``ensembl_id``; ``uns['scdrugmap']['x_kind']`` says what X holds.
:func:`load_expression` returns it with gene symbols as var names and an ``analysis`` view of X:

- ``counts``: library-size normalised to 10,000 per cell and ``log1p`` (natural log; scanpy's
  ``normalize_total`` + ``log1p`` through :func:`embedder.baselines.normalise_log`); raw counts
  are kept in ``layers['counts']`` for pseudobulk tests;
- ``lognorm``: X as it is (assumed ``log1p`` of normalised counts);
- ``scaled``: X as it is (z-scores) — never log-transformed or normalised again.

Labels are the truth (``cells.label``) or a run's predictions (``run:RUN_ID``: probability ≥ 0.5
of the run's positive class → that class, else the other one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError, StoreError

__all__ = [
    "LabelSource",
    "XKind",
    "load_expression",
    "load_selection",
    "parse_labels",
    "predicted_labels",
    "select_dataset_ids",
]

XKind = Literal["counts", "lognorm", "scaled"]


@dataclass(frozen=True)
class LabelSource:
    """Where cell labels come from: ``truth`` or the predictions of an evaluation run."""

    kind: Literal["truth", "run"]
    run_id: str | None = None
    threshold: float = 0.5

    def __str__(self) -> str:
        return "truth" if self.kind == "truth" else f"run:{self.run_id}"


def parse_labels(text: str | LabelSource | None) -> LabelSource:
    """Parse ``truth`` / ``run:RUN_ID``.

    Raises
    ------
    InputError
        Any other text.
    """
    if isinstance(text, LabelSource):
        return text
    if text is None or text == "truth":
        return LabelSource("truth")
    if text.startswith("run:") and len(text) > 4:
        return LabelSource("run", text[4:])
    msg = f"--labels {text!r} not understood; use 'truth' or 'run:RUN_ID' (see `scdrugmap results`)"
    raise InputError(msg)


def predicted_labels(store: Store, run_id: str, *, threshold: float = 0.5) -> pd.DataFrame:
    """Per-cell predicted labels of an evaluation run.

    Returns
    -------
    pandas.DataFrame
        ``cell_uid``, ``label`` (sensitive/resistant), ``p_resistant`` (probability of resistant).

    Raises
    ------
    InputError
        When the run does not exist or has no predictions.
    """
    run = store.query("SELECT positive_class FROM eval_runs WHERE run_id = ?", [run_id])
    if run.empty:
        msg = f'no evaluation run {run_id!r}; list runs with `scdrugmap sql "SELECT run_id, model FROM eval_runs"`'
        raise InputError(msg)
    positive = str(run["positive_class"].iloc[0])
    other = "resistant" if positive == "sensitive" else "sensitive"
    pred = store.query("SELECT cell_uid, probability FROM predictions WHERE run_id = ?", [run_id])
    if pred.empty:
        msg = f"run {run_id} has no predictions"
        raise InputError(msg)
    p = pred["probability"].to_numpy(dtype=float)
    pred["label"] = np.where(p >= threshold, positive, other)
    pred["p_resistant"] = p if positive == "resistant" else 1.0 - p
    return pred[["cell_uid", "label", "p_resistant"]]


def select_dataset_ids(
    store: Store, datasets: Sequence[str] | None = None, where: str | None = None
) -> list[str]:
    """Ids of datasets with expression chosen by ids and/or a SQL ``WHERE`` on ``datasets``.

    Raises
    ------
    InputError
        Unknown ids, a bad expression, or an empty selection.
    """
    from scdrugmap.embedder.runner import select_datasets

    return select_datasets(store, list(datasets) if datasets else None, where)["dataset_id"].tolist()


def _symbols(var: pd.DataFrame, names: pd.Index) -> pd.Index:
    sym = var["symbol"].astype(str).to_numpy() if "symbol" in var else names.to_numpy(dtype=str)
    sym = np.where((sym == "") | (sym == "nan") | (sym == "None"), names.to_numpy(dtype=str), sym)
    return pd.Index(sym)


def load_expression(
    store: Store,
    dataset_id: str,
    *,
    labels: str | LabelSource | None = "truth",
    labelled_only: bool = True,
) -> ad.AnnData:
    """The dataset's cells with analysis-ready expression and the chosen labels.

    Parameters
    ----------
    store
        The store.
    dataset_id
        An ingested dataset with an expression matrix.
    labels
        ``truth`` or ``run:RUN_ID`` (see :func:`parse_labels`).
    labelled_only
        Drop cells without a label (for run labels: without a prediction).

    Returns
    -------
    anndata.AnnData
        X float32 CSR (counts: log1p CP10k) or dense (scaled); ``layers['counts']`` for counts;
        var names = HGNC symbols (made unique; the file's feature when unmapped); obs
        ``cell_uid``, ``sample_id``, ``label``, ``dataset_id`` (+ ``p_resistant`` for run labels);
        ``uns['x_kind']``.

    Raises
    ------
    StoreError
        Missing dataset or file.
    InputError
        A dataset without expression, or no labelled cells when ``labelled_only``.
    """
    src = parse_labels(labels)
    row = store.query("SELECT x_kind, has_expression FROM datasets WHERE dataset_id = ?", [dataset_id])
    if row.empty:
        msg = f"dataset {dataset_id!r} is not in the store; see `scdrugmap datasets`"
        raise StoreError(msg)
    if not bool(row["has_expression"].iloc[0]):
        msg = f"dataset {dataset_id!r} has no expression matrix (embeddings only); expression views need X"
        raise InputError(msg)
    path = store.dataset_file(dataset_id)
    if not path.exists():
        msg = f"the store's copy of {dataset_id!r} is missing ({path})"
        raise StoreError(msg)
    adata = ad.read_h5ad(path)
    x_kind: XKind = str(row["x_kind"].iloc[0])  # type: ignore[assignment]
    adata.var_names = _symbols(adata.var, adata.var_names)
    adata.var_names_make_unique()
    obs = pd.DataFrame(index=adata.obs_names)
    obs["cell_uid"] = adata.obs["cell_uid"].to_numpy(dtype=np.int64)
    obs["sample_id"] = adata.obs["sample_id"].astype(object).where(adata.obs["sample_id"].notna(), None)
    obs["dataset_id"] = dataset_id
    if src.kind == "truth":
        obs["label"] = adata.obs["label"].astype(object).where(adata.obs["label"].notna(), None)
    else:
        pred = predicted_labels(store, str(src.run_id), threshold=src.threshold).set_index("cell_uid")
        pred = pred.reindex(obs["cell_uid"].to_numpy())
        obs["label"] = pred["label"].to_numpy(dtype=object)
        obs["p_resistant"] = pred["p_resistant"].to_numpy(dtype=float)
    adata.obs = obs
    if labelled_only:
        keep = obs["label"].isin(["sensitive", "resistant"]).to_numpy()
        if not keep.any():
            msg = f"dataset {dataset_id!r} has no cells labelled by {src} (sensitive/resistant)"
            raise InputError(msg)
        adata = adata[keep].copy()
    return _analysis_view(adata, x_kind)


def _analysis_view(adata: ad.AnnData, x_kind: str) -> ad.AnnData:
    X = adata.X
    if x_kind == "counts":
        from scdrugmap.embedder.baselines import normalise_log  # scanpy normalize_total(1e4) + log1p

        counts = sp.csr_matrix(X, dtype=np.float32)
        adata.layers["counts"] = counts
        adata.X = normalise_log(counts, "counts")
    elif x_kind == "scaled":
        adata.X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)
    else:
        adata.X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, np.float32)
    adata.uns["x_kind"] = x_kind
    return adata


def load_selection(
    store: Store,
    dataset_ids: Sequence[str],
    *,
    labels: str | LabelSource | None = "truth",
) -> ad.AnnData:
    """Several datasets' labelled cells on their shared genes (each normalised on its own).

    Returns
    -------
    anndata.AnnData
        Concatenation of :func:`load_expression` outputs on the intersection of gene symbols;
        ``uns['x_kind']`` is the common kind, or ``mixed``.

    Raises
    ------
    InputError
        When the datasets share no gene.
    """
    parts = [load_expression(store, d, labels=labels) for d in dataset_ids]
    if len(parts) == 1:
        return parts[0]
    kinds = {p.uns["x_kind"] for p in parts}
    genes = parts[0].var_names
    for p in parts[1:]:
        genes = genes.intersection(p.var_names, sort=False)
    if genes.empty:
        msg = f"datasets {list(dataset_ids)} share no gene symbol"
        raise InputError(msg)
    dense = any(not sp.issparse(p.X) for p in parts)
    for p in parts:
        p.X = np.asarray(p.X.toarray() if sp.issparse(p.X) else p.X) if dense else p.X
        if "counts" in p.layers and len(kinds) > 1:
            del p.layers["counts"]
    out = ad.concat([p[:, genes] for p in parts], join="inner", merge="same")
    out.uns["x_kind"] = kinds.pop() if len(kinds) == 1 else "mixed"
    return out
