"""Ingest many datasets from a manifest CSV, all or nothing.

One row per dataset; columns :data:`MANIFEST_COLUMNS`: ``path`` (relative to the manifest's
folder, or absolute) and ``dataset_id`` are required; ``label_key``, ``sensitive`` /
``resistant`` (several values separated by ``|``), ``sample_key``, ``patient_key`` (obs column of
patient / donor ids), ``patient_scope`` (rows with the same scope share patient ids, e.g. a study's
pre- and post-treatment datasets; default: each dataset its own), ``input_type``, ``layer``,
``gene_key``, ``min_genes``, ``max_pct_mito`` and the dataset metadata fields are optional
(label-confidence evidence included: ``exposure_days``, ``sample_origin``, ``intrinsic_resistance``;
stars are derived from it when ``label_confidence`` is empty). Every dataset is validated before
anything reaches the catalog or the store's visible files: datasets are read and staged to temporary
files one at a time (memory holds one dataset's expression), then committed together
(:class:`store.ingest.IngestBatch`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError
from scdrugmap.store.ingest import META_FIELDS, IngestBatch, IngestReport, IngestSpec, prepare
from scdrugmap.store.progress import progress

__all__ = ["MANIFEST_COLUMNS", "ingest_manifest"]

MANIFEST_COLUMNS = (
    "path",
    "dataset_id",
    "label_key",
    "sensitive",
    "resistant",
    "sample_key",
    "patient_key",
    "patient_scope",
    "input_type",
    "layer",
    "gene_key",
    "min_genes",
    "max_pct_mito",
    "allow_unmapped",
    *META_FIELDS,
)


def ingest_manifest(store: Store, manifest: str | Path) -> list[IngestReport]:
    """Ingest every dataset of a manifest CSV, all or nothing.

    The CSV has one row per dataset and the columns :data:`MANIFEST_COLUMNS` (``path`` and
    ``dataset_id`` required; ``path`` relative to the manifest's folder; several label values
    separated by ``|``).

    Raises
    ------
    InputError
        Missing/unknown columns, or any bad dataset (nothing is written then).
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        msg = f"manifest not found: {str(manifest)!r}"
        raise InputError(msg)
    try:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        msg = f"{manifest.name} is empty; a manifest needs a header line with at least path,dataset_id"
        raise InputError(msg) from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        msg = f"{manifest.name} is not a readable CSV: {exc}"
        raise InputError(msg) from exc
    unknown = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    missing = [c for c in ("path", "dataset_id") if c not in df.columns]
    if unknown or missing:
        msg = f"{manifest.name}: unknown columns {unknown}, missing {missing}; allowed columns: {', '.join(MANIFEST_COLUMNS)}"
        raise InputError(msg)
    bar = progress("ingest", len(df) + 1, unit="steps")
    with bar, IngestBatch(store) as batch:  # one dataset's expression in memory at a time
        recs = df.to_dict("records")
        stages = [f"reading {(r.get('dataset_id') or '').strip()}" for r in recs]
        stages.append("writing the catalog")
        bar.set_stage(stages[0])
        for i, rec in enumerate(recs):
            batch.add(_prepare_row(manifest, rec))
            bar.update(stage=stages[i + 1])
        reports = batch.commit()
        bar.update()
    return reports


def _prepare_row(manifest: Path, rec: dict[str, str]):
    """Read, map and QC the dataset of one manifest row (:func:`store.prepare.prepare`)."""

    def get(key: str) -> str | None:
        return (rec.get(key) or "").strip() or None

    spec = IngestSpec(
        dataset_id=get("dataset_id") or "",
        label_key=get("label_key"),
        sensitive=tuple(v for v in (get("sensitive") or "").split("|") if v),
        resistant=tuple(v for v in (get("resistant") or "").split("|") if v),
        sample_key=get("sample_key"),
        patient_key=get("patient_key"),
        patient_scope=get("patient_scope"),
        input_type=get("input_type") or "auto",  # type: ignore[arg-type]
        layer=get("layer"),
        gene_key=get("gene_key"),
        min_genes=_number(get("min_genes"), int, 500, f"{manifest.name}: min_genes"),
        max_pct_mito=_number(get("max_pct_mito"), float, 10.0, f"{manifest.name}: max_pct_mito"),
        meta=tuple(sorted((k, rec[k].strip()) for k in META_FIELDS if (rec.get(k) or "").strip())),
        allow_unmapped=(get("allow_unmapped") or "").strip().lower() in ("1", "true", "yes"),
    )
    path = Path(rec["path"])
    return prepare(path if path.is_absolute() else manifest.parent / path, spec)


def _number(text: str | None, cast: type, default: float, what: str) -> float:
    """``cast(text)`` or ``default`` when empty; a value that is not a number → one-line InputError."""
    if text is None:
        return default
    try:
        return cast(text)
    except ValueError:
        msg = f"{what} {text!r} is not a{'n integer' if cast is int else ' number'}"
        raise InputError(msg) from None
