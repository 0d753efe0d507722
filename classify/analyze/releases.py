"""Integrated releases: one category value's datasets merged and Harmony-corrected, as an immutable h5ad.

A release (scDrugAtlas's downloadable per-drug datasets) holds every embedded cell of the datasets
whose ``category`` (drug, drug_class, cancer_type, tissue, regimen) equals ``value``:

- ``obs``: ``label`` (sensitive / resistant / missing), ``stars`` (the dataset's label confidence,
  1–3, missing when unknown), ``study``, ``dataset_id``, ``obs_name``, ``sample_id``, ``patient_id``,
  the dataset's category fields and ``cell_uid``; rows ordered by ``cell_uid``;
- ``obsm['X_<model>']``: the model's embedding; ``obsm['X_<model>_harmony']``: the same after Harmony
  (:func:`classify.analyze.harmony.correct_embedding` with one batch per ``batch_key`` value; the
  corrected coordinates are also stored as model ``<model>_harmony_release``);
- ``uns['scdrugmap_release']``: the release id, inputs hash, spec and versions (no timestamp);
- ``X``: empty (no genes) — expression stays in the store's per-dataset files.

The release id is ``<category>-<value>-<inputs hash>``: the hash covers the cells (uids and every
obs column above), the embedding revision, the batch key, the Harmony parameters, the harmonypy
version and :data:`FORMAT_VERSION`. The same inputs give the same id and the same bytes (h5py writes
no object timestamps; tested), and the existing release is returned without writing; other inputs
give a new id. Releases are never overwritten. The catalog table ``releases`` records id, scope,
revision, inputs hash, the file's SHA-256 (``content_hash``), the date of the first build and the
path ``releases/<id>.h5ad``; :func:`export_release` copies the file after checking that hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from scdrugmap.classify.analyze.harmony import HarmonySpec, check_batch_key, correct_embedding
from scdrugmap.classify.analyze.tables import now
from scdrugmap.store.catalog import Store
from scdrugmap.store.embeddings import read_embedding, resolve_revision
from scdrugmap.store.errors import InputError, StoreError
from scdrugmap.store.prepare import file_sha256

__all__ = [
    "FORMAT_VERSION",
    "RELEASE_CATEGORIES",
    "Release",
    "build_release",
    "check_release_file",
    "export_release",
    "list_releases",
    "release_row",
]

#: version of the release file layout; part of every inputs hash
FORMAT_VERSION = 1
#: dataset fields a release can be scoped by
RELEASE_CATEGORIES = ("drug", "drug_class", "cancer_type", "tissue", "regimen")
ReleaseCategory = Literal["drug", "drug_class", "cancer_type", "tissue", "regimen"]
_FIELDS = ("tissue", "cancer_type", "drug", "drug_class", "regimen", "collection")


@dataclass(frozen=True)
class Release:
    """A stored release (``reused``: it existed already and nothing was written)."""

    release_id: str
    path: Path
    category: str
    value: str
    model: str
    revision: str
    corrected_revision: str
    n_cells: int
    n_datasets: int
    inputs_hash: str
    content_hash: str
    created_date: str
    reused: bool = False


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-")[:40] or "x"


def _sha256(path: Path) -> str:
    return file_sha256(path)


def _scope(store: Store, category: str, value: str) -> list[str]:
    """Dataset ids of the scope; InputError naming the bad category or value and the valid ones."""
    if category not in RELEASE_CATEGORIES:
        msg = f"unknown release category {category!r}; use one of {', '.join(RELEASE_CATEGORIES)}"
        raise InputError(msg)
    ds = store.query(f"SELECT dataset_id FROM datasets WHERE {category} = ? ORDER BY 1", [value])
    if ds.empty:
        known = store.query(
            f"SELECT DISTINCT {category} AS v FROM datasets WHERE {category} IS NOT NULL ORDER BY 1"
        )
        values = [str(v) for v in known["v"]]
        near = [v for v in values if v.lower() == value.lower()]
        hint = f"did you mean {near[0]!r}? " if near else ""
        msg = (
            f"no dataset has {category} = {value!r}; {hint}values in the store: {', '.join(values) or 'none'}"
        )
        raise InputError(msg)
    return ds["dataset_id"].tolist()


def _cells(store: Store, datasets: list[str], model: str, revision: str) -> pd.DataFrame:
    """The scope's cells with their obs columns, ordered by cell_uid; every cell must be embedded."""
    fields = ", ".join(f"d.{f}" for f in _FIELDS)
    df = store.query(
        "SELECT c.cell_uid, c.dataset_id, c.obs_name, c.sample_id, c.patient_id, c.label, "
        "CAST(d.label_confidence AS INTEGER) AS stars, COALESCE(d.study, d.dataset_id) AS study, "
        f"{fields}, e.cell_uid IS NOT NULL AS embedded FROM cells c JOIN datasets d USING (dataset_id) "
        "LEFT JOIN embedded_cells e ON e.cell_uid = c.cell_uid AND e.revision = ? "
        "WHERE list_contains(?, c.dataset_id) ORDER BY c.cell_uid",
        [revision, datasets],
    )
    missing = df.loc[~df["embedded"].astype(bool), "dataset_id"].unique().tolist()
    if missing:
        msg = (
            f"{len(df) - int(df['embedded'].sum())} cell(s) of {', '.join(missing)} have no {model} embedding "
            f"(revision {revision}); run `scdrugmap embed --model {model}` first"
        )
        raise InputError(msg)
    return df.drop(columns=["embedded"])


