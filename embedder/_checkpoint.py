"""Safe checkpoint reading shared by all adapters.

- :func:`require_files` checks a checkpoint directory's layout and names what is missing.
- :func:`load_state_dict` reads safetensors or ``torch.load(weights_only=True)``.
- :func:`safe_unpickle` reads the original releases' pickled dictionaries with a
  restricted unpickler (plain containers, str/int/float/bool/None and numpy's scalar and
  dtype reconstruction only) — never bare :func:`pickle.load`.
- :func:`load_strict` loads a state dict into a module and reports missing/unexpected keys
  and shape mismatches in one :class:`~store.errors.CheckpointError`.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scdrugmap.store.errors import CheckpointError

__all__ = [
    "check_shapes",
    "check_state_shapes",
    "find_one",
    "load_state_dict",
    "load_strict",
    "require_dir",
    "require_files",
    "safe_unpickle",
    "weight_shapes",
]

# (module, name) pairs the restricted unpickler may construct
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "str"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("builtins", "bool"),
        ("builtins", "complex"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # protocol-2 pickles store numpy scalar bytes this way
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            if module.startswith("numpy"):
                import numpy as np

                if name == "dtype":
                    return np.dtype
                return np._core.multiarray.scalar  # type: ignore[attr-defined]
            return super().find_class(module, name)
        msg = (
            f"refusing to unpickle {module}.{name}: only plain containers, str/int/float and numpy "
            "scalars are allowed in a checkpoint dictionary"
        )
        raise pickle.UnpicklingError(msg)


def safe_unpickle(path: str | Path) -> Any:
    """Read a pickle that may only hold plain data (dicts of str → int/float/numpy scalars).

    Parameters
    ----------
    path
        Pickle file (e.g. Geneformer's ``token_dictionary.pkl``).

    Returns
    -------
    object
        The unpickled plain-data object.

    Raises
    ------
    CheckpointError
        When the file is missing, unreadable, or references any other class.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}"
        raise CheckpointError(msg) from exc
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        msg = f"{path} is not a plain-data pickle ({exc}); re-export it as a dict of str → number"
        raise CheckpointError(msg) from exc


def require_dir(checkpoint: str | Path | None, *, model: str, expected: Sequence[str]) -> Path:
    """Check that ``checkpoint`` is an existing directory.

    Raises
    ------
    CheckpointError
        When no directory was given or it does not exist; the message lists ``expected``.
    """
    if checkpoint is None:
        msg = f"model {model!r} needs --checkpoint DIR holding: {', '.join(expected)}"
        raise CheckpointError(msg)
    path = Path(checkpoint)
    if not path.is_dir():
        msg = f"checkpoint directory {str(path)!r} for {model!r} does not exist; expected a directory holding: {', '.join(expected)}"
        raise CheckpointError(msg)
    return path


def require_files(directory: Path, names: Iterable[str], *, model: str, expected: Sequence[str]) -> None:
    """Raise one error naming every missing file of a checkpoint directory.

    Parameters
    ----------
    directory
        The checkpoint directory.
    names
        File names that must be present.
    model
        Model name for the message.
    expected
        The full expected layout (printed in the message).

    Raises
    ------
    CheckpointError
        Listing the missing files and the expected layout.
    """
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        msg = (
            f"checkpoint {str(directory)!r} for {model!r} lacks {', '.join(missing)}; "
            f"expected: {', '.join(expected)}"
        )
        raise CheckpointError(msg)


def find_one(directory: Path, candidates: Sequence[str], *, model: str, expected: Sequence[str]) -> Path:
    """Return the first existing file among ``candidates`` (e.g. safetensors, then .bin).

    Raises
    ------
    CheckpointError
        When none exists.
    """
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    msg = (
        f"checkpoint {str(directory)!r} for {model!r} has none of {', '.join(candidates)}; "
        f"expected: {', '.join(expected)}"
    )
    raise CheckpointError(msg)


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Read tensors from a checkpoint file without executing code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(map_location="cpu", weights_only=True)``.

    Parameters
    ----------
    path
        Weights file.

    Returns
    -------
    dict
        The loaded object (a state dict, or a dict wrapping one, as the release stores it).

    Raises
    ------
    CheckpointError
        When the file cannot be read or holds anything but tensors and plain data.
    """
    import torch

    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        msg = f"the weights file {path} is empty (0 bytes); copy the checkpoint again"
        raise CheckpointError(msg)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        msg = f"cannot read weights from {path}: {exc or type(exc).__name__}".splitlines()[0]
        raise CheckpointError(msg) from exc
    except Exception as exc:  # safetensors' own error type (a damaged header)
        if type(exc).__name__ != "SafetensorError":
            raise
        msg = f"cannot read weights from {path}: {exc}".splitlines()[0]
        raise CheckpointError(msg) from exc


def weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a weights file, without reading their data when possible.

    safetensors headers are read directly; ``torch.save`` files are memory-mapped.

    Raises
    ------
    CheckpointError
        An empty or unreadable file, or one that is not a flat state dict (name → tensor).
    """
    import torch

    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file() and path.stat().st_size > 0:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception:  # fall through to the full reader for its error message
            pass
    sd = None
    if path.suffix != ".safetensors" and path.is_file() and path.stat().st_size > 0:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # an old (non-zip) file cannot be mapped: read it normally
            sd = None
    if sd is None:
        sd = load_state_dict(path)
    if not isinstance(sd, Mapping) or not all(
        isinstance(k, str) and hasattr(v, "shape") for k, v in sd.items()
    ):
        msg = f"{path} does not hold a flat state dict (name → tensor); save it with save_pretrained"
        raise CheckpointError(msg)
    return {k: tuple(v.shape) for k, v in sd.items()}


