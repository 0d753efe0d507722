"""Catalog read queries shared by the service and the report (datasets, models, runs, metrics, curves).

Every function takes a :class:`store.Store` and returns plain pandas / dict objects; filters
are equality filters on named columns, validated against the table's columns and passed as
parameters (never spliced into SQL).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError, StoreError

__all__ = [
    "FACET_FIELDS",
    "RUN_FILTERS",
    "dataset_detail",
    "dataset_facets",
    "fold_metrics",
    "list_datasets",
    "list_runs",
    "lora_folds",
    "models_overview",
    "run_curves",
    "summary_metrics",
    "to_records",
]

#: dataset fields offered as filters on the web page
FACET_FIELDS = (
    "tissue",
    "cancer_type",
    "drug",
    "drug_class",
    "regimen",
    "source",
    "label_confidence",
    "technology",
    "collection",
)
#: filters accepted by runs / metrics queries (columns of eval_runs, plus metric)
RUN_FILTERS = ("run_id", "model", "revision", "head", "strategy", "protocol", "category", "value", "status")
#: dataset columns not sent to clients (server paths, hashes, the full ingest spec)
_HIDDEN = ("ingest_spec", "content_hash", "ingest_spec_hash", "source_path")
_SEARCHED = ("dataset_id", "study", "accession", "tissue", "cancer_type", "drug", "drug_class", "regimen")
_RUN_COLUMNS = (
    "run_id, model, revision, strategy, head, head_params, protocol, category, value, fold_set_id, "
    "grouping, k, seed, positive_class, n_cells, n_excluded, status, created_at, duration_s"
)


def _columns(store: Store, table: str) -> list[str]:
    df = store.query("SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table])
    return df["column_name"].tolist()


def _equality(
    filters: Mapping[str, Sequence[str]], allowed: Sequence[str], *, alias: str = ""
) -> tuple[list[str], list[Any]]:
    """``CAST(col AS VARCHAR) IN (?, …)`` conditions for each filter; unknown fields refused."""
    conds: list[str] = []
    params: list[Any] = []
    for field, values in filters.items():
        if field not in allowed:
            msg = f"unknown filter {field!r}; use one of: {', '.join(allowed)}"
            raise InputError(msg)
        values = [v for v in values if v is not None]
        if not values:
            continue
        conds.append(f"CAST({alias}{field} AS VARCHAR) IN ({', '.join('?' for _ in values)})")
        params += [str(v) for v in values]
    return conds, params


def list_datasets(
    store: Store,
    filters: Mapping[str, Sequence[str]],
    *,
    search: str | None = None,
    limit: int = 50,
    offset: int = 0,
    order_by: str = "dataset_id",
    descending: bool = False,
) -> tuple[int, pd.DataFrame]:
    """A page of the ``datasets`` table.

    Parameters
    ----------
    filters
        ``{column: [values]}`` (any column of ``datasets``; several values = any of them).
    search
        Case-insensitive substring searched in ids, study, accession and the category fields.
    limit, offset
        The page.
    order_by, descending
        Sort column (any column) and direction.

    Returns
    -------
    tuple
        ``(total rows matching, page DataFrame)``.

    Raises
    ------
    InputError
        Unknown filter or sort column.
    """
    cols = _columns(store, "datasets")
    conds, params = _equality(filters, cols)
    if search:
        conds.append(f"concat_ws(' ', {', '.join(_SEARCHED)}) ILIKE ?")
        params.append(f"%{search}%")
    if order_by not in cols:
        msg = f"cannot sort by {order_by!r}; use a datasets column"
        raise InputError(msg)
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    total = int(store.query(f"SELECT COUNT(*) AS n FROM datasets {where}", params)["n"].iloc[0])
    shown = [c for c in cols if c not in _HIDDEN]
    page = store.query(
        f"SELECT {', '.join(shown)} FROM datasets {where} "
        f"ORDER BY {order_by} {'DESC' if descending else 'ASC'}, dataset_id LIMIT ? OFFSET ?",
        [*params, int(limit), int(offset)],
    )
    return total, page


def dataset_facets(store: Store) -> dict[str, list[dict[str, Any]]]:
    """Distinct values (with dataset counts) of each field in :data:`FACET_FIELDS`."""
    out: dict[str, list[dict[str, Any]]] = {}
    for field in FACET_FIELDS:
        df = store.query(
            f"SELECT CAST({field} AS VARCHAR) AS value, COUNT(*) AS n FROM datasets "
            f"WHERE {field} IS NOT NULL GROUP BY 1 ORDER BY 1"
        )
        out[field] = df.to_dict(orient="records")
    return out


def dataset_detail(store: Store, dataset_id: str) -> dict[str, Any]:
    """One dataset: metadata, cell and label counts, samples, coverage and embeddings per model.

    Raises
    ------
    StoreError
        Unknown dataset.
    """
    row = store.query("SELECT * FROM datasets WHERE dataset_id = ?", [dataset_id])
    if row.empty:
        msg = f"no dataset {dataset_id!r} in the store"
        raise StoreError(msg)
    counts = store.query(
        "SELECT COUNT(*) AS n_cells, COUNT(*) FILTER (label = 'sensitive') AS n_sensitive, "
        "COUNT(*) FILTER (label = 'resistant') AS n_resistant, COUNT(*) FILTER (label IS NULL) AS n_unlabelled, "
        "COUNT(DISTINCT sample_id) AS n_samples FROM cells WHERE dataset_id = ?",
        [dataset_id],
    ).iloc[0]
    from scdrugmap.store.coverage import coverage_table

    coverage = coverage_table(store, dataset=dataset_id).drop(columns=["dataset_id"])
    embedded = store.query(
        "SELECT e.model, e.revision, e.dim, COUNT(*) AS n_cells_embedded FROM embedded_cells ec "
        "JOIN cells c USING (cell_uid) JOIN embeddings e USING (revision) WHERE c.dataset_id = ? "
        "GROUP BY ALL ORDER BY e.model, e.revision",
        [dataset_id],
    )
    meta = row.drop(columns=list(_HIDDEN)).iloc[0]
    return {
        "dataset": to_records(meta.to_frame().T)[0],
        "counts": {k: int(v) for k, v in counts.items()},
        "coverage": to_records(coverage),
        "embeddings": to_records(embedded),
    }


def models_overview(store: Store) -> dict[str, list[dict[str, Any]]]:
    """Embeddings present and trained heads (evaluation runs) with their mean metrics.

    Returns
    -------
    dict
        ``default_head``: the predictable head with the best mean AUROC (or None);
        ``embeddings``: rows of the ``embeddings`` table (no spec); ``heads``: one row per
        complete evaluation run (not ``predict`` records) with the mean of every metric and
        ``predictable`` with ``not_predictable_reason`` (imported and transductive embeddings
        cannot embed new files: :mod:`scdrugmap.classify.heads_info`), ``default`` and, for
        LoRA runs, ``folds`` (the folds with a saved adapter + head; ``/predict`` takes ``fold``).
    """
    emb = store.query(
        "SELECT revision, model, dim, dtype, rows_selected, rows_done, status, created_at, updated_at "
        "FROM embeddings ORDER BY model, updated_at DESC"
    )
    runs = store.query(
        f"SELECT {_RUN_COLUMNS} FROM eval_runs WHERE status = 'complete' AND strategy <> 'predict' "
        "ORDER BY model, head, protocol, category, value"
    )
    means = summary_metrics(store, {})
    wide = (
        means.pivot_table(index="run_id", columns="metric", values="mean", aggfunc="first")
        if len(means)
        else pd.DataFrame()
    )
    heads = to_records(runs)
    for h in heads:
        h["folds"] = lora_folds(store.path, h["run_id"]) if h["strategy"] == "lora" else None
        h["metrics"] = (
            {k: _num(v) for k, v in wide.loc[h["run_id"]].items()} if h["run_id"] in wide.index else {}
        )
    from scdrugmap.classify.heads_info import annotate_heads

    default = annotate_heads(store, heads)  # predictable / not_predictable_reason / default
    return {"embeddings": to_records(emb), "heads": heads, "default_head": default}


def list_runs(
    store: Store, filters: Mapping[str, Sequence[str]], *, limit: int = 1000, offset: int = 0
) -> tuple[int, pd.DataFrame]:
    """A page of ``eval_runs`` filtered by :data:`RUN_FILTERS` columns; ``(total, page)``."""
    conds, params = _equality(filters, RUN_FILTERS)
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    total = int(store.query(f"SELECT COUNT(*) AS n FROM eval_runs {where}", params)["n"].iloc[0])
    page = store.query(
        f"SELECT {_RUN_COLUMNS} FROM eval_runs {where} "
        "ORDER BY protocol, category, value, model, head, run_id LIMIT ? OFFSET ?",
        [*params, int(limit), int(offset)],
    )
    return total, page


def fold_metrics(store: Store, filters: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Per-fold metric rows joined with their run's fields.

    Parameters
    ----------
    filters
        ``{field: [values]}`` with fields from :data:`RUN_FILTERS` or ``metric``.

    Returns
    -------
    pandas.DataFrame
        ``run_id, model, strategy, head, protocol, category, value, metric, fold, fold_name
        (the held-out study of a cross-data fold), score, reason, n_train, n_test`` (``score``
        NULL when undefined for the fold).
    """
    run_filters = {k: v for k, v in filters.items() if k != "metric"}
    conds, params = _equality(run_filters, RUN_FILTERS, alias="r.")
    if filters.get("metric"):
        more, extra = _equality({"metric": filters["metric"]}, ("metric",), alias="m.")
        conds += more
        params += extra
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    return store.query(
        "SELECT r.run_id, r.model, r.strategy, r.head, r.protocol, r.category, r.value, m.metric, m.fold, "
        "json_extract_string(fs.fold_names, '$[' || CAST(m.fold AS VARCHAR) || ']') AS fold_name, "
        "m.value AS score, m.reason, m.n_train, m.n_test FROM eval_runs r JOIN metrics m USING (run_id) "
        f"LEFT JOIN fold_sets fs ON fs.fold_set_id = r.fold_set_id {where} "
        "ORDER BY r.protocol, r.category, r.value, r.model, r.head, m.metric, m.fold",
        params,
    )


