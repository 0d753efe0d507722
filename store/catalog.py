"""The store directory and its DuckDB catalog.

A store is one directory::

    <store>/catalog.duckdb     the catalog (schema below, documented in README.md)
    <store>/embeddings.zarr/   Zarr v3 group: one (n_cells_total, dim) float32 array per model revision
    <store>/datasets/<id>.h5ad each ingested dataset after QC and gene harmonisation (the embedder's input)
    <store>/fits/<rev>.npz     fitted state of embedders that are fitted on a selection (PCA)

Only this package writes there. Location: ``--store`` / ``SCDRUGMAP_STORE`` / ``./scdrugmap-store``.
A catalog made by an earlier version is upgraded when opened (:meth:`Store.migrate`, :data:`MIGRATIONS`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from scdrugmap.store.connections import CatalogConnections
from scdrugmap.store.errors import StoreError

__all__ = ["DEFAULT_STORE", "SCHEMA", "Store", "default_store_path"]

DEFAULT_STORE = "./scdrugmap-store"
SCHEMA_VERSION = "4"

#: tables added by schema version 4 (in SCHEMA and in the 3 → 4 migration)
V4_TABLES = """
CREATE TABLE IF NOT EXISTS cell_types (
    cell_uid BIGINT, method VARCHAR, cell_type VARCHAR, score DOUBLE, PRIMARY KEY (cell_uid, method)
);
CREATE TABLE IF NOT EXISTS ccc_runs (
    ccc_id VARCHAR PRIMARY KEY, dataset_ids JSON, groupby VARCHAR, method VARCHAR, resource VARCHAR,
    spec JSON, versions JSON, n_cells INTEGER, status VARCHAR, note VARCHAR, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS ccc_results (
    ccc_id VARCHAR, source VARCHAR, target VARCHAR, ligand VARCHAR, receptor VARCHAR,
    magnitude DOUBLE, specificity DOUBLE, PRIMARY KEY (ccc_id, source, target, ligand, receptor)
);
CREATE TABLE IF NOT EXISTS releases (
    release_id VARCHAR PRIMARY KEY, name VARCHAR, scope_category VARCHAR, scope_value VARCHAR,
    model VARCHAR, revision VARCHAR, inputs_hash VARCHAR, content_hash VARCHAR, spec JSON,
    versions JSON, n_cells INTEGER, n_datasets INTEGER, path VARCHAR, created_date DATE,
    created_at TIMESTAMP
);
"""

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id VARCHAR PRIMARY KEY,
    collection VARCHAR, study VARCHAR, accession VARCHAR, tissue VARCHAR, cancer_type VARCHAR,
    drug VARCHAR, drug_class VARCHAR, regimen VARCHAR, source VARCHAR, technology VARCHAR,
    organism VARCHAR, pmid VARCHAR,
    label_confidence TINYINT CHECK (label_confidence BETWEEN 1 AND 3),
    n_cells INTEGER, n_cells_input INTEGER, n_genes INTEGER, n_genes_mapped INTEGER,
    x_kind VARCHAR, qc_applied BOOLEAN, has_expression BOOLEAN,
    content_hash VARCHAR, ingest_spec_hash VARCHAR, ingest_spec JSON, source_path VARCHAR,
    ingested_at TIMESTAMP,
    exposure_days DOUBLE, sample_origin VARCHAR, intrinsic_resistance BOOLEAN, confidence_source VARCHAR
);
CREATE TABLE IF NOT EXISTS cells (
    cell_uid BIGINT PRIMARY KEY,
    dataset_id VARCHAR NOT NULL,
    obs_name VARCHAR NOT NULL,
    sample_id VARCHAR,
    label VARCHAR CHECK (label IN ('sensitive', 'resistant')),
    n_counts DOUBLE, n_genes INTEGER, pct_mito DOUBLE,
    patient_id VARCHAR
);
CREATE TABLE IF NOT EXISTS genes (
    dataset_id VARCHAR, var_index INTEGER, feature VARCHAR, symbol VARCHAR, ensembl_id VARCHAR,
    match VARCHAR, file_symbol VARCHAR, file_ensembl_id VARCHAR,
    PRIMARY KEY (dataset_id, var_index)
);
CREATE TABLE IF NOT EXISTS embeddings (
    revision VARCHAR PRIMARY KEY, model VARCHAR NOT NULL, dim INTEGER, dtype VARCHAR,
    spec JSON, versions JSON, array_path VARCHAR, rows_selected BIGINT, rows_done BIGINT,
    status VARCHAR, created_at TIMESTAMP, updated_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS embedded_cells (
    revision VARCHAR, cell_uid BIGINT, PRIMARY KEY (revision, cell_uid)
);
CREATE TABLE IF NOT EXISTS coverage (
    revision VARCHAR, dataset_id VARCHAR, model VARCHAR, frac_genes DOUBLE, frac_counts DOUBLE,
    gene_matching VARCHAR, n_genes INTEGER,
    genes_exact INTEGER, genes_alias INTEGER, genes_crossmap INTEGER, genes_none INTEGER,
    counts_exact DOUBLE, counts_alias DOUBLE, counts_crossmap DOUBLE, counts_none DOUBLE,
    PRIMARY KEY (revision, dataset_id)
);
CREATE TABLE IF NOT EXISTS fold_sets (
    fold_set_id VARCHAR PRIMARY KEY, protocol VARCHAR, category VARCHAR, value VARCHAR,
    grouping VARCHAR, k INTEGER, seed INTEGER, n_cells INTEGER, n_folds INTEGER, fold_names JSON,
    cells_hash VARCHAR, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS folds (
    fold_set_id VARCHAR, cell_uid BIGINT, fold INTEGER, PRIMARY KEY (fold_set_id, cell_uid)
);
CREATE TABLE IF NOT EXISTS eval_runs (
    run_id VARCHAR PRIMARY KEY, model VARCHAR, revision VARCHAR, strategy VARCHAR, head VARCHAR,
    head_params JSON, protocol VARCHAR, category VARCHAR, value VARCHAR, fold_set_id VARCHAR,
    grouping VARCHAR, k INTEGER, seed INTEGER, positive_class VARCHAR, spec JSON, versions JSON,
    n_cells INTEGER, n_excluded INTEGER, status VARCHAR, created_at TIMESTAMP, duration_s DOUBLE,
    min_confidence INTEGER DEFAULT 0
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id VARCHAR, fold INTEGER, metric VARCHAR, value DOUBLE, reason VARCHAR,
    n_train INTEGER, n_test INTEGER, PRIMARY KEY (run_id, fold, metric)
);
CREATE TABLE IF NOT EXISTS predictions (
    run_id VARCHAR, fold INTEGER, cell_uid BIGINT, probability DOUBLE, PRIMARY KEY (run_id, cell_uid)
);
CREATE TABLE IF NOT EXISTS leakage (
    report_id VARCHAR, model VARCHAR, revision VARCHAR, head VARCHAR, category VARCHAR, value VARCHAR,
    seed INTEGER, grouping VARCHAR, run_id VARCHAR, metric VARCHAR, mean DOUBLE, n_folds INTEGER,
    reference VARCHAR, inflation DOUBLE, created_at TIMESTAMP, PRIMARY KEY (report_id, grouping, metric)
);
"""
    + V4_TABLES
)

