"""Validate one h5ad and build everything ingest will write; nothing is written here.

Steps: read (anndata) → check obs names, X (finite; counts/lognorm/scaled) → map labels (metadata
checked first) → harmonise genes (:mod:`store.genes`) → QC (:mod:`store.qc`). The result, a
:class:`Prepared`, is written by :func:`store.ingest.write_prepared` (``cell_uid``s are assigned there).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.store.errors import InputError
from scdrugmap.store.genes import GENE_COLUMNS, ID_COLUMNS, file_identifiers, pick_gene_identifiers
from scdrugmap.store.labels import map_labels
from scdrugmap.store.metadata import check_identifier, clean_meta
from scdrugmap.store.qc import QCResult, check_finite, detect_x_kind, expression_matrix, run_qc

__all__ = [
    "IngestSpec",
    "InputType",
    "Prepared",
    "anndata_sha256",
    "file_sha256",
    "prepare",
    "read_h5ad_checked",
]

log = logging.getLogger(__name__)

InputType = Literal["auto", "counts", "lognorm", "scaled"]


@dataclass(frozen=True)
class IngestSpec:
    """How to read one dataset (hashed into the catalog as provenance).

    Attributes
    ----------
    dataset_id
        Catalog key: letters, digits, ``.``, ``_``, ``-``.
    label_key
        obs column with response labels; None for unlabelled data.
    sensitive, resistant
        Explicit label values; empty = recognised spellings only.
    sample_key
        obs column with sample (replicate / culture / biopsy) ids.
    patient_key
        obs column with patient (donor) ids.
    patient_scope
        Datasets ingested with the same scope share patient ids (e.g. the pre- and post-treatment
        datasets of one study); default: the dataset id, so ids of different datasets never match.
        Stored per cell as ``cells.patient_id = "<scope>/<patient>"``.
    input_type
        ``auto`` (detect), ``counts``, ``lognorm`` or ``scaled``.
    layer
        Use ``adata.layers[layer]`` instead of ``X``.
    gene_key
        var column with gene identifiers (default: var_names, then known columns).
    min_genes, max_pct_mito
        QC thresholds for raw counts (scDrugMap: > 500 genes, < 10 % mitochondrial).
    allow_unmapped
        Ingest a file none of whose genes HGNC can place (else refused: usually the wrong
        identifier column or another species).
    meta
        Sorted ``(field, value)`` pairs of dataset metadata (:data:`META_FIELDS`).
    """

    dataset_id: str
    label_key: str | None = None
    sensitive: tuple[str, ...] = ()
    resistant: tuple[str, ...] = ()
    sample_key: str | None = None
    input_type: InputType = "auto"
    layer: str | None = None
    gene_key: str | None = None
    min_genes: int = 500
    max_pct_mito: float = 10.0
    meta: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    patient_key: str | None = None
    patient_scope: str | None = None
    allow_unmapped: bool = False

    def __post_init__(self) -> None:
        if self.input_type not in ("auto", "counts", "lognorm", "scaled"):
            msg = f"input type {self.input_type!r} unknown; use auto, counts, lognorm or scaled"
            raise InputError(msg)
        if self.min_genes < 0 or not 0 < self.max_pct_mito <= 100:
            msg = f"QC thresholds out of range (min_genes={self.min_genes}, max_pct_mito={self.max_pct_mito}); use min_genes ≥ 0 and 0 < max_pct_mito ≤ 100"
            raise InputError(msg)

    def hash(self) -> str:
        """SHA-256 (16 hex) of the spec."""
        spec = asdict(self)
        for key in ("patient_key", "patient_scope"):  # unset: hashes as before patients existed
            if spec[key] is None:
                del spec[key]
        if not spec["allow_unmapped"]:
            del spec["allow_unmapped"]
        text = json.dumps(spec, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Prepared:
    """A validated dataset, ready to be written."""

    spec: IngestSpec
    path: Path
    content_hash: str
    adata: ad.AnnData
    row: dict[str, Any]
    genes: pd.DataFrame
    skip: bool = False
    qc: QCResult | None = None  # every input cell's QC metrics and keep mask (None without X)


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def anndata_sha256(adata: ad.AnnData) -> str:
    """SHA-256 hex digest of an in-memory AnnData's content (X, layers, obs/var names and obs columns)."""
    h = hashlib.sha256()
    for names in (adata.obs_names, adata.var_names):
        h.update("\x1f".join(map(str, names)).encode())
    mats = [adata.X] if adata.X is not None else []
    mats += [adata.layers[k] for k in sorted(adata.layers.keys())]
    for X in mats:
        if sp.issparse(X):
            X = X.tocsr()
            for part in (X.data, X.indices, X.indptr):
                h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(np.ascontiguousarray(np.asarray(X)).tobytes())
    h.update(adata.obs.to_csv().encode())
    return h.hexdigest()


