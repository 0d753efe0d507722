"""LoRA on an embedder's torch module, the scDrugMap MLP head on top, and their persistence.

LoRA (Hu et al. 2021) through ``peft.inject_adapter_in_model``: rank 8, alpha 8, dropout 0.05 by
default (scDrugMap), on each adapter's ``lora_targets`` modules and, for attention blocks with a
packed ``in_proj_weight`` (scGPT, scFoundation, UCE), on that parameter through peft's
``target_parameters``. The base weights are frozen; only LoRA matrices and the head train.
Adapters and head are saved as safetensors; loading them back into a freshly loaded embedder
reproduces predictions exactly on CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from scdrugmap.store.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "CellSource",
    "LoraSpec",
    "attach_lora",
    "build_head",
    "embed_cells",
    "inject_lora",
    "load_adapter",
    "save_adapter",
]


@dataclass(frozen=True)
class LoraSpec:
    """LoRA and training settings of a fine-tuning run (hashed into its run id).

    Attributes
    ----------
    rank, alpha, dropout
        LoRA rank r, scaling alpha and dropout (scDrugMap: 8, 8, 0.05).
    targets
        Module names to adapt; empty = the adapter's default ``lora_targets``.
    target_parameters
        Raw parameter names to adapt (packed Q/K/V); empty = the adapter's default.
    epochs, lr, batch_size, grad_accum
        AdamW training of LoRA + head: epochs, learning rate, cells per step, steps accumulated.
    max_train_cells
        Seeded subsample of each fold's training cells (None = all).
    precision
        ``fp32``, or ``bf16``/``fp16`` autocast on CUDA.
    gradient_checkpointing
        Trade compute for memory where the backbone supports it (Hugging Face models).
    """

    rank: int = 8
    alpha: int = 8
    dropout: float = 0.05
    targets: tuple[str, ...] = ()
    target_parameters: tuple[str, ...] = ()
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 16
    grad_accum: int = 1
    max_train_cells: int | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            msg = f"bad LoRA settings rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}"
            raise InputError(msg)
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.lr <= 0:
            msg = "epochs, batch size and gradient accumulation must be ≥ 1 and lr > 0"
            raise InputError(msg)

    def resolved(self, emb: Any) -> LoraSpec:
        """Fill default targets from the embedder."""
        from dataclasses import replace

        targets = self.targets or tuple(emb.lora_targets)
        params = self.target_parameters or tuple(getattr(emb, "lora_target_parameters", ()))
        if not targets and not params:
            msg = f"model {emb.name!r} declares no LoRA targets; give --target-modules"
            raise InputError(msg)
        dropout = self.dropout
        if params and dropout:
            # peft's parameter-level LoRA (ParamWrapper) has no dropout: record 0 instead of failing
            log.warning("LoRA on raw parameters %s has no dropout in peft; dropout set to 0", params)
            dropout = 0.0
        return replace(self, targets=targets, target_parameters=params, dropout=dropout)


def _layer_limits(emb: Any) -> dict[str, Any]:
    """peft ``layers_to_transform`` when the pooled state skips the last layers (Geneformer)."""
    layers = emb.lora_layers() if hasattr(emb, "lora_layers") else None
    return {} if layers is None else {"layers_to_transform": layers, "layers_pattern": "layer"}


def inject_lora(
    module: Any,
    *,
    targets: tuple[str, ...] = (),
    target_parameters: tuple[str, ...] = (),
    **lora_options: Any,
) -> Any:
    """Inject LoRA (adapter ``"default"``) into ``module`` in place: ``targets`` modules, then ``target_parameters``.

    Two passes of ``peft.inject_adapter_in_model`` when both are given. From peft 0.22 one pass wraps
    the attention block that owns a packed ``in_proj_weight`` in a ``ParamWrapper`` before it reaches
    the block's ``out_proj`` module, which it then cannot find; adapting the modules first and the
    parameters second gives the same adapters (names, initial values, outputs) with peft 0.21 and
    0.22.

    Parameters
    ----------
    module
        A ``torch.nn.Module``.
    targets, target_parameters
        peft ``target_modules`` and ``target_parameters``.
    **lora_options
        Other ``peft.LoraConfig`` fields (``r``, ``lora_alpha``, ``lora_dropout``, ...).

    Returns
    -------
    torch.nn.Module
        ``module``, with the adapters.

    Raises
    ------
    ValueError
        peft's, when a target matches nothing.
    """
    import warnings

    from peft import LoraConfig, inject_adapter_in_model

    passes = [
        {"target_modules": list(targets) or None, "target_parameters": None},
        {"target_modules": None, "target_parameters": list(target_parameters) or None},
    ]
    passes = [p for p in passes if p["target_modules"] or p["target_parameters"]]
    for i, targeted in enumerate(passes):
        with warnings.catch_warnings():
            if i:  # the second pass adds to the same adapter, which peft warns about
                warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
            inject_adapter_in_model(LoraConfig(**targeted, **lora_options), module)
    return module


def attach_lora(emb: Any, spec: LoraSpec, *, seed: int) -> list[Any]:
    """Inject LoRA adapters into ``emb.torch_module()`` in place and freeze everything else.

    Returns
    -------
    list of torch.nn.Parameter
        The trainable LoRA parameters.

    Raises
    ------
    InputError
        When no module/parameter matches the targets.
    """
    import torch

    module = emb.torch_module()
    torch.manual_seed(seed)
    try:
        inject_lora(
            module,
            targets=spec.targets,
            target_parameters=spec.target_parameters,
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            bias="none",
            **_layer_limits(emb),
        )
    except ValueError as exc:
        msg = f"LoRA targets {spec.targets + spec.target_parameters} not found in {emb.name}: {exc}"
        raise InputError(msg) from exc
    trainable = []
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            trainable.append(p)
    if spec.gradient_checkpointing and hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable()
    return trainable


def build_head(dim: int, *, seed: int, device: Any) -> Any:
    """scDrugMap's MLP head ``dim → 512 → 512 → 2`` (ReLU), seeded."""
    from scdrugmap.classify.heads import HeadSpec, make_head

    mlp = make_head(HeadSpec.create("mlp_paper"), seed=seed).inner
    mlp.build(dim)
    return mlp.net.to(device)