#: schema_version → statements bringing a catalog of that version to the next one (idempotent)
MIGRATIONS: dict[str, str] = {
    # 1 → 2: label-confidence evidence and its source on datasets; the confidence filter of a run.
    # Stars of version-1 stores could only be given explicitly, hence the back-fill.
    "1": """
ALTER TABLE datasets ADD COLUMN IF NOT EXISTS exposure_days DOUBLE;
ALTER TABLE datasets ADD COLUMN IF NOT EXISTS sample_origin VARCHAR;
ALTER TABLE datasets ADD COLUMN IF NOT EXISTS intrinsic_resistance BOOLEAN;
ALTER TABLE datasets ADD COLUMN IF NOT EXISTS confidence_source VARCHAR;
UPDATE datasets SET confidence_source = 'explicit'
    WHERE label_confidence IS NOT NULL AND confidence_source IS NULL;
ALTER TABLE eval_runs ADD COLUMN IF NOT EXISTS min_confidence INTEGER DEFAULT 0;
UPDATE eval_runs SET min_confidence = 0 WHERE min_confidence IS NULL;
""",
    # 2 → 3: the file's own gene identifiers beside the harmonised ones; how each gene of a dataset
    # matched a model's vocabulary (exact / previous symbol or alias / Ensembl cross-map / none);
    # each cell's patient (donor) id; leakage reports (the same cells under each split grouping).
    "2": """
ALTER TABLE genes ADD COLUMN IF NOT EXISTS file_symbol VARCHAR;
ALTER TABLE genes ADD COLUMN IF NOT EXISTS file_ensembl_id VARCHAR;
ALTER TABLE coverage ADD COLUMN IF NOT EXISTS gene_matching VARCHAR;
ALTER TABLE coverage ADD COLUMN IF NOT EXISTS n_genes INTEGER;
ALTER TABLE coverage ADD COLUMN IF NOT EXISTS genes_exact INTEGER;
ALTER TABLE coverage ADD COLUMN IF NOT EXISTS genes_alias INTEGER;
ALTER TABLE coverage ADD COLUMN IF NOT EXISTS genes_crossmap INTEGER;
ALTER TABLE coverage ADD COLUMN IF NOT EXISTS genes_none INTEGER;
ALTER TABLE coverage ADD COLUMN IF NOT EXISTS counts_exact DOUBLE;
ALTER TABLE coverage ADD COLUMN IF NOT EXISTS counts_alias DOUBLE;
ALTER TABLE coverage ADD COLUMN IF NOT EXISTS counts_crossmap DOUBLE;
ALTER TABLE coverage ADD COLUMN IF NOT EXISTS counts_none DOUBLE;
ALTER TABLE cells ADD COLUMN IF NOT EXISTS patient_id VARCHAR;
CREATE TABLE IF NOT EXISTS leakage (
    report_id VARCHAR, model VARCHAR, revision VARCHAR, head VARCHAR, category VARCHAR, value VARCHAR,
    seed INTEGER, grouping VARCHAR, run_id VARCHAR, metric VARCHAR, mean DOUBLE, n_folds INTEGER,
    reference VARCHAR, inflation DOUBLE, created_at TIMESTAMP, PRIMARY KEY (report_id, grouping, metric)
);
""",
    # 3 → 4 (scDrugAtlas views II): per-cell cell-type labels by annotation method; cell–cell
    # communication runs and their ligand–receptor results; immutable integrated releases.
    "3": V4_TABLES,
}