def _obs(cells: pd.DataFrame) -> pd.DataFrame:
    obs = cells.copy()
    obs.index = pd.Index([f"{d}:{o}" for d, o in zip(obs["dataset_id"], obs["obs_name"], strict=True)])
    obs["label"] = pd.Categorical(obs["label"], categories=["sensitive", "resistant"])
    obs["stars"] = pd.array(obs["stars"], dtype="Int8")
    obs["cell_uid"] = obs["cell_uid"].astype(np.int64)
    obs["obs_name"] = obs["obs_name"].astype(str).astype(object)
    for col in ("dataset_id", "sample_id", "patient_id", "study", *_FIELDS):
        obs[col] = pd.Categorical(obs[col].astype(object).where(obs[col].notna(), None))
    return obs[["label", "stars", "study", "dataset_id", "obs_name", "sample_id", "patient_id", *_FIELDS,
                "cell_uid"]]  # fmt: skip


def release_row(store: Store, release_id: str) -> pd.Series:
    """The catalog row of a release (a unique id prefix is accepted).

    Raises
    ------
    StoreError
        No such release, or the prefix matches several.
    """
    df = store.query(
        "SELECT * FROM releases WHERE starts_with(release_id, ?) ORDER BY release_id", [release_id]
    )
    if len(df) != 1:
        known = store.query("SELECT release_id FROM releases ORDER BY created_at")["release_id"].tolist()
        what = "is ambiguous" if len(df) > 1 else "is not stored"
        msg = (
            f"release {release_id!r} {what}; releases: {', '.join(known) or 'none (scdrugmap release build)'}"
        )
        raise StoreError(msg)
    return df.iloc[0]


def _as_release(row: pd.Series, store: Store, *, reused: bool) -> Release:
    spec = json.loads(row["spec"])
    return Release(
        release_id=row["release_id"], path=store.path / row["path"], category=row["scope_category"],
        value=row["scope_value"], model=row["model"], revision=row["revision"],
        corrected_revision=spec["corrected_revision"], n_cells=int(row["n_cells"]),
        n_datasets=int(row["n_datasets"]), inputs_hash=row["inputs_hash"], content_hash=row["content_hash"],
        created_date=str(row["created_date"])[:10], reused=reused,
    )  # fmt: skip


