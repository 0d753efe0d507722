"""Cell-type context: marker-based annotation of a dataset's cells and the resistant / sensitive
make-up of each type (scDrugAtlas Fig. 3g).

Method (offline, no reference model): for each cell type of a marker table, scanpy's
``score_genes`` (Satija et al., Nat Biotechnol 2015, as in Seurat's ``AddModuleScore``: mean
expression of the type's markers minus the mean of expression-matched control genes) gives a score
per cell; a cell takes the best-scoring type, or ``unassigned`` when that score is below
``min_score``. Types with fewer than ``min_genes`` markers in the data are not scored. The bundled
table (:data:`MARKERS_FILE`, ``data/NOTICE``) lists canonical markers of 10 major types found in
tumour samples, compiled from PanglaoDB (Franzén et al., Database 2019) and CellMarker 2.0 (Hu et
al., Nucleic Acids Res 2023). Markers tell lineage, not malignancy: epithelial (carcinoma) or
melanocytic (melanoma) cells of a tumour sample are usually, not certainly, the malignant ones.

Labels are stored per cell in the catalog table ``cell_types`` (``cell_uid, method, cell_type,
score``); ``method`` names the annotation (default ``markers``), so several can coexist.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError

__all__ = [
    "MARKERS_FILE",
    "UNASSIGNED",
    "Annotation",
    "annotate",
    "annotate_dataset",
    "cell_type_metrics",
    "cell_type_proportions",
    "load_markers",
]

MARKERS_FILE = Path(__file__).parent / "data" / "celltype_markers.csv"
UNASSIGNED = "unassigned"


def load_markers(path: str | Path | None = None) -> dict[str, list[str]]:
    """Marker genes per cell type from a CSV with columns ``cell_type, gene``.

    Parameters
    ----------
    path
        The CSV; default the bundled table :data:`MARKERS_FILE`.

    Returns
    -------
    dict
        ``{cell_type: [HGNC symbols]}`` in file order.

    Raises
    ------
    InputError
        Missing file or columns, or an empty table.
    """
    path = Path(path) if path is not None else MARKERS_FILE
    if not path.is_file():
        msg = (
            f"marker table {path} not found; give a CSV with columns cell_type,gene (or leave --markers out)"
        )
        raise InputError(msg)
    df = pd.read_csv(path, dtype=str)
    if not {"cell_type", "gene"} <= set(df.columns) or df.dropna(subset=["cell_type", "gene"]).empty:
        msg = f"marker table {path} needs columns cell_type,gene and at least one row; it has {list(df.columns)}"
        raise InputError(msg)
    df = df.dropna(subset=["cell_type", "gene"])
    return {t: list(dict.fromkeys(g["gene"].str.strip())) for t, g in df.groupby("cell_type", sort=False)}


@dataclass(frozen=True)
class Annotation:
    """Result of :func:`annotate`.

    Attributes
    ----------
    labels
        Indexed by obs name: ``cell_type`` (a type or ``unassigned``) and ``score`` (the best
        type's score, in the units of X: log-expression, or z-scores for scaled input).
    scores
        ``(n_cells, n_types_scored)`` score per cell and scored type.
    skipped
        ``{type: markers found}`` for types with too few markers in the data.
    """

    labels: pd.DataFrame
    scores: pd.DataFrame
    skipped: dict[str, int]


def annotate(
    adata: ad.AnnData,
    *,
    markers: Mapping[str, Sequence[str]] | None = None,
    min_score: float = 0.1,
    min_genes: int = 2,
    ctrl_size: int = 50,
    seed: int = 0,
) -> Annotation:
    """Annotate cells by marker scores: best type per cell, ``unassigned`` below ``min_score``.

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)``; X log-normalised (or z-scored) expression, var names HGNC symbols.
        Not modified.
    markers
        ``{cell_type: genes}``; default :func:`load_markers` (bundled table).
    min_score
        A cell whose best score is below this is ``unassigned`` (units of X).
    min_genes
        Types with fewer markers present in ``adata`` are skipped.
    ctrl_size, seed
        Control genes per marker gene and their random draw (``scanpy.tl.score_genes``).

    Returns
    -------
    Annotation

    Raises
    ------
    InputError
        No type has ``min_genes`` markers in the data (wrong gene ids or species?).
    """
    import scanpy as sc

    markers = dict(markers) if markers is not None else load_markers()
    genes = set(adata.var_names)
    present = {t: [g for g in gs if g in genes] for t, gs in markers.items()}
    skipped = {t: len(gs) for t, gs in present.items() if len(gs) < min_genes}
    use = {t: gs for t, gs in present.items() if len(gs) >= min_genes}
    if not use:
        msg = (f"no cell type has {min_genes} of its markers among the {adata.n_vars} genes (found: {skipped}); "
               "var names must be HGNC symbols of human genes")  # fmt: skip
        raise InputError(msg)
    work = ad.AnnData(
        X=adata.X, obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=adata.var_names)
    )
    scores = pd.DataFrame(index=adata.obs_names)
    for t, gs in use.items():
        sc.tl.score_genes(work, gs, ctrl_size=ctrl_size, random_state=seed, score_name="_s", use_raw=False)
        scores[t] = work.obs["_s"].to_numpy(dtype=float)
    values = scores.to_numpy()
    best = values.argmax(axis=1)
    top = values[np.arange(len(values)), best]
    types = np.asarray(list(use), dtype=object)[best]
    labels = pd.DataFrame({"cell_type": np.where(top >= min_score, types, UNASSIGNED), "score": top},
                          index=adata.obs_names)  # fmt: skip
    return Annotation(labels=labels, scores=scores, skipped=skipped)


def annotate_dataset(
    store: Store,
    dataset_id: str,
    *,
    method: str = "markers",
    markers_path: str | Path | None = None,
    min_score: float = 0.1,
    min_genes: int = 2,
    seed: int = 0,
    allow_scaled: bool = False,
) -> Annotation:
    """Annotate every cell of a stored dataset and store the labels in ``cell_types``.

    The dataset's earlier labels of the same ``method`` are replaced (one transaction). Options as
    :func:`annotate`; X is the dataset's analysis view (:func:`classify.analyze.data.load_expression`:
    log1p CP10k for counts, as given for log-normalised or z-scored input).

    Z-scored input (``x_kind = scaled``, e.g. SCAD) is refused unless ``allow_scaled``: every gene
    has mean 0 there, so scores are relative to the dataset's own mean and a one-type dataset is
    split into several types.

    Raises
    ------
    InputError, StoreError
        Unknown dataset, no expression, z-scored input, bad marker table, or too few markers present.
    """
    from scdrugmap.classify.analyze.data import load_expression

    if not method or not method.replace("_", "").replace("-", "").isalnum():
        msg = f"--method {method!r}: use a name of letters, digits, '-' or '_' (e.g. markers)"
        raise InputError(msg)
    markers = load_markers(markers_path)
    adata = load_expression(store, dataset_id, labels="truth", labelled_only=False)
    if adata.uns["x_kind"] == "scaled" and not allow_scaled:
        msg = (f"dataset {dataset_id!r} holds z-scored values: marker scores would be relative to its own mean, so "
               "even a one-type dataset splits into several types; annotate counts or log-normalised data "
               "(--allow-scaled to do it anyway)")  # fmt: skip
        raise InputError(msg)
    res = annotate(adata, markers=markers, min_score=min_score, min_genes=min_genes, seed=seed)
    frame = pd.DataFrame({"cell_uid": adata.obs["cell_uid"].to_numpy(dtype=np.int64), "method": method,
                          "cell_type": res.labels["cell_type"].to_numpy(dtype=object),
                          "score": res.labels["score"].to_numpy(dtype=float)})  # fmt: skip
    with store.transaction() as con:
        con.execute(
            "DELETE FROM cell_types WHERE method = ? AND cell_uid IN (SELECT cell_uid FROM cells WHERE dataset_id = ?)",
            [method, dataset_id],
        )
        con.register("_cell_types_new", frame)
        con.execute("INSERT INTO cell_types (cell_uid, method, cell_type, score) "
                    "SELECT cell_uid, method, cell_type, score FROM _cell_types_new")  # fmt: skip
        con.unregister("_cell_types_new")
    return res


def cell_type_proportions(
    store: Store, *, dataset_ids: Sequence[str] | None = None, method: str = "markers"
) -> pd.DataFrame:
    """Resistant and sensitive cells per cell type and dataset (scDrugAtlas Fig. 3g).

    Returns
    -------
    pandas.DataFrame
        One row per dataset × type: ``dataset_id, cell_type, n_cells, n_resistant, n_sensitive,
        n_unlabelled, frac_resistant`` (resistant share of the type's labelled cells),
        ``share_of_resistant`` / ``share_of_sensitive`` (the type's share of the dataset's resistant /
        sensitive cells). Empty when nothing was annotated with ``method``.
    """
    cond, params = "ct.method = ?", [method]
    if dataset_ids:
        cond += " AND list_contains(?, c.dataset_id)"
        params.append(list(dataset_ids))
    df = store.query(
        "SELECT c.dataset_id, ct.cell_type, count(*) AS n_cells, "
        "count(*) FILTER (WHERE c.label = 'resistant') AS n_resistant, "
        "count(*) FILTER (WHERE c.label = 'sensitive') AS n_sensitive, "
        "count(*) FILTER (WHERE c.label IS NULL) AS n_unlabelled "
        f"FROM cell_types ct JOIN cells c USING (cell_uid) WHERE {cond} GROUP BY ALL ORDER BY 1, 2",
        params,
    )
    if df.empty:
        return df
    labelled = (df["n_resistant"] + df["n_sensitive"]).replace(0, np.nan)
    df["frac_resistant"] = df["n_resistant"] / labelled
    for lab in ("resistant", "sensitive"):
        total = df.groupby("dataset_id")[f"n_{lab}"].transform("sum").replace(0, np.nan)
        df[f"share_of_{lab}"] = df[f"n_{lab}"] / total
    return df


def cell_type_metrics(store: Store, run_id: str, *, method: str = "markers") -> pd.DataFrame:
    """An evaluation run's metrics per cell type (its out-of-fold predictions, pooled over folds).

    Stratifies the scores only: the run was trained and scored on all its cells, and each cell
    type's rows are the metrics of that type's test predictions.

    Returns
    -------
    pandas.DataFrame
        ``run_id, cell_type, n_cells, n_positive, metric, value, reason``; cells without a label of
        ``method`` are ``not annotated``.

    Raises
    ------
    InputError
        Unknown run, no predictions, or no cell of the run annotated with ``method``.
    """
    from scdrugmap.classify.metrics import fold_metrics

    run = store.query("SELECT positive_class FROM eval_runs WHERE run_id = ?", [run_id])
    if run.empty:
        msg = f'no evaluation run {run_id!r}; list them with `scdrugmap sql "SELECT run_id FROM eval_runs"`'
        raise InputError(msg)
    pred = store.query(
        "SELECT p.probability, c.label, coalesce(ct.cell_type, 'not annotated') AS cell_type FROM predictions p "
        "JOIN cells c USING (cell_uid) LEFT JOIN cell_types ct ON ct.cell_uid = p.cell_uid AND ct.method = ? "
        "WHERE p.run_id = ? AND c.label IS NOT NULL",
        [method, run_id],
    )
    if pred.empty or (pred["cell_type"] == "not annotated").all():
        msg = (f"no predicted cell of run {run_id} has a {method!r} cell type; run "
               "`scdrugmap analyze celltypes --dataset ID` on its datasets first")  # fmt: skip
        raise InputError(msg)
    positive = str(run["positive_class"].iloc[0])
    rows = []
    for t, part in pred.groupby("cell_type", sort=True):
        y = (part["label"] == positive).to_numpy().astype(int)
        for metric, (value, reason) in fold_metrics(y, part["probability"].to_numpy()).items():
            rows.append({"run_id": run_id, "cell_type": t, "n_cells": len(part), "n_positive": int(y.sum()),
                         "metric": metric, "value": value, "reason": reason})  # fmt: skip
    return pd.DataFrame(rows)


def describe(res: Annotation) -> str:
    """One line: cells per type and the types skipped (JSON-like, for the CLI)."""
    counts = res.labels["cell_type"].value_counts()
    skipped = f"; skipped (too few markers present): {json.dumps(res.skipped)}" if res.skipped else ""
    return ", ".join(f"{t} {n}" for t, n in counts.items()) + skipped