TABLES = (
    "datasets",
    "cells",
    "genes",
    "embeddings",
    "embedded_cells",
    "coverage",
    "fold_sets",
    "folds",
    "eval_runs",
    "metrics",
    "predictions",
    "releases",
    "cell_types",
    "ccc_runs",
    "ccc_results",
)


def default_store_path() -> Path:
    """``$SCDRUGMAP_STORE`` when set, else ``./scdrugmap-store``."""
    return Path(os.environ.get("SCDRUGMAP_STORE", DEFAULT_STORE))


class Store(CatalogConnections):
    """A store directory: DuckDB catalog + Zarr embeddings + ingested datasets.

    Parameters
    ----------
    path
        The store directory.

    Notes
    -----
    Connections are opened per operation and closed afterwards so that other processes
    (``scdrugmap sql``) can read between writes; inside :meth:`session` one connection is kept
    for the block (:mod:`store.connections`).
    """

    #: seconds to wait for a store busy in another process (None: the process policy, :mod:`store.locking`)
    busy_timeout_s: float | None = None

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ---- layout -------------------------------------------------------------------------
    @property
    def catalog_path(self) -> Path:
        """``<store>/catalog.duckdb``."""
        return self.path / "catalog.duckdb"

    @property
    def zarr_path(self) -> Path:
        """``<store>/embeddings.zarr``."""
        return self.path / "embeddings.zarr"

    @property
    def datasets_dir(self) -> Path:
        """``<store>/datasets``."""
        return self.path / "datasets"

    @property
    def fits_dir(self) -> Path:
        """``<store>/fits``."""
        return self.path / "fits"

    def dataset_file(self, dataset_id: str) -> Path:
        """Path of the ingested (QC-filtered, harmonised) copy of a dataset."""
        return self.datasets_dir / f"{dataset_id}.h5ad"

    @classmethod
    def open(cls, path: str | Path | None = None, *, create: bool = False) -> Store:
        """Open (and with ``create=True`` initialise) a store.

        Parameters
        ----------
        path
            Store directory; default :func:`default_store_path`.
        create
            Create the directory and catalog schema when missing.

        Raises
        ------
        StoreError
            When the store does not exist and ``create`` is False, or the path is a file.
        """
        st = cls(path if path is not None else default_store_path())
        if st.path.exists() and not st.path.is_dir():
            msg = f"store path {str(st.path)!r} is a file; give a directory with --store"
            raise StoreError(msg)
        if not st.catalog_path.exists():
            if not create:
                msg = (
                    f"no store at {str(st.path)!r} (no catalog.duckdb); ingest data first "
                    "(`scdrugmap ingest`) or point --store / SCDRUGMAP_STORE at an existing store"
                )
                raise StoreError(msg)
            st.path.mkdir(parents=True, exist_ok=True)
            st.datasets_dir.mkdir(exist_ok=True)
            with st.writing(), st.connect() as con:
                con.execute(SCHEMA)
                con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])
        else:
            st.migrate()
        return st

    def migrate(self) -> str | None:
        """Bring an existing catalog made by an earlier version up to :data:`SCHEMA_VERSION`.

        Runs the :data:`MIGRATIONS` from the catalog's ``meta.schema_version`` on, in one
        transaction (idempotent: a current catalog is only read).

        Returns
        -------
        str or None
            The version migrated from, or None when the catalog was current.

        Raises
        ------
        StoreError
            When the catalog is newer than this package (upgrade scdrugmap) or has no known version.
        """
        with self.connect(read_only=True) as con:  # a current catalog on a read-only disk still opens
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None and row[0] == SCHEMA_VERSION:
            return None
        with self.writing(), self.connect() as con:
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            start = row[0] if row else "1"
            if start == SCHEMA_VERSION:
                return None
            if start not in MIGRATIONS:
                msg = (
                    f"catalog {str(self.catalog_path)!r} has schema version {start}, this scdrugmap knows "
                    f"up to {SCHEMA_VERSION}; upgrade scdrugmap to open it"
                )
                raise StoreError(msg)
            con.execute("BEGIN TRANSACTION")
            try:
                version = start
                while version != SCHEMA_VERSION:
                    con.execute(MIGRATIONS[version])
                    version = str(int(version) + 1)
                con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        return start

    def query(self, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
        """Run one of the package's own queries and return a DataFrame.

        Uses the same connection configuration as writers (DuckDB refuses two configurations of
        one file in a process); user SQL goes through :meth:`sql`, which is locked down.
        """
        if not self.catalog_path.exists():
            msg = f"no catalog at {str(self.catalog_path)!r}; ingest data first"
            raise StoreError(msg)
        from scdrugmap.store.connections import state_for

        st = state_for(self.catalog_path)
        # inside a session: the kept connection (read-only unless this thread is writing)
        with self.connect(read_only=st.depth > 0 and st.writing == 0) as con:
            return con.execute(sql, params or []).df()

    def sql(self, sql: str, *, limit: int | None = 10_000, time_limit_s: float | None = None) -> pd.DataFrame:
        """Run a user's SQL on a read-only connection (the ``scdrugmap sql`` surface).

        One ``SELECT``-type statement only (:func:`store.filters.run_user_sql`); interrupted after
        ``time_limit_s`` seconds when given.

        Raises
        ------
        InputError
            When the statement is refused, fails (DuckDB's message, one line) or runs too long.
        """
        from scdrugmap.store.filters import run_user_sql

        return run_user_sql(self, sql, limit=limit, time_limit_s=time_limit_s)

    # ---- common lookups -----------------------------------------------------------------
    def datasets(self, where: str | None = None) -> pd.DataFrame:
        """The ``datasets`` table, optionally filtered by a user's SQL expression.

        The expression is checked and evaluated read-only (:func:`store.filters.matching_keys`);
        only the matching ids reach this query, as a bound parameter.
        """
        if not where:
            return self.query("SELECT * FROM datasets ORDER BY dataset_id")
        from scdrugmap.store.filters import matching_keys

        ids = matching_keys(self, where)
        return self.query(
            "SELECT * FROM datasets WHERE list_contains(?, dataset_id) ORDER BY dataset_id", [ids]
        )

    def next_cell_uid(self, con: duckdb.DuckDBPyConnection) -> int:
        """First unused ``cell_uid`` (cells are numbered 0, 1, 2, … across datasets)."""
        row = con.execute("SELECT COALESCE(MAX(cell_uid) + 1, 0) FROM cells").fetchone()
        return int(row[0])

    def n_cells_total(self) -> int:
        """Number of rows every embedding array must have (max cell_uid + 1)."""
        with self.connect() as con:
            return self.next_cell_uid(con)

    def snapshot(self) -> dict[str, int]:
        """Row counts per table (used by tests to show nothing was half-written)."""
        with self.connect() as con:
            return {t: int(con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in TABLES}
