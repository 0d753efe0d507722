"""Turn a dataset's downloaded files into one labelled h5ad plus a row of an ingest manifest.

Input formats found in the dataset's cache folder (and inside ``.tar`` archives such as GEO's
``GSExxx_RAW.tar``, extracted with tarfile's ``data`` filter):

* 10x matrix market: ``<prefix>matrix.mtx.gz`` + ``<prefix>barcodes.tsv.gz`` + ``<prefix>features.tsv.gz``
  (or ``genes.tsv.gz``), read with :func:`scanpy.read_10x_mtx` — one sample per prefix;
* 10x HDF5: ``*.h5``, read with :func:`scanpy.read_10x_h5` — one sample per file;
* count tables: ``*.csv``/``*.tsv``/``*.txt`` (optionally ``.gz``), genes in rows and cells in columns,
  read with pandas — one sample per file, or per cell by the row's ``sample_regex`` (group 1 of a regular
  expression on the cell names).

Labels come only from the row's ``sample_labels`` (``key=sensitive|key=resistant|key=exclude``): a key
names a sample exactly, or as a ``_``/``-``/``.``-delimited part of its name (a GSM id, say); ``*`` names
every sample no other key names (``*=exclude`` drops the samples of a series' other datasets). A sample
that no key names, or that two keys name, refuses the dataset; nothing is guessed. The h5ad holds raw counts
(CSR float32), ``obs['sample_id']`` and ``obs['response']``; the ingest manifest (read by ``scdrugmap
ingest --manifest``) carries the catalogue metadata.
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.store.collection import FETCH_LOG, Collection
from scdrugmap.store.errors import InputError
from scdrugmap.store.progress import track

__all__ = ["prepare_datasets", "read_units"]

MANIFEST = "manifest.csv"
LABELS = ("sensitive", "resistant", "exclude")
_MTX = re.compile(r"^(.*?)matrix\.mtx(\.gz)?$")
_TABLE = re.compile(r"^(.*)\.(csv|tsv|txt)(\.gz)?$")
_META = {"collection": "collection", "study": "study", "accession": "accession", "tissue": "tissue",
         "cancer_type": "cancer_type", "drug": "regimen", "drug_class": "drug_class", "regimen": "regimen",
         "source": "source", "technology": "technology", "organism": "organism", "pmid": "pmid",
         "sample_origin": "sample_origin", "exposure_days": "exposure_days"}  # fmt: skip


def _extract(folder: Path) -> list[Path]:
    """Folders to scan: ``folder`` and each of its tar archives, extracted once beside it."""
    out = [folder]
    for tar in sorted(folder.glob("*.tar")) + sorted(folder.glob("*.tar.gz")):
        target = folder / f"{tar.name}.d"
        if not target.is_dir():
            tmp = folder / f".{tar.name}.d.tmp"
            with tarfile.open(tar) as tf:
                tf.extractall(tmp, filter="data")
            os.replace(tmp, target)
        out.extend(p for p in [target, *sorted(target.rglob("*"))] if p.is_dir())
    return out


def read_units(folder: Path, *, sample_regex: str = "") -> dict[str, ad.AnnData]:
    """``{sample name: AnnData of raw counts}`` of every readable unit in ``folder`` (see module doc).

    Raises
    ------
    InputError
        No readable file, an incomplete 10x triplet, an unreadable table, or a bad ``sample_regex``.
    """
    import scanpy as sc

    units: dict[str, ad.AnnData] = {}
    for d in _extract(folder):
        names = sorted(p.name for p in d.iterdir() if p.is_file())
        used: set[str] = set()
        for name in names:
            m = _MTX.match(name)
            if not m:
                continue
            prefix = m.group(1)
            trio = [n for n in names if n.startswith(prefix) and re.match(r"(barcodes|features|genes)\.tsv", n[len(prefix):])]  # fmt: skip
            if not any("barcodes" in n for n in trio) or len(trio) < 2:
                msg = f"{d / name}: the 10x triplet is incomplete (needs {prefix}barcodes.tsv.gz and {prefix}features.tsv.gz)"
                raise InputError(msg)
            units[prefix.rstrip("_-.") or d.name] = _read(sc.read_10x_mtx, d / name, d, prefix=prefix or None)
            used.update([name, *trio])
        for name in names:
            if name in used or name == FETCH_LOG:
                continue
            if name.endswith(".h5"):
                units[name[:-3]] = _read(sc.read_10x_h5, d / name, d / name)
            elif _TABLE.match(name):
                units.update(_read_table(d / name, _TABLE.match(name).group(1), sample_regex))
    if not units:
        msg = f"no readable count files in {folder} (10x mtx/h5 or a genes × cells csv/tsv table)"
        raise InputError(msg)
    return units


def _read(reader, shown: Path, *args, **kw) -> ad.AnnData:
    """``reader(*args, **kw)``; a file scanpy cannot read → one-line InputError naming it."""
    try:
        return reader(*args, **kw)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        msg = f"{shown} is not a readable 10x file ({type(exc).__name__}: {exc})"
        raise InputError(msg) from None


def _read_table(path: Path, stem: str, sample_regex: str) -> dict[str, ad.AnnData]:
    sep = "," if ".csv" in path.name else "\t"
    try:
        df = pd.read_csv(path, sep=sep, index_col=0)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        msg = f"{path.name} is not a readable {sep!r}-separated genes × cells table: {exc}"
        raise InputError(msg) from None
    num = df.select_dtypes(include=[np.number])
    if num.shape[1] == 0 or num.shape[1] < df.shape[1] - 1:
        msg = f"{path.name}: expected genes in rows and numeric cell columns, got non-numeric columns"
        raise InputError(msg)
    adata = ad.AnnData(sp.csr_matrix(num.to_numpy(dtype=np.float32).T))
    adata.obs_names = num.columns.astype(str)
    adata.var_names = num.index.astype(str)
    adata.var_names_make_unique()
    if not sample_regex:
        return {stem: adata}
    try:
        pat = re.compile(sample_regex)
    except re.error as exc:
        msg = f"sample_regex {sample_regex!r} is not a regular expression: {exc}"
        raise InputError(msg) from None
    keys = [(m.group(1) if m and m.groups() else None) for m in map(pat.search, adata.obs_names)]
    if any(k is None for k in keys):
        bad = next(n for n, k in zip(adata.obs_names, keys, strict=True) if k is None)
        msg = f"{path.name}: sample_regex {sample_regex!r} gives no group 1 for cell {bad!r}"
        raise InputError(msg)
    keys_arr = np.asarray(keys, dtype=object)
    return {k: adata[keys_arr == k].copy() for k in dict.fromkeys(keys)}


def _labels(row: dict[str, str], samples: list[str]) -> dict[str, str]:
    """``{sample: sensitive|resistant|exclude}`` from ``sample_labels``; every sample exactly once."""
    text = row["sample_labels"].strip()
    if not text:
        rule = f" Rule from the catalogue: {row['label_rule']}." if row["label_rule"] else ""
        msg = (f"{row['dataset_id']} has no sample labels (status {row['status']}): {row['curation_note']}.{rule} "
               f"Samples found: {', '.join(samples)}. Fill sample_labels (sample=sensitive|sample=resistant|…) in a "
               "copy of the manifest and pass --collection FILE")  # fmt: skip
        raise InputError(msg)
    pairs = []
    for item in text.split("|"):
        key, _, label = item.partition("=")
        if label.strip().lower() not in LABELS or not key.strip():
            msg = f"{row['dataset_id']}: sample_labels item {item!r} is not KEY=sensitive|resistant|exclude"
            raise InputError(msg)
        pairs.append((key.strip(), label.strip().lower()))
    out: dict[str, str] = {}
    rest = {lab for key, lab in pairs if key == "*"}
    for s in samples:
        hits = {
            lab
            for key, lab in pairs
            if key != "*" and (s == key or re.search(rf"(^|[_.\-]){re.escape(key)}($|[_.\-])", s))
        } or rest
        if len(hits) != 1:
            what = "no key names" if not hits else f"keys give {sorted(hits)} for"
            msg = f"{row['dataset_id']}: {what} sample {s!r}; sample_labels keys: {', '.join(k for k, _ in pairs)}"
            raise InputError(msg)
        out[s] = hits.pop()
    return out


def _prepare_one(col: Collection, row: dict[str, str]) -> tuple[ad.AnnData, dict[str, str]]:
    folder = col.folder(row)
    if not folder.is_dir() or not any(p.name != FETCH_LOG for p in folder.iterdir()):
        how = "run `scdrugmap collection fetch` first" if row["access"] == "open" else row["access_note"]
        msg = f"{row['dataset_id']}: no downloaded files in {folder}; {how}"
        raise InputError(msg)
    units = read_units(folder, sample_regex=row["sample_regex"].strip())
    labels = _labels(row, list(units))
    keep = {s: a for s, a in units.items() if labels[s] != "exclude"}
    if {labels[s] for s in keep} != {"sensitive", "resistant"}:
        msg = f"{row['dataset_id']}: after sample_labels the cells are not of both classes ({sorted({labels[s] for s in keep})})"
        raise InputError(msg)
    parts = []
    for s, a in keep.items():
        a = a.copy()
        a.obs_names = [f"{s}:{b}" for b in a.obs_names]
        a.obs = pd.DataFrame({"sample_id": s, "response": labels[s]}, index=a.obs_names)
        a.X = sp.csr_matrix(a.X, dtype=np.float32)
        parts.append(a)
    genes = set.intersection(*(set(a.var_names) for a in parts))
    if not genes:
        msg = f"{row['dataset_id']}: the samples share no gene names"
        raise InputError(msg)
    adata = ad.concat(parts, join="inner", merge="first")
    adata.obs["sample_id"] = adata.obs["sample_id"].astype(str)
    adata.obs["response"] = adata.obs["response"].astype(str)
    meta = {k: row[v] for k, v in _META.items() if row.get(v, "").strip()}
    entry = {"dataset_id": row["dataset_id"], "label_key": "response", "sensitive": "sensitive",
             "resistant": "resistant", "sample_key": "sample_id", **meta}  # fmt: skip
    return adata, entry


def prepare_datasets(col: Collection, dataset_ids: list[str], *, out: str | Path | None = None) -> Path:
    """Write ``<out>/<id>.h5ad`` for each dataset and (update) ``<out>/manifest.csv``; returns its path.

    Every dataset is read and checked before any file is written; rows of other datasets already in the
    manifest are kept. ``out`` defaults to ``<cache>/collection/prepared``.

    Raises
    ------
    InputError
        Unknown id, no files, unreadable files, missing or ambiguous sample labels, one class only.
    """
    out = Path(out) if out is not None else col.prepared()
    ids = list(dict.fromkeys(dataset_ids))
    done = [
        _prepare_one(col, col.row(d)) for d in track(ids, "collection prepare", unit="datasets", stage=str)
    ]
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for adata, entry in track(done, "collection prepare: writing", unit="datasets"):
        path = out / f"{entry['dataset_id']}.h5ad"
        tmp = out / f".{path.name}.tmp-{os.getpid()}"
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
        entries.append({"path": path.name, **entry})
    manifest = out / MANIFEST
    old = pd.read_csv(manifest, dtype=str, keep_default_na=False) if manifest.is_file() else pd.DataFrame()
    new = pd.DataFrame(entries)
    if not old.empty:
        old = old[~old["dataset_id"].isin(new["dataset_id"])]
    table = pd.concat([old, new], ignore_index=True).fillna("")
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    table.to_csv(tmp, index=False)
    os.replace(tmp, manifest)
    return manifest
