"""Reading a stock Hugging Face ``transformers`` checkpoint directory without network access.

Used by the Geneformer, tGPT and LLM adapters (:mod:`embedder._hf`, which re-exports these
names): ``config.json`` → config object, weight files (single or sharded safetensors /
``pytorch_model.bin``), strict loading that drops only documented legacy buffers and re-ties
tied weights (:func:`load_weights`), model construction on a device, and the offline tokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from scdrugmap.embedder._checkpoint import check_shapes, find_one, load_state_dict, load_strict
from scdrugmap.store.errors import CheckpointError

__all__ = [
    "WEIGHT_FILES",
    "build_model",
    "load_tokenizer",
    "load_weights",
    "read_config",
    "tied_groups",
    "weight_files",
]

#: weight files of a Hugging Face model directory, in the order ``from_pretrained`` prefers them
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_config(directory: Path, reader: Callable[[str], Any], *, model: str, model_types: Sequence[str]):
    """Read ``directory/config.json`` with ``reader`` (e.g. ``BertConfig.from_json_file``).

    ``model_types`` lists the accepted ``model_type`` values (empty: any).

    Raises
    ------
    CheckpointError
        When the file is unreadable or declares another architecture.
    """
    path = directory / "config.json"
    try:
        config = reader(str(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        msg = f"cannot read {path} for {model!r}: {exc}".splitlines()[0]
        raise CheckpointError(msg) from exc
    mtype = getattr(config, "model_type", None)
    if model_types and mtype not in model_types:
        msg = f"{path} declares model_type {mtype!r}; {model!r} expects {' or '.join(map(repr, model_types))}"
        raise CheckpointError(msg)
    _CONFIG_DIRS[id(config)] = (config, directory)  # build_model checks it against the weights' shapes
    while len(_CONFIG_DIRS) > 8:
        del _CONFIG_DIRS[next(iter(_CONFIG_DIRS))]
    return config


#: configs read by :func:`read_config` → their checkpoint directory (the object is kept so ids stay unique)
_CONFIG_DIRS: dict[int, tuple[Any, Path]] = {}


def weight_files(directory: Path, *, model: str, expected: Sequence[str]) -> list[Path]:
    """The weight file(s) of a Hugging Face directory (single file or sharded with an index).

    Raises
    ------
    CheckpointError
        No weight file, an unreadable index, or shards named by the index that are missing.
    """
    first = find_one(directory, WEIGHT_FILES, model=model, expected=expected)
    if not first.name.endswith(".index.json"):
        return [first]
    try:
        weight_map = json.loads(first.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        msg = f"{first} is not a weight index (a JSON object with a 'weight_map'): {exc}"
        raise CheckpointError(msg) from exc
    missing = [s for s in shards if not (directory / s).is_file()]
    if missing:
        msg = f"checkpoint {str(directory)!r} for {model!r} lacks shards {', '.join(missing)} named in {first.name}"
        raise CheckpointError(msg)
    return [directory / s for s in shards]


def _read_weights(files: Sequence[Path]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for f in files:
        sd = load_state_dict(f)
        if not isinstance(sd, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
        ):
            msg = f"{f} does not hold a flat state dict (name → tensor); save it with save_pretrained"
            raise CheckpointError(msg)
        out.update(sd)
    return out


def tied_groups(module: Any) -> list[list[str]]:
    """Names of parameters that share one tensor (tied weights), grouped, in state-dict order."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def load_weights(module: Any, files: Sequence[Path], *, legacy: Sequence[str] = ()) -> None:
    """Load released weights into ``module`` strictly.

    Keys matching a ``legacy`` regular expression (buffers older ``transformers`` saved,
    e.g. ``bert.embeddings.position_ids``) are dropped when the module does not have them.
    Tied parameters (decoder/``lm_head`` ↔ input embedding) absent from the file are filled
    from their tied partner; present ones must equal it. Everything else must match by name
    and shape (:func:`embedder._checkpoint.load_strict`).

    Raises
    ------
    CheckpointError
        Missing/unexpected keys, shape mismatches, or tied tensors that differ.
    """
    import torch

    sd = _read_weights(files)
    own = set(module.state_dict())
    patterns = [re.compile(p) for p in legacy]
    for key in [k for k in sd if k not in own and any(p.fullmatch(k) for p in patterns)]:
        del sd[key]
    for group in tied_groups(module):
        present = [k for k in group if k in sd]
        if not present:
            continue
        ref = sd[present[0]]
        for key in group:
            if key not in sd:
                sd[key] = ref
            elif key != present[0] and (sd[key].shape != ref.shape or not torch.equal(sd[key], ref)):
                msg = f"{key} and {present[0]} are tied in the model but differ in {files[0].parent}"
                raise CheckpointError(msg)
    load_strict(module, sd, source=files[0] if len(files) == 1 else files[0].parent)


def build_model(model_cls: Any, config: Any, device: Any) -> Any:
    """Instantiate ``model_cls(config)`` directly on ``device`` (``"meta"`` allowed), float32.

    A config read by :func:`read_config` is first checked against its directory's weight shapes
    on the ``meta`` device (:func:`embedder._checkpoint.check_shapes`), so a config declaring a
    model far larger than its weights is refused before any tensor is allocated.

    Raises
    ------
    CheckpointError
        The weights' shapes do not fit the model ``config.json`` declares, or a weight file is
        empty or unreadable.
    """
    import torch

    entry = _CONFIG_DIRS.get(id(config))
    if entry is not None and entry[0] is config and torch.device(device).type != "meta":
        directory = entry[1]
        files = weight_files(directory, model=model_cls.__name__, expected=WEIGHT_FILES)
        check_shapes(
            lambda: model_cls(config), files, source=directory / "config.json", what=model_cls.__name__
        )
    with torch.device(device):
        model = model_cls(config)
    return model.float().eval()


def load_tokenizer(directory: Path, *, model: str) -> Any:
    """Load a tokenizer from a local directory without network access.

    Raises
    ------
    CheckpointError
        When ``transformers`` cannot build a tokenizer from the directory's files.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        msg = f"cannot load the tokenizer of {model!r} from {directory}: {exc}".splitlines()[0]
        raise CheckpointError(msg) from exc