def build_release(
    store: Store,
    category: ReleaseCategory,
    value: str,
    *,
    model: str,
    revision: str | None = None,
    batch_key: str = "study",
    harmony: HarmonySpec | None = None,
) -> Release:
    """Build (or find) the integrated release of one category value.

    Parameters
    ----------
    store
        The store.
    category, value
        Scope: every dataset whose ``category`` field equals ``value`` (case-sensitive).
    model, revision
        Embedding to integrate (latest revision of ``model`` by default); every cell of the scope
        must have it.
    batch_key
        Harmony batches: ``study`` (default), ``dataset_id``, ``sample_id``, ``technology``, …
        (:func:`classify.analyze.correction.batch_sql`); at least 2 values in the scope.
    harmony
        Harmony parameters (:class:`classify.analyze.harmony.HarmonySpec`; its defaults).

    Returns
    -------
    Release
        The stored release; ``reused`` when one with the same inputs hash existed (nothing written).

    Raises
    ------
    InputError
        Unknown category, a value no dataset has (the store's values are listed), cells without
        the embedding, a bad batch key or one batch only, non-finite embedding rows. Nothing is
        written then.
    StoreError
        No embedding of ``model``, or a stored release whose file is missing or changed.

    Notes
    -----
    Harmony (Korsunsky et al. 2019, ``harmonypy``) as scDrugAtlas integrates its per-drug datasets.
    """
    harmony = harmony or HarmonySpec()
    datasets = _scope(store, category, value)
    rev = resolve_revision(store, model, revision)
    obs = _obs(_cells(store, datasets, model, rev))
    check_batch_key(store, batch_key, datasets=datasets)
    uids = obs["cell_uid"].to_numpy(dtype=np.int64)
    X = read_embedding(store, model, rev, uids).astype(np.float32)
    if not np.isfinite(X).all():
        msg = (
            f"{int((~np.isfinite(X).all(axis=1)).sum())} cell(s) have non-finite {model} rows; re-embed them"
        )
        raise InputError(msg)
    spec = {"format": FORMAT_VERSION, "category": category, "value": value, "model": model, "revision": rev,
            "batch_key": batch_key, "harmony": asdict(harmony), "datasets": datasets}  # fmt: skip
    vers = {"harmonypy": version("harmonypy"), "anndata": version("anndata"), "h5py": version("h5py")}
    h = hashlib.sha256(json.dumps({**spec, "harmonypy": vers["harmonypy"]}, sort_keys=True).encode())
    h.update(obs.to_csv(lineterminator="\n").encode())
    inputs_hash = h.hexdigest()
    release_id = f"{_slug(category)}-{_slug(value)}-{inputs_hash[:12]}"
    found = _existing(store, inputs_hash)  # read only: a reused release needs no writer lock
    if found is not None:
        return found
    with store.writing():
        found = _existing(store, inputs_hash)  # another process may have built it meanwhile
        if found is not None:
            return found
        out = correct_embedding(store, model, revision=rev, batch_key=batch_key, name=f"{model}_harmony_release",
                                datasets=datasets, spec=harmony)  # fmt: skip
        Z = read_embedding(store, out.model, out.revision, uids)
        if not np.isfinite(Z).all():  # pragma: no cover - the correction covers exactly these cells
            msg = f"the Harmony correction {out.revision} does not cover every cell of the release"
            raise StoreError(msg)
        spec["corrected_revision"] = out.revision
        adata = _anndata(obs, {f"X_{model}": X, f"X_{model}_harmony": Z.astype(np.float32)},
                         {"release_id": release_id, "inputs_hash": inputs_hash, "spec": spec, "versions": vers})  # fmt: skip
        taken = store.query("SELECT inputs_hash FROM releases WHERE release_id = ?", [release_id])
        if not taken.empty:  # a 48-bit prefix collision: never touch the other release
            msg = f"release id {release_id} is taken by other inputs ({taken['inputs_hash'].iloc[0][:16]}…)"
            raise StoreError(msg)
        rel_path = Path("releases") / f"{release_id}.h5ad"
        final = store.path / rel_path
        final.parent.mkdir(exist_ok=True)
        if final.exists():  # a file without a catalog row: debris of an interrupted build of these inputs
            final.unlink()
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            _write(adata, tmp)
            content_hash = _sha256(tmp)
            os.replace(tmp, final)
            stamp = now()
            with store.transaction() as con:
                con.execute(
                    "INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [release_id, f"{value} ({category}) · {model}", category, value, model, rev, inputs_hash,
                     content_hash, json.dumps(spec), json.dumps(vers), len(obs), len(datasets), rel_path.as_posix(),
                     stamp.date(), stamp],
                )  # fmt: skip
        except BaseException:
            for p in (tmp, final):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            raise
    return _as_release(release_row(store, release_id), store, reused=False)


