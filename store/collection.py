"""scDrugMap's dataset collection: the shipped manifest, its local status, and fetching its files.

The manifest (``store/data/scdrugmap_collection.csv``, built by :mod:`store.collection_build`; a curated
copy via ``--collection FILE`` or ``$SCDRUGMAP_COLLECTION``) has one row per catalogue dataset. Files go
to ``<cache>/collection/<GEO series>/`` (shared by the datasets of one series), where ``<cache>`` is
``$SCDRUGMAP_CACHE`` or ``<store>/cache``; :mod:`store.collection_prepare` turns them into h5ad files
and an ingest manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd

from scdrugmap.store.collection_build import COLLECTION_COLUMNS, DEFAULT_COLLECTION
from scdrugmap.store.errors import InputError
from scdrugmap.store.fetch import DownloadResult, cache_root, download
from scdrugmap.store.progress import track

__all__ = [
    "FETCH_LOG",
    "Collection",
    "cache_root",
    "collection_status",
    "fetch_datasets",
    "load_collection",
]

FETCH_LOG = "scdrugmap_fetch.json"


@dataclass(frozen=True)
class Collection:
    """The manifest table plus where its files live."""

    table: pd.DataFrame
    source: Path
    cache: Path

    def row(self, dataset_id: str) -> dict[str, str]:
        """The manifest row of ``dataset_id``; an unknown id → InputError naming a few known ones."""
        hit = self.table[self.table["dataset_id"] == dataset_id]
        if hit.empty:
            known = ", ".join(self.table["dataset_id"].head(4))
            msg = f"unknown dataset {dataset_id!r} in {self.source.name}; ids look like {known}, … (see `scdrugmap collection list`)"
            raise InputError(msg)
        return hit.iloc[0].to_dict()

    def folder(self, row: dict[str, str]) -> Path:
        """Download folder of a row: ``<cache>/collection/<geo_series or dataset_id>``."""
        return self.cache / "collection" / (row["geo_series"] or row["dataset_id"])

    def prepared(self) -> Path:
        """Folder of the prepared h5ad files and their ingest manifest."""
        return self.cache / "collection" / "prepared"


def load_collection(path: str | Path | None = None, *, cache: str | Path) -> Collection:
    """Read the collection manifest (default: ``$SCDRUGMAP_COLLECTION`` or the shipped one).

    Raises
    ------
    InputError
        A missing file, missing columns, duplicated ids or an ``access`` value other than open/controlled.
    """
    path = Path(path or os.environ.get("SCDRUGMAP_COLLECTION", "") or DEFAULT_COLLECTION)
    if not path.is_file():
        msg = f"collection manifest not found: {path}"
        raise InputError(msg)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLLECTION_COLUMNS if c not in df.columns]
    if missing:
        msg = f"{path.name} is not a collection manifest: missing column(s) {missing}"
        raise InputError(msg)
    dup = sorted(set(df["dataset_id"][df["dataset_id"].duplicated()]))
    bad = sorted(set(df["access"]) - {"open", "controlled"})
    if dup or bad:
        msg = f"{path.name}: duplicated dataset ids {dup} or access values {bad} other than open/controlled"
        raise InputError(msg)
    return Collection(df, path, Path(cache))


def _split(text: str) -> list[str]:
    return [p.strip() for p in (text or "").split("|")] if (text or "").strip() else []


def file_specs(row: dict[str, str]) -> list[tuple[str, str, int | None, str | None]]:
    """``[(url, file name, size or None, sha256 or None)]`` of a row (``|``-separated columns)."""
    urls, sizes, hashes = _split(row["files"]), _split(row["size"]), _split(row["sha256"])
    out = []
    for i, url in enumerate(urls):
        name = unquote(Path(urlsplit(url).path).name)
        if not name:
            msg = f"{row['dataset_id']}: file URL {url!r} does not end in a file name"
            raise InputError(msg)
        size = sizes[i] if i < len(sizes) else ""
        sha = hashes[i] if i < len(hashes) else ""
        out.append((url, name, int(size) if size else None, sha or None))
    return out


def collection_status(col: Collection) -> pd.DataFrame:
    """One line per dataset: access, label status, files fetched and whether it is prepared."""
    prepared = col.prepared()
    rows = []
    for row in col.table.to_dict("records"):
        specs = file_specs(row)
        folder = col.folder(row)
        have = sum((folder / name).is_file() for _, name, _, _ in specs)
        local = (
            [p for p in folder.iterdir() if p.is_file() and p.name != FETCH_LOG] if folder.is_dir() else []
        )
        if (prepared / f"{row['dataset_id']}.h5ad").is_file():
            state = "prepared"
        elif specs and have == len(specs):
            state = "fetched"
        elif local:
            state = f"files present ({len(local)})" if not specs else f"partial ({have}/{len(specs)})"
        else:
            state = "needs access" if row["access"] == "controlled" else "not fetched"
        labels = "curated" if row["sample_labels"].strip() else row["status"]
        rows.append({"dataset_id": row["dataset_id"], "study": row["study"], "accession": row["accession"],
                     "access": row["access"], "labels": labels, "files": len(specs), "local": state,
                     "tissue": row["tissue"], "drug_class": row["drug_class"]})  # fmt: skip
    return pd.DataFrame(rows)


def _controlled_message(col: Collection, rows: list[dict[str, str]]) -> str:
    parts = [
        f"{r['dataset_id']} ({r['accession']}): {r['access_note']} (folder {col.folder(r)})" for r in rows
    ]
    return "controlled access, nothing downloaded — " + " | ".join(parts)


def fetch_datasets(
    col: Collection,
    dataset_ids: list[str],
    *,
    progress: bool = True,
    retries: int = 2,
    timeout: float = 60.0,
    mirror: str | None = None,
    echo=print,
) -> list[DownloadResult]:
    """Download the files of open-access datasets into their cache folders (resuming, verified).

    Every id is checked first: an unknown id, a controlled-access row (the message says how to apply)
    or a row without files refuses the whole command before anything is downloaded.

    Returns
    -------
    list of DownloadResult
        One per file, in manifest order; a file already present and verified is not fetched again.

    Raises
    ------
    InputError
        See above, and any download failure (:func:`store.fetch.download`).
    """
    rows = [col.row(d) for d in dict.fromkeys(dataset_ids)]
    controlled = [r for r in rows if r["access"] == "controlled"]
    if controlled:
        raise InputError(_controlled_message(col, controlled))
    empty = [r["dataset_id"] for r in rows if not file_specs(r)]
    if empty:
        msg = f"no files are listed for {empty} in {col.source.name}; add their URLs (files column) first"
        raise InputError(msg)
    results = []
    for row in (
        track(rows, "collection fetch", unit="datasets", stage=lambda r: r["dataset_id"])
        if progress
        else rows
    ):
        folder = col.folder(row)
        if not row["files_confirmed"].strip().lower().startswith("y"):
            echo(
                f"{row['dataset_id']}: file names follow GEO's URL pattern and are not confirmed yet ({row['file_note']})"
            )
        logged = _read_log(folder)
        for url, name, size, sha in file_specs(row):
            if (folder / name).is_file() and name in logged and size is None and not sha:
                size, sha = logged[name]["size"], logged[name]["sha256"]  # verify against what was fetched
            r = download(url, folder / name, size=size, sha256=sha, progress=progress, retries=retries,
                         timeout=timeout, mirror=mirror)  # fmt: skip
            _log(folder, r)
            echo(f"{row['dataset_id']}: {name} {r.status} ({r.size:,} bytes, sha256 {r.sha256[:12]}…)")
            results.append(r)
    return results


def _read_log(folder: Path) -> dict:
    path = folder / FETCH_LOG
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _log(folder: Path, r: DownloadResult) -> None:
    """Record a fetched file (url, size, sha256, time) in ``<folder>/scdrugmap_fetch.json``."""
    path = folder / FETCH_LOG
    log = _read_log(folder)
    log[r.path.name] = {"url": r.url, "size": r.size, "sha256": r.sha256,
                        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(log, indent=1, sort_keys=True))
    os.replace(tmp, path)