def summary_metrics(store: Store, filters: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Mean ± sd over folds of :func:`fold_metrics` rows, per run × metric.

    Returns
    -------
    pandas.DataFrame
        ``run_id, model, strategy, head, protocol, category, value, metric, mean, sd, n_folds,
        n_undefined`` and, from :func:`classify.summary.summarise`, ``positive_class, prevalence,
        baseline`` (constant classifier), ``n_folds_total, undefined_reason, degenerate``.
    """
    df = fold_metrics(store, filters)
    keys = ["run_id", "model", "strategy", "head", "protocol", "category", "value", "metric"]
    if df.empty:
        return pd.DataFrame(columns=[*keys, "mean", "sd", "n_folds", "n_undefined"])
    g = df.groupby(keys, sort=False, dropna=False)["score"]
    out = g.agg(mean="mean", sd="std", n_folds="count", n_rows="size").reset_index()
    out["n_undefined"] = out.pop("n_rows") - out["n_folds"]
    from scdrugmap.classify.summary import (
        summarise,  # baselines, prevalence, undefined reasons, degenerate flag
    )

    extra = ["positive_class", "prevalence", "baseline", "n_folds_total", "undefined_reason", "degenerate"]
    honest = summarise(store, out["run_id"].unique().tolist())[["run_id", "metric", *extra]]
    return out.merge(honest, on=["run_id", "metric"], how="left")


def run_curves(store: Store, run_id: str, *, max_points: int = 200) -> dict[str, Any]:
    """ROC and precision-recall curves of a run's out-of-fold predictions (pooled over folds).

    Parameters
    ----------
    run_id
        An evaluation run with rows in ``predictions``.
    max_points
        Curves are thinned to about this many points (end points kept).

    Returns
    -------
    dict
        ``run_id, positive_class, n_positive, n_negative, auroc, average_precision,
        roc: {fpr, tpr}, pr: {recall, precision}``.

    Raises
    ------
    StoreError
        Unknown run or no predictions.
    InputError
        Only one class among the labelled predicted cells.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    run = store.query("SELECT positive_class FROM eval_runs WHERE run_id = ?", [run_id])
    if run.empty:
        msg = f"no evaluation run {run_id!r}"
        raise StoreError(msg)
    pos = str(run["positive_class"].iloc[0] or "sensitive")
    df = store.query(
        "SELECT p.probability, c.label FROM predictions p JOIN cells c USING (cell_uid) "
        "WHERE p.run_id = ? AND c.label IS NOT NULL AND p.probability IS NOT NULL",
        [run_id],
    )
    if df.empty:
        msg = f"run {run_id!r} has no predictions of labelled cells"
        raise StoreError(msg)
    y = (df["label"] == pos).to_numpy().astype(int)
    p = df["probability"].to_numpy(dtype=float)
    if y.min() == y.max():
        msg = f"run {run_id!r}: every labelled predicted cell is of one class; ROC/PR curves are undefined"
        raise InputError(msg)
    fpr, tpr, _ = roc_curve(y, p)
    precision, recall, _ = precision_recall_curve(y, p)
    return {
        "run_id": run_id,
        "positive_class": pos,
        "n_positive": int(y.sum()),
        "n_negative": int((1 - y).sum()),
        "auroc": float(roc_auc_score(y, p)),
        "average_precision": float(average_precision_score(y, p)),
        "roc": _thin({"fpr": fpr, "tpr": tpr}, max_points),
        "pr": _thin({"recall": recall[::-1], "precision": precision[::-1]}, max_points),
    }


def _thin(curve: dict[str, np.ndarray], max_points: int) -> dict[str, list[float]]:
    n = len(next(iter(curve.values())))
    idx = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int))
    return {k: [float(x) for x in v[idx]] for k, v in curve.items()}


def _num(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else v


def lora_folds(store_path: Path, run_id: str) -> list[int]:
    """Folds of a LoRA run with a saved adapter + head (``<store>/lora/<run_id>/fold<k>/``), sorted."""
    directory = Path(store_path) / "lora" / run_id
    if not directory.is_dir():
        return []
    return sorted(int(p.name[4:]) for p in directory.glob("fold*") if p.is_dir() and p.name[4:].isdigit())


def _json_value(v: Any) -> Any:
    """One cell as a JSON-ready Python value (floats keep full precision: no decimal rounding)."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    elif isinstance(v, np.generic):
        v = v.item()
    if v is None or v is pd.NaT or v is pd.NA:
        return None
    if isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    return str(v)


def to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-safe records: NaN/inf → None, timestamps → ISO strings, numpy scalars → Python.

    Floats are passed through unrounded (``DataFrame.to_json`` would keep only 10 decimals, turning
    a p-value of 1e-12 into 0).
    """
    cols = [str(c) for c in df.columns]
    return [
        {c: _json_value(v) for c, v in zip(cols, row, strict=True)}
        for row in df.itertuples(index=False, name=None)
    ]
