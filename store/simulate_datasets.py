"""Which datasets to simulate: the built-in 8-study collection and the catalogue mode.

:func:`default_datasets` lays out the demo collection; :func:`catalogue_datasets` follows a
scDrugMap-layout catalogue CSV (one dataset per row, cell counts estimated from the category-count
table and scaled). Used by :func:`store.simulate.simulate_collection`, which documents the rules.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scdrugmap.store.errors import InputError

__all__ = ["CATALOGUE_COLUMNS", "COUNTS_COLUMNS", "MIN_CELLS", "catalogue_datasets", "default_datasets"]

MIN_CELLS = 50  # per dataset
CATALOGUE_COLUMNS = (
    "Collections", "scDrugMap_collection_series_number", "Original_Dataset", "Source", "Tissue",
    "Cancer_type_level1", "Drug_type", "Regimen", "Organism", "PMID", "RawData_ID", "Extract_protocol",
    "Sample_size", "Sample_size_all",
)  # fmt: skip
COUNTS_COLUMNS = ("Collections", "Maintask", "Subtask", "scDrugMap_collection_series_number", "samples")
CELLS_PER_SAMPLE_FALLBACK = 1000  # catalogue rows that no category-count row covers
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


def default_datasets(n_cells: int, seed: int) -> list[_Dataset]:
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


def catalogue_datasets(catalogue: Path, scale: float) -> list[_Dataset]:
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
