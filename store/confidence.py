"""Label confidence stars (scDrugAtlas rule) from a dataset's evidence, and its metadata fields.

Rule (:func:`confidence_stars`), from the evidence behind a dataset's resistant/sensitive labels:

- 3 stars — cells from recurrent / relapsed / metastatic samples, PDX or mouse tumours (xenografts),
  known intrinsic resistance, or regained proliferation after > 6 months (> 180 days) of drug;
- 2 stars — 1–6 months (30–180 days) of drug exposure;
- 1 star — < 1 month (< 30 days) of exposure.

The evidence is dataset metadata (:data:`EVIDENCE_FIELDS`): ``exposure_days`` (number ≥ 0),
``sample_origin`` (free text, stored lower-case) and ``intrinsic_resistance`` (boolean). At ingest
the stars are derived from it when ``label_confidence`` is not given (:func:`with_confidence`); an
explicit ``label_confidence`` wins. ``datasets.confidence_source`` records which (``explicit`` /
``derived``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from scdrugmap.store.errors import InputError

__all__ = [
    "EVIDENCE_FIELDS",
    "THREE_STAR_ORIGINS",
    "confidence_stars",
    "parse_exposure_days",
    "parse_intrinsic_resistance",
    "parse_sample_origin",
    "with_confidence",
]

log = logging.getLogger(__name__)

#: dataset metadata fields the stars are derived from
EVIDENCE_FIELDS = ("exposure_days", "sample_origin", "intrinsic_resistance")

#: words of ``sample_origin`` that give 3 stars (recurrent/metastatic samples, PDX or mouse tumours)
THREE_STAR_ORIGINS = frozenset(
    {
        "recurrent",
        "recurrence",
        "relapsed",
        "relapse",
        "metastatic",
        "metastasis",
        "metastases",
        "pdx",
        "mouse",
        "mice",
        "murine",
        "xenograft",
        "xenografts",
        "cdx",
    }
)
#: words that negate the origin ("non-metastatic", "not relapsed"): no 3 stars from the origin then
_NEGATIONS = frozenset({"non", "not", "no", "without", "pre"})
_TRUE = frozenset({"true", "yes", "1", "y", "t"})
_FALSE = frozenset({"false", "no", "0", "n", "f"})


def parse_exposure_days(value: Any) -> float:
    """Days of drug exposure: a finite number ≥ 0.

    Raises
    ------
    InputError
        Not a number, negative, NaN or infinite (naming the value).
    """
    text = str(value).strip()
    try:
        days = float(text)
    except ValueError:
        days = math.nan
    if not math.isfinite(days) or days < 0:
        msg = f"exposure_days must be a number of days ≥ 0 (e.g. exposure_days=45), got {text!r}"
        raise InputError(msg)
    return days


def parse_intrinsic_resistance(value: Any) -> bool:
    """``true/false``, ``yes/no``, ``1/0`` (any case) as a bool.

    Raises
    ------
    InputError
        Any other value (naming it).
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text.endswith(".0"):
        text = text[:-2]
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    msg = f"intrinsic_resistance must be true/false, yes/no or 1/0, got {str(value).strip()!r}"
    raise InputError(msg)


def parse_sample_origin(value: Any) -> str:
    """Free text, lower-case with single spaces (``"  Patient-derived  Xenograft"`` → ``"patient-derived xenograft"``)."""
    return " ".join(str(value).split()).lower()


def _origin_is_three_star(origin: str) -> bool:
    words = set(re.findall(r"[a-z0-9]+", origin))
    return bool(words & THREE_STAR_ORIGINS) and not words & _NEGATIONS


def confidence_stars(
    *,
    exposure_days: float | None = None,
    sample_origin: str | None = None,
    intrinsic_resistance: bool | None = None,
) -> tuple[int | None, str]:
    """Stars for a dataset's labels from its evidence (see the module docstring).

    Parameters
    ----------
    exposure_days
        Days of drug exposure before sampling (``None``/NaN = unknown).
    sample_origin
        Free text; 3 stars when one of its words is in :data:`THREE_STAR_ORIGINS` and none negates
        it (``non-metastatic``, ``not relapsed``).
    intrinsic_resistance
        Known intrinsic resistance (``False``/``None`` is no evidence).

    Returns
    -------
    (int or None, str)
        Stars (None when there is no evidence for any star) and the reason.

    Raises
    ------
    InputError
        Negative exposure.
    """
    origin = parse_sample_origin(sample_origin or "")
    if origin and _origin_is_three_star(origin):
        return 3, f"sample origin {origin}"
    if intrinsic_resistance:
        return 3, "known intrinsic resistance"
    if exposure_days is None or (isinstance(exposure_days, float) and math.isnan(exposure_days)):
        return None, "no evidence (exposure_days, sample_origin, intrinsic_resistance)"
    days = float(exposure_days)
    if days < 0:
        msg = f"exposure_days={exposure_days} must be ≥ 0"
        raise InputError(msg)
    if days > 180:
        return 3, f"{days:g} days of drug (> 6 months)"
    if days >= 30:
        return 2, f"{days:g} days of drug (1–6 months)"
    return 1, f"{days:g} days of drug (< 1 month)"


def with_confidence(meta: dict[str, Any], *, dataset_id: str) -> dict[str, Any]:
    """Add ``confidence_source`` (and derived ``label_confidence``) to cleaned metadata.

    Parameters
    ----------
    meta
        Cleaned metadata (evidence fields already parsed).
    dataset_id
        For the log message when explicit stars disagree with the evidence.

    Returns
    -------
    dict
        ``meta`` plus ``confidence_source``: ``explicit`` when ``label_confidence`` was given,
        ``derived`` when it was computed from the evidence; unchanged when there are no stars.
    """
    out = dict(meta)
    evidence = {k: out.get(k) for k in EVIDENCE_FIELDS}
    derived, reason = confidence_stars(**evidence)
    if "label_confidence" in out:
        out["confidence_source"] = "explicit"
        if derived is not None and derived != out["label_confidence"]:
            log.warning(
                "%s: label_confidence=%d given explicitly, the evidence gives %d (%s); the explicit value is kept",
                dataset_id,
                out["label_confidence"],
                derived,
                reason,
            )
    elif derived is not None:
        out["label_confidence"] = derived
        out["confidence_source"] = "derived"
    return out
