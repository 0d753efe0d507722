"""Catalog tables and files written by the biology views (``scdrugmap analyze``).

Every table here is new (created with ``CREATE TABLE IF NOT EXISTS`` on first write); existing
catalog tables are only read. A result is keyed by a hash of everything that determines it, so a
repeated analysis replaces its own rows and nothing else. Per-cell outputs (pseudotime, UMAP
coordinates) go to Parquet under ``<store>/analysis/``; figures to ``<store>/analysis/figures/``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd

from scdrugmap.embedder.base import spec_hash
from scdrugmap.store.catalog import Store

__all__ = [
    "ANALYSIS_SCHEMA",
    "analysis_dir",
    "ensure_tables",
    "existing_tables",
    "make_id",
    "now",
    "replace_frame",
    "replace_rows",
    "versions",
]

ANALYSIS_SCHEMA = """
CREATE TABLE IF NOT EXISTS de_runs (
    de_id VARCHAR PRIMARY KEY, dataset_ids JSON, labels VARCHAR, method VARCHAR, effect_unit VARCHAR,
    alpha DOUBLE, min_log2fc DOUBLE, n_cells INTEGER, n_resistant INTEGER, n_sensitive INTEGER,
    n_samples_resistant INTEGER, n_samples_sensitive INTEGER, n_genes INTEGER, n_significant INTEGER,
    spec JSON, versions JSON, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS de_results (
    de_id VARCHAR, gene VARCHAR, log2fc DOUBLE, p DOUBLE, padj DOUBLE,
    mean_resistant DOUBLE, mean_sensitive DOUBLE, frac_resistant DOUBLE, frac_sensitive DOUBLE,
    significant BOOLEAN, PRIMARY KEY (de_id, gene)
);
CREATE TABLE IF NOT EXISTS de_overlap (
    de_id VARCHAR PRIMARY KEY, truth_de_id VARCHAR, n_significant INTEGER, n_significant_truth INTEGER,
    n_shared INTEGER, jaccard DOUBLE, spearman_log2fc DOUBLE, n_genes INTEGER,
    missed_genes JSON, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS enrich_runs (
    enrich_id VARCHAR PRIMARY KEY, de_source VARCHAR, genesets VARCHAR, n_sets INTEGER,
    n_universe INTEGER, n_up INTEGER, n_down INTEGER, spec JSON, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS enrich_results (
    enrich_id VARCHAR, direction VARCHAR, term VARCHAR, description VARCHAR, set_size INTEGER,
    n_query INTEGER, n_hits INTEGER, expected DOUBLE, fold_enrichment DOUBLE, p DOUBLE, padj DOUBLE,
    rank INTEGER, genes VARCHAR, PRIMARY KEY (enrich_id, direction, term)
);
CREATE TABLE IF NOT EXISTS biomarker_runs (
    bm_id VARCHAR PRIMARY KEY, dataset_ids JSON, labels VARCHAR, n_cells INTEGER, n_genes INTEGER,
    cv_auroc DOUBLE, cv_folds INTEGER, params JSON, spec JSON, versions JSON, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS biomarkers (
    bm_id VARCHAR, rank INTEGER, gene VARCHAR, mean_abs_shap DOUBLE, gain DOUBLE, gain_fraction DOUBLE,
    direction VARCHAR, mean_resistant DOUBLE, mean_sensitive DOUBLE, PRIMARY KEY (bm_id, gene)
);
CREATE TABLE IF NOT EXISTS separation (
    model VARCHAR, revision VARCHAR, scope VARCHAR, value VARCHAR, n_cells INTEGER,
    n_resistant INTEGER, n_sensitive INTEGER, silhouette DOUBLE, silhouette_shuffled DOUBLE,
    knn_purity DOUBLE, knn_purity_expected DOUBLE, k INTEGER, seed INTEGER, created_at TIMESTAMP,
    PRIMARY KEY (revision, scope, value)
);
CREATE TABLE IF NOT EXISTS pseudotime_runs (
    pt_id VARCHAR PRIMARY KEY, dataset_id VARCHAR, run_id VARCHAR, root_obs_name VARCHAR, root_rule VARCHAR,
    n_cells INTEGER, spearman_label DOUBLE, auroc_label DOUBLE, spearman_probability DOUBLE,
    cells_path VARCHAR, spec JSON, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS gene_views (
    gene VARCHAR, dataset_id VARCHAR, n_resistant INTEGER, n_sensitive INTEGER, n_unlabelled INTEGER,
    mean_resistant DOUBLE, mean_sensitive DOUBLE, mean_all DOUBLE, frac_resistant DOUBLE,
    frac_sensitive DOUBLE, frac_all DOUBLE, log2fc DOUBLE, p DOUBLE, value_kind VARCHAR,
    created_at TIMESTAMP, PRIMARY KEY (gene, dataset_id)
);
CREATE TABLE IF NOT EXISTS corrections (
    revision VARCHAR PRIMARY KEY, model VARCHAR, source_model VARCHAR, source_revision VARCHAR,
    method VARCHAR, batch_key VARCHAR, n_cells INTEGER, n_batches INTEGER, params JSON, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS correction_metrics (
    run_uncorrected VARCHAR, run_corrected VARCHAR, revision VARCHAR, source_revision VARCHAR,
    category VARCHAR, value VARCHAR, protocol VARCHAR, head VARCHAR, fold VARCHAR, metric VARCHAR,
    uncorrected DOUBLE, corrected DOUBLE, difference DOUBLE, created_at TIMESTAMP,
    PRIMARY KEY (run_uncorrected, run_corrected, fold, metric)
);
CREATE TABLE IF NOT EXISTS label_confidence (
    dataset_id VARCHAR PRIMARY KEY, stars TINYINT CHECK (stars BETWEEN 1 AND 3), source VARCHAR,
    evidence JSON, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS confidence_metrics (
    run_id VARCHAR, stars INTEGER, metric VARCHAR, value DOUBLE, reason VARCHAR, n_cells INTEGER,
    n_datasets INTEGER, PRIMARY KEY (run_id, stars, metric)
);
"""


def existing_tables(store: Store) -> set[str]:
    """Names of the catalog's tables, read only (the analysis tables may not exist yet)."""
    df = store.query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'")
    return set(df["table_name"])


def ensure_tables(store: Store) -> None:
    """Create the analysis tables when missing (idempotent)."""
    with store.transaction() as con:
        con.execute(ANALYSIS_SCHEMA)


def make_id(prefix: str, spec: dict[str, Any]) -> str:
    """``<prefix>-`` + 16 hex characters of the spec's SHA-256 (canonical JSON)."""
    return f"{prefix}-{spec_hash(spec)}"


def now() -> datetime:
    """Naive UTC timestamp (as the other catalog tables store)."""
    return datetime.now(UTC).replace(tzinfo=None)


def versions(*packages: str) -> str:
    """JSON ``{package: version}`` of the packages that shaped a result."""
    out = {}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return json.dumps(out)


def analysis_dir(store: Store, *parts: str) -> Path:
    """``<store>/analysis/<parts…>``, created."""
    path = store.path.joinpath("analysis", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def replace_frame(con: Any, table: str, frame: pd.DataFrame, key: dict[str, Any]) -> None:
    """Inside an open transaction: delete the rows of ``table`` matching ``key``, insert ``frame``.

    Parameters
    ----------
    con
        A DuckDB connection (e.g. of :meth:`store.Store.transaction`).
    table
        Catalog table; ``frame``'s columns must be a subset of its columns (inserted by name).
    frame
        The new rows (nothing is inserted when empty).
    key
        ``{column: value}`` identifying the rows to replace.
    """
    cond = " AND ".join(f"{c} = ?" for c in key)
    con.execute(f"DELETE FROM {table} WHERE {cond}", list(key.values()))
    if frame.empty:
        return
    name = f"_frame_{table}"
    con.register(name, frame)
    cols = ", ".join(frame.columns)
    con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {name}")
    con.unregister(name)


def replace_rows(
    store: Store,
    rows: Sequence[tuple[str, pd.DataFrame]],
    *,
    key: dict[str, Any],
) -> None:
    """Replace the rows of several tables that match ``key`` in one transaction.

    Parameters
    ----------
    store
        The store (tables are created when missing).
    rows
        ``(table, frame)`` pairs; each frame's columns must be a subset of the table's columns.
    key
        ``{column: value}`` identifying the result in every table (rows matching it are deleted
        first), e.g. ``{"de_id": "de-…"}``.
    """
    ensure_tables(store)
    with store.transaction() as con:
        for table, frame in rows:
            replace_frame(con, table, frame, key)