def _existing(store: Store, inputs_hash: str) -> Release | None:
    row = store.query("SELECT * FROM releases WHERE inputs_hash = ?", [inputs_hash])
    if row.empty:
        return None
    found = _as_release(row.iloc[0], store, reused=True)
    _check_file(found)
    return found


def _anndata(obs: pd.DataFrame, obsm: dict[str, np.ndarray], meta: dict):
    import anndata as ad

    adata = ad.AnnData(X=np.zeros((len(obs), 0), dtype=np.float32), obs=obs)
    for key, arr in obsm.items():
        adata.obsm[key] = arr
    spec = meta["spec"]
    adata.uns["scdrugmap_release"] = {
        "release_id": meta["release_id"], "inputs_hash": meta["inputs_hash"], "format": FORMAT_VERSION,
        "category": spec["category"], "value": spec["value"], "model": spec["model"], "revision": spec["revision"],
        "corrected_revision": spec["corrected_revision"], "batch_key": spec["batch_key"],
        "datasets": list(spec["datasets"]), "harmony": json.dumps(spec["harmony"], sort_keys=True),
        "versions": json.dumps(meta["versions"], sort_keys=True),
    }  # fmt: skip
    return adata


def _write(adata, path: Path) -> None:
    """Write the release h5ad: gzip, no object timestamps (h5py's default), so equal inputs give equal bytes."""
    adata.write_h5ad(path, compression="gzip")


def _check_file(rel: Release) -> None:
    if not rel.path.exists():
        msg = f"release {rel.release_id} is in the catalog but its file {rel.path} is missing; restore it from a copy"
        raise StoreError(msg)
    if _sha256(rel.path) != rel.content_hash:
        msg = f"release file {rel.path} changed on disk (SHA-256 differs from the catalog's); restore it from a copy"
        raise StoreError(msg)


def check_release_file(store: Store, row: pd.Series) -> Path:
    """The file of a release row (:func:`release_row`), after checking its SHA-256 against the catalog.

    Raises
    ------
    StoreError
        The file is missing or its bytes changed.
    """
    rel = _as_release(row, store, reused=True)
    _check_file(rel)
    return rel.path


def list_releases(store: Store) -> pd.DataFrame:
    """The ``releases`` table, oldest first: ``release_id, name, scope_category, scope_value, model,
    revision, n_cells, n_datasets, created_date, content_hash, inputs_hash, path`` (empty when none)."""
    return store.query(
        "SELECT release_id, name, scope_category, scope_value, model, revision, n_cells, n_datasets, "
        "CAST(created_date AS VARCHAR) AS created_date, content_hash, inputs_hash, path "
        "FROM releases ORDER BY created_at, release_id"
    )


def export_release(store: Store, release_id: str, out: str | Path) -> Release:
    """Copy a release's h5ad to ``out`` after checking its SHA-256 against the catalog.

    Raises
    ------
    StoreError
        Unknown release id, or its file missing or changed.
    """
    rel = _as_release(release_row(store, release_id), store, reused=True)
    _check_file(rel)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(rel.path, tmp)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return rel