def check_shapes(
    build: Callable[[], Any], files: Sequence[str | Path], *, source: str | Path, what: str
) -> None:
    """Refuse a model config whose parameter shapes do not fit the weight files, before allocating it.

    Parameters
    ----------
    build
        Builds the module from the config (called under ``torch.device("meta")``).
    files
        The weight files (shards allowed); shapes read with :func:`weight_shapes`.
    source
        The config file (for the message).
    what
        The model class (for the message).

    Raises
    ------
    CheckpointError
        See :func:`check_state_shapes`; also an unreadable / empty weights file.
    """
    theirs: dict[str, tuple[int, ...]] = {}
    for f in files:
        theirs.update(weight_shapes(f))
    if not theirs:
        msg = f"the weights {', '.join(str(f) for f in files)} hold no tensors; copy the checkpoint again"
        raise CheckpointError(msg)
    check_state_shapes(build, theirs, source=source, what=what)


def check_state_shapes(
    build: Callable[[], Any], shapes: Mapping[str, Any], *, source: str | Path, what: str
) -> None:
    """Refuse a model config whose parameter shapes do not fit ``shapes``, before allocating it.

    ``build()`` runs under ``torch.device("meta")`` (shapes only, no memory); its state-dict
    shapes are compared with ``shapes`` (name → shape or tensor, as the weights hold them).

    Parameters
    ----------
    build
        Builds the module from the config.
    shapes
        The weights' tensor names → shapes (or the tensors themselves).
    source
        The config file (for the message).
    what
        The model class (for the message).

    Raises
    ------
    CheckpointError
        Shape mismatches or no tensor name in common (the config declares another model), or a
        config the model class cannot be built from.
    """
    import torch

    theirs = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    try:
        with torch.device("meta"):
            own = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    except (ValueError, TypeError, AssertionError) as exc:  # the config itself is invalid
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        msg = f"{source} does not describe a valid {what}: {text}"
        raise CheckpointError(msg) from exc
    except (RuntimeError, NotImplementedError):  # an operation meta tensors lack: the strict load checks
        return
    bad = [
        f"{k}: checkpoint {theirs[k]} vs model {own[k]}" for k in own if k in theirs and theirs[k] != own[k]
    ]
    if bad or not (own.keys() & theirs.keys()):
        n_params = sum(int(np.prod(s)) for s in own.values())
        n_weights = sum(int(np.prod(s)) for s in theirs.values())
        detail = (
            f"shape mismatches {bad[:3]}{' …' if len(bad) > 3 else ''}" if bad else "no tensor name in common"
        )
        msg = (
            f"{source} declares a {what} of {n_params:,} parameters ({4 * n_params / 1e9:.2f} GB in float32) that "
            f"does not match its weights ({n_weights:,} values): {detail}; use the config released with "
            "these weights"
        )
        raise CheckpointError(msg)


def load_strict(module: Any, state_dict: Mapping[str, Any], *, source: str | Path) -> None:
    """Load ``state_dict`` into ``module``; every key must match by name and shape.

    Parameters
    ----------
    module
        A ``torch.nn.Module``.
    state_dict
        Tensors keyed as in ``module.state_dict()`` (callers map release names first).
    source
        Where the weights came from (for the message).

    Raises
    ------
    CheckpointError
        Listing missing keys, unexpected keys and shape mismatches (first few of each).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''} ({len(missing)})")
    if unexpected:
        problems.append(
            f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    if shapes:
        problems.append(f"shape mismatches {shapes[:3]}{' …' if len(shapes) > 3 else ''}")
    if problems:
        msg = f"weights in {source} do not match the model built from its config: " + "; ".join(problems)
        raise CheckpointError(msg)
    module.load_state_dict(dict(state_dict), strict=True)
