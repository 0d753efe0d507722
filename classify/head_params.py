"""Values of head hyper-parameters (``--param KEY=VALUE``) checked before anything is trained.

A useless or crashing value (``epochs=-1``, ``batch_size=0``, ``lr=abc``) is refused with one
line naming the parameter and its allowed range, instead of a traceback or a run stored as
complete that learnt nothing.
"""

from __future__ import annotations

import math
from typing import Any

from scdrugmap.store.errors import InputError

__all__ = ["check_head_values"]

#: parameter → (type, lower bound, lower bound inclusive, upper bound or None)
_RANGES: dict[str, tuple[type, float, bool, float | None]] = {
    "hidden": (int, 1, True, None),
    "epochs": (int, 1, True, None),
    "max_epochs": (int, 1, True, None),
    "min_steps": (int, 0, True, None),
    "patience": (int, 1, True, None),
    "batch_size": (int, 1, True, None),
    "max_iter": (int, 1, True, None),
    "n_estimators": (int, 1, True, None),
    "num_leaves": (int, 2, True, None),
    "lr": (float, 0, False, None),
    "learning_rate": (float, 0, False, None),
    "C": (float, 0, False, None),
    "weight_decay": (float, 0, True, None),
    "val_fraction": (float, 0, False, 1.0),
}


def _bad(head: str, key: str, value: Any, rule: str) -> InputError:
    return InputError(f"head {head!r}: --param {key}={value!r} is not allowed; {key} must be {rule}")


def check_head_values(head: str, params: dict[str, Any]) -> None:
    """Refuse hyper-parameter values of the wrong type or outside their range.

    Parameters
    ----------
    head
        Head name (for messages).
    params
        The merged hyper-parameters (defaults + given).

    Raises
    ------
    InputError
        A value of the wrong type (``lr=abc``), a non-finite number, or one out of range
        (``epochs=-1``, ``batch_size=0``, ``val_fraction=1``).
    """
    for key, value in params.items():
        if key == "max_features":
            ok = value in ("sqrt", "log2") or (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and 0 < value
                and math.isfinite(value)
            )
            if not ok:
                raise _bad(head, key, value, "'sqrt', 'log2', a fraction in (0, 1] or a count ≥ 1")
            continue
        if key not in _RANGES:
            continue
        kind, low, inclusive, high = _RANGES[key]
        if kind is int:
            good_type = isinstance(value, int) and not isinstance(value, bool)
            rule = f"an integer ≥ {low:g}"
        else:
            good_type = (
                isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            )
            rule = f"a number {'≥' if inclusive else '>'} {low:g}" + (
                f" and < {high:g}" if high is not None else ""
            )
        if not good_type:
            raise _bad(head, key, value, rule)
        if value < low or (not inclusive and value == low) or (high is not None and value >= high):
            raise _bad(head, key, value, rule)
