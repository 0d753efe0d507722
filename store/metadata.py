"""Dataset metadata fields of the catalog and their validation.

Fields follow the scDrugMap catalogue (collection, study, accession, tissue, cancer type, drug,
drug class, regimen, source, technology, organism, PMID) plus scDrugAtlas's label confidence
(1–3 stars) and the evidence it is derived from (``exposure_days``, ``sample_origin``,
``intrinsic_resistance``; rule in :mod:`store.confidence`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from scdrugmap.store.confidence import (
    parse_exposure_days,
    parse_intrinsic_resistance,
    parse_sample_origin,
    with_confidence,
)
from scdrugmap.store.errors import InputError

__all__ = ["DRUG_CLASSES", "META_FIELDS", "check_identifier", "clean_meta"]

META_FIELDS = (
    "collection",
    "study",
    "accession",
    "tissue",
    "cancer_type",
    "drug",
    "drug_class",
    "regimen",
    "source",
    "technology",
    "organism",
    "pmid",
    "label_confidence",
    "exposure_days",
    "sample_origin",
    "intrinsic_resistance",
)
DRUG_CLASSES = {
    "targeted": "targeted therapy",
    "targeted therapy": "targeted therapy",
    "chemotherapy": "chemotherapy",
    "chemo": "chemotherapy",
    "immunotherapy": "immunotherapy",
}
#: longest dataset id / model name (the store's file names must stay under the file-system limit)
MAX_ID_LENGTH = 128
_ID_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def clean_meta(meta: Mapping[str, Any], *, dataset_id: str) -> dict[str, Any]:
    """Validate and normalise dataset metadata.

    Parameters
    ----------
    meta
        ``{field: value}`` with fields from :data:`META_FIELDS`; empty values are dropped.
    dataset_id
        Used as the default ``study``.

    Returns
    -------
    dict
        Normalised values (``drug_class`` spelled as in the catalog, ``label_confidence`` int,
        ``exposure_days`` float, ``sample_origin`` lower-case, ``intrinsic_resistance`` bool), plus
        ``confidence_source`` (``explicit`` / ``derived``) when the dataset has stars: derived from the
        evidence when ``label_confidence`` is not given (see :func:`store.confidence.with_confidence`).

    Raises
    ------
    InputError
        Unknown field, ``label_confidence`` outside 1–3, unknown ``drug_class``, ``exposure_days``
        not a number ≥ 0, ``intrinsic_resistance`` not true/false/yes/no/1/0.
    """
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if key not in META_FIELDS:
            msg = f"unknown metadata field {key!r}; allowed: {', '.join(META_FIELDS)}"
            raise InputError(msg)
        if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
            continue
        text = str(value).strip()
        if key == "label_confidence":
            try:
                num = int(float(text))
            except ValueError:
                num = -1
            if num not in (1, 2, 3):
                msg = f"label_confidence must be 1, 2 or 3 (stars), got {text!r}"
                raise InputError(msg)
            out[key] = num
            continue
        if key == "exposure_days":
            out[key] = parse_exposure_days(text)
            continue
        if key == "intrinsic_resistance":
            out[key] = parse_intrinsic_resistance(value)
            continue
        if key == "sample_origin":
            text = parse_sample_origin(text)
        if key == "drug_class":
            norm = DRUG_CLASSES.get(text.lower())
            if norm is None:
                msg = f"drug_class {text!r} unknown; use targeted therapy, chemotherapy or immunotherapy"
                raise InputError(msg)
            text = norm
        if key == "pmid" and text.endswith(".0"):
            text = text[:-2]
        out[key] = text
    out.setdefault("study", dataset_id)
    return with_confidence(out, dataset_id=dataset_id)


def check_identifier(name: str, *, what: str) -> None:
    """Dataset ids and model names: letters, digits, ``.``, ``_``, ``-``, starting alphanumeric.

    Raises
    ------
    InputError
        Naming the bad value.
    """
    if not name or not set(name) <= _ID_OK or name[0] in "._-":
        msg = f"bad {what} {name!r}: use letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        raise InputError(msg)
    if len(name) > MAX_ID_LENGTH:  # file names (datasets/<id>.h5ad, .<id>.h5ad.tmp-<pid>) must fit
        msg = f"{what} {name[:40]}… is {len(name)} characters long; use at most {MAX_ID_LENGTH}"
        raise InputError(msg)