def read_h5ad_checked(path: str | Path) -> ad.AnnData:
    """Read an h5ad file, turning every failure into one clear :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        msg = f"file not found: {str(path)!r}; give the path of an .h5ad file"
        raise InputError(msg)
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic != b"\x89HDF\r\n\x1a\n":
        msg = f"{str(path)!r} is not an h5ad file (no HDF5 signature); convert it with anndata (adata.write_h5ad)"
        raise InputError(msg)
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # anndata raises many types for malformed files
        msg = f"{str(path)!r} could not be read as AnnData: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        raise InputError(msg) from exc


def prepare(
    path: str | Path | ad.AnnData, spec: IngestSpec, *, require_x: bool = True, filter_cells: bool = True
) -> Prepared:
    """Validate one h5ad and build everything that will be written (nothing is written).

    Parameters
    ----------
    path
        The h5ad file, or an in-memory AnnData (not modified; its content hash stands for the file's).
    spec
        How to read it.
    require_x
        False for ``import-embeddings``, where an obs-only h5ad is valid.
    filter_cells
        False keeps every cell in ``adata`` (``predict`` marks failing cells instead); the QC
        metrics and keep mask of every input cell are in ``Prepared.qc`` either way.

    Returns
    -------
    Prepared
        The QC-filtered AnnData following the embedder contract plus catalog rows.

    Raises
    ------
    InputError
        Missing file, not an h5ad, missing label/sample key, unmapped labels, duplicate obs
        names, NaN/inf in X, negative values declared as counts, zero cells after QC, bad
        metadata.
    """
    check_identifier(spec.dataset_id, what="dataset id")
    in_memory = isinstance(path, ad.AnnData)
    if in_memory:
        adata, path = path, Path(f"<AnnData {spec.dataset_id}>")
    else:
        path = Path(path)
        adata = read_h5ad_checked(path)
    name = path.name
    meta = clean_meta(dict(spec.meta), dataset_id=spec.dataset_id)
    n_input = adata.n_obs
    if n_input == 0:
        msg = f"{name}: the file has no cells"
        raise InputError(msg)
    if adata.obs_names.has_duplicates:
        dups = adata.obs_names[adata.obs_names.duplicated()].unique()[:3].tolist()
        msg = f"{name}: duplicate obs names such as {dups}; make them unique (adata.obs_names_make_unique()) and re-run"
        raise InputError(msg)
    for key, what in ((spec.label_key, "--label-key"), (spec.sample_key, "--sample-key"),
                      (spec.patient_key, "--patient-key")):  # fmt: skip
        if key is not None and key not in adata.obs.columns:
            msg = f"{name}: {what} {key!r} is not an obs column; available: {list(adata.obs.columns)}"
            raise InputError(msg)
    labels = (
        map_labels(
            adata.obs[spec.label_key], key=spec.label_key, sensitive=spec.sensitive, resistant=spec.resistant
        )
        if spec.label_key
        else np.full(n_input, None, dtype=object)
    )
    samples = (
        adata.obs[spec.sample_key].astype("string").to_numpy(dtype=object, na_value=None)
        if spec.sample_key
        else np.full(n_input, None, dtype=object)
    )
    has_x = adata.n_vars > 0
    if not has_x and require_x:
        msg = f"{name}: no expression matrix (0 genes); to store precomputed embeddings use `scdrugmap import-embeddings`"
        raise InputError(msg)
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    obs["dataset_id"] = spec.dataset_id
    obs["sample_id"] = pd.array(samples, dtype="string")
    obs["patient_id"] = pd.array(_patients(adata, spec), dtype="string")
    obs["label"] = pd.array(labels, dtype="string")
    row: dict[str, Any] = {"dataset_id": spec.dataset_id, **meta, "n_cells_input": n_input}
    if has_x:
        if spec.layer and spec.layer not in adata.layers:
            msg = f"{name}: --layer {spec.layer!r} not found; layers: {list(adata.layers.keys())}"
            raise InputError(msg)
        X = expression_matrix(adata, spec.layer, name=name)
        # no copy when X already is float32 CSR: X is only read until the kept rows are taken
        X = (
            sp.csr_matrix(X, dtype=np.float32)
            if not sp.issparse(X)
            else X.tocsr().astype(np.float32, copy=False)
        )
        check_finite(X, name=name)
        x_kind = detect_x_kind(X, declared=spec.input_type, name=name)
        source, genes = pick_gene_identifiers(adata.var, gene_key=spec.gene_key, name=name)
        n_mapped = int((genes["ensembl_id"] != "").sum())
        if n_mapped == 0 and not spec.allow_unmapped:
            shown = ", ".join(repr(str(g)) for g in genes["feature"].head(3))
            msg = (
                f"{name}: none of its {len(genes)} genes ({shown}, …, read from {source}) maps to an HGNC "
                "symbol or Ensembl id; pass --gene-key with the var column holding gene symbols or Ensembl "
                "ids (human), or --allow-unmapped to ingest it anyway"
            )
            raise InputError(msg)
        genes = _keep_file_names(genes, file_identifiers(adata.var, gene_key=spec.gene_key))
        mito = genes["symbol"].str.startswith("MT-").to_numpy()
        qc = run_qc(
            ad.AnnData(X=X),
            x_kind=x_kind,
            mito=mito,
            min_genes=spec.min_genes,
            max_pct_mito=spec.max_pct_mito,
            name=name,
        )
        obs["n_counts"], obs["n_genes"], obs["pct_mito"] = qc.n_counts, qc.n_genes, qc.pct_mito
        var = pd.DataFrame(
            {"feature": genes["feature"].to_numpy(), "symbol": genes["symbol"].to_numpy()},
            index=pd.Index(adata.var_names.astype(str), name=None),
        )
        var["ensembl_id"] = genes["ensembl_id"].to_numpy()
        var["gene_source"] = source
        var["file_symbol"] = genes["file_symbol"].to_numpy()
        var["file_ensembl_id"] = genes["file_ensembl_id"].to_numpy()
        var["file_var_name"] = adata.var_names.astype(str).to_numpy()
        for col in ID_COLUMNS:
            if col in adata.var.columns:  # the file's identifier columns, verbatim
                var[f"orig_{col}"] = adata.var[col].astype(str).to_numpy()
        keep = qc.keep if filter_cells else np.ones(n_input, dtype=bool)
        if not in_memory:  # the file's matrices are private: release the ones not needed any more
            adata.X = None
            for key in list(adata.layers.keys()):
                del adata.layers[key]
        # a caller's AnnData is never shared with the result (embedders may normalise it in place)
        X = X if keep.all() and not in_memory else X[keep]
        out = ad.AnnData(X=X, obs=obs.loc[keep].copy(), var=var)
        out.var_names_make_unique()
        row.update(
            n_genes=int(adata.n_vars),
            n_genes_mapped=n_mapped,
            x_kind=x_kind,
            qc_applied=qc.applied,
            has_expression=True,
        )
        genes = genes.assign(dataset_id=spec.dataset_id, var_index=np.arange(len(genes), dtype=np.int32))
        if row["n_genes_mapped"] < 0.5 * row["n_genes"]:
            log.warning(
                "%s: only %d of %d genes map to HGNC/Ensembl; pass --gene-key with the var column holding symbols",
                name,
                row["n_genes_mapped"],
                row["n_genes"],
            )
    else:
        qc = None
        for col in ("n_counts", "n_genes", "pct_mito"):
            obs[col] = np.nan
        out = ad.AnnData(obs=obs)
        row.update(n_genes=0, n_genes_mapped=0, x_kind=None, qc_applied=False, has_expression=False)
        genes = pd.DataFrame(columns=list(GENE_COLUMNS))
    out.uns["scdrugmap"] = {"x_kind": row["x_kind"] or "none", "dataset_id": spec.dataset_id}
    row["n_cells"] = int(out.n_obs)
    digest = anndata_sha256(adata) if in_memory else file_sha256(path)
    return Prepared(spec, path, digest, out, row, genes, qc=qc)


def _keep_file_names(genes: pd.DataFrame, ids: pd.DataFrame) -> pd.DataFrame:
    """Add the file's own identifiers; a gene HGNC cannot place keeps its own names, not a blank.

    ``symbol``/``ensembl_id`` stay HGNC's where the gene was placed; for an unplaced gene they
    take the file's symbol and its Ensembl id without version (``match`` keeps saying unmapped).
    """
    from scdrugmap.store.gene_reference import strip_version

    out = genes.copy()
    out["file_symbol"] = ids["file_symbol"].to_numpy()
    out["file_ensembl_id"] = ids["file_ensembl_id"].to_numpy()
    unplaced = (out["symbol"] == "") & ~out["match"].eq("duplicate")
    out.loc[unplaced, "symbol"] = out.loc[unplaced, "file_symbol"]
    stripped = out["file_ensembl_id"].map(strip_version)
    taken = set(out.loc[~unplaced, "ensembl_id"]) - {""}
    fill = unplaced & (out["ensembl_id"] == "") & ~stripped.isin(taken)
    out.loc[fill, "ensembl_id"] = stripped[fill]
    return out


def _patients(adata: ad.AnnData, spec: IngestSpec) -> np.ndarray:
    """``<scope>/<patient>`` per cell (None without ``patient_key`` or a missing value)."""
    if spec.patient_key is None:
        if spec.patient_scope is not None:
            msg = f"{spec.dataset_id}: a patient scope needs --patient-key (the obs column with patient ids)"
            raise InputError(msg)
        return np.full(adata.n_obs, None, dtype=object)
    scope = spec.patient_scope or spec.dataset_id
    values = adata.obs[spec.patient_key].astype("string").to_numpy(dtype=object, na_value=None)
    return np.array([None if v is None else f"{scope}/{v}" for v in values], dtype=object)
