"""Map a dataset's response labels onto ``sensitive`` / ``resistant`` (or missing).

Common spellings are recognised case-insensitively (sensitive/resistant, responder/
non-responder, response/non-response, ...). Anything else — single letters and numbers such as
1/0 included, whose meaning differs between studies — must be mapped explicitly with
``--sensitive V`` / ``--resistant V``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from scdrugmap.store.errors import InputError

__all__ = ["RECOGNISED_RESISTANT", "RECOGNISED_SENSITIVE", "map_labels"]

RECOGNISED_SENSITIVE = frozenset(
    {"sensitive", "sensitivity", "responder", "responders", "response", "responsive", "responding"}
)
RECOGNISED_RESISTANT = frozenset(
    {
        "resistant",
        "resistance",
        "non-responder",
        "non-responders",
        "nonresponder",
        "non_responder",
        "non responder",
        "non-response",
        "nonresponse",
        "no response",
        "non-responsive",
        "nonresponsive",
        "non-responding",
    }
)


#: strings read as a missing label (R and spreadsheet exports write these for NA)
MISSING_STRINGS = frozenset({"", "na", "n/a", "nan", "none", "null"})


def _norm(value: object) -> str:
    return str(value).strip().lower()


def map_labels(
    values: pd.Series | np.ndarray | Iterable[object],
    *,
    key: str,
    sensitive: Iterable[object] = (),
    resistant: Iterable[object] = (),
) -> np.ndarray:
    """Map raw label values onto ``"sensitive"``, ``"resistant"`` or ``None``.

    Parameters
    ----------
    values
        One raw label per cell (``adata.obs[key]``). Missing values (NaN/None and the strings
        "", "NA", "N/A", "nan", "None", "null") become None (unlabelled cells are allowed).
    key
        The obs column name (for messages).
    sensitive, resistant
        Explicit values meaning sensitive / resistant. When both are empty the recognised
        spellings are used. Compared as stripped strings, case-insensitively (so ``1`` matches
        ``"1"`` and ``1.0`` matches ``"1.0"``).

    Returns
    -------
    numpy.ndarray
        object ``(n_cells,)`` of ``"sensitive"``, ``"resistant"`` or None.

    Raises
    ------
    InputError
        When a value is in both mappings, a non-missing value is not mapped (the message
        lists the unmapped values and shows how to map them), or every value is missing.
    """
    ser = pd.Series(values)
    sens = {_norm(v) for v in sensitive}
    res = {_norm(v) for v in resistant}
    both = sens & res
    if both:
        msg = f"label value(s) {sorted(both)} given as both --sensitive and --resistant; give each value once"
        raise InputError(msg)
    explicit = bool(sens or res)
    if not explicit:
        sens, res = set(RECOGNISED_SENSITIVE), set(RECOGNISED_RESISTANT)
    missing = ser.isna().to_numpy() | ser.map(lambda v: _norm(v) in MISSING_STRINGS).to_numpy(dtype=bool)
    norm = ser.map(lambda v: None if pd.isna(v) else _norm(v)).to_numpy(dtype=object)
    out = np.full(len(ser), None, dtype=object)
    is_sens = np.array([n in sens for n in norm], dtype=bool) & ~missing
    is_res = np.array([n in res for n in norm], dtype=bool) & ~missing
    out[is_sens] = "sensitive"
    out[is_res] = "resistant"
    unmapped = ~(is_sens | is_res | missing)
    if unmapped.any():
        bad = sorted({str(v) for v in ser[unmapped].unique()})[:10]
        hint = (
            f"map them with --sensitive VALUE / --resistant VALUE (e.g. --sensitive {bad[0]!r})"
            if not explicit
            else "add them to --sensitive / --resistant, or set them to missing (NaN) for unlabelled cells"
        )
        msg = f"label column {key!r} has values that are neither sensitive nor resistant: {bad}; {hint}"
        raise InputError(msg)
    if len(ser) and missing.all():
        msg = (
            f"label column {key!r} has no usable label: all {len(ser)} values are missing; give the column that "
            "holds the labels, or omit --label-key to ingest unlabelled cells"
        )
        raise InputError(msg)
    return out