@dataclass
class CellSource:
    """Where each evaluated cell's expression lives: its dataset AnnData and row."""

    adatas: dict[str, Any]
    dataset: np.ndarray
    row: np.ndarray


def embed_cells(emb: Any, source: CellSource, idx: np.ndarray) -> Any:
    """Differentiable embeddings ``(len(idx), dim)`` of cells ``idx`` (grouped per dataset)."""
    import torch

    parts, positions = [], []
    for ds in np.unique(source.dataset[idx]):
        pos = np.flatnonzero(source.dataset[idx] == ds)
        tokens = emb.tokenize(source.adatas[ds][source.row[idx[pos]]])
        parts.append(emb.embed_tensor(tokens).float())
        positions.append(pos)
    flat = np.concatenate(positions)
    inverse = np.empty_like(flat)
    inverse[flat] = np.arange(flat.size)
    out = torch.cat(parts)
    return out[torch.from_numpy(inverse).to(out.device)]


def adapter_state(emb: Any) -> dict[str, Any]:
    """LoRA tensors of the embedder's module (CPU copies)."""
    return {
        k: v.detach().cpu().contiguous() for k, v in emb.torch_module().state_dict().items() if "lora_" in k
    }


def save_adapter(emb: Any, head: Any, directory: Path, *, meta: dict[str, Any]) -> str:
    """Save LoRA tensors + head (safetensors) and ``meta`` (JSON); returns the adapter hash."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    lora = adapter_state(emb)
    save_file(lora, str(directory / "adapter.safetensors"))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
        str(directory / "head.safetensors"),
    )
    digest = hashlib.sha256((directory / "adapter.safetensors").read_bytes()).hexdigest()[:16]
    (directory / "lora.json").write_text(json.dumps({**meta, "adapter_hash": digest}, indent=1, default=str))
    return digest


def load_adapter(emb: Any, directory: Path, *, spec: LoraSpec, seed: int) -> Any:
    """Inject LoRA into a freshly loaded ``emb``, load saved adapter + head; returns the head.

    Raises
    ------
    InputError
        When the saved adapter does not match the model (missing/unexpected LoRA keys).
    """
    import torch
    from safetensors.torch import load_file

    attach_lora(emb, spec, seed=seed)
    saved = load_file(str(directory / "adapter.safetensors"))
    module = emb.torch_module()
    own = {k for k in module.state_dict() if "lora_" in k}
    if own != set(saved):
        msg = f"adapter in {directory} does not fit {emb.name}: {len(own ^ set(saved))} LoRA keys differ"
        raise InputError(msg)
    module.load_state_dict(saved, strict=False)
    head_state = load_file(str(directory / "head.safetensors"))
    head = build_head(int(head_state["0.weight"].shape[1]), seed=seed, device=torch.device("cpu"))
    head.load_state_dict(head_state)
    meta = json.loads((directory / "lora.json").read_text())
    emb.adapter_hash = meta["adapter_hash"]
    return head.to(next(module.parameters()).device)


def spec_dict(spec: LoraSpec) -> dict[str, Any]:
    """JSON form of a LoraSpec."""
    return asdict(spec)
