"""Shared machinery for adapters of stock Hugging Face ``transformers`` models.

Geneformer (``BertForMaskedLM``), tGPT (``GPT2LMHeadModel``) and the LLM adapter (any
``*ForCausalLM``) are plain ``transformers`` architectures. What they share lives here:

- checkpoint reading: ``config.json`` → config object, weight files (single or sharded
  safetensors / ``pytorch_model.bin``), strict loading that drops only documented legacy
  buffers and re-ties tied weights (:func:`load_weights`), and the offline tokenizer loader
  (:func:`load_tokenizer`) — in :mod:`embedder._hf_checkpoint`, re-exported here;
- option parsing (:func:`parse_options`), per-row iteration over a CSR matrix
  (:func:`iter_expressed`), token containers (:class:`TokenizedCells`);
- :class:`HFEmbedder`, the base class doing length-sorted mini-batching with CUDA OOM
  back-off, masked pooling and the ``spec()`` with checkpoint hashes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from scdrugmap.embedder._hf_checkpoint import (
    WEIGHT_FILES,
    build_model,
    load_tokenizer,
    load_weights,
    read_config,
    tied_groups,
    weight_files,
)
from scdrugmap.embedder._torch import (
    PaddingReport,
    SortedBatchEmbedder,
    autocast_context,
    masked_mean,
    pick_device,
)
from scdrugmap.store.errors import InputError

__all__ = ["WEIGHT_FILES", "HFEmbedder", "TokenizedCells", "build_model", "iter_expressed", "load_tokenizer"]
__all__ += ["load_weights", "parse_options", "positive_int", "read_config", "tied_groups", "var_column"]
__all__ += ["weight_files"]

log = logging.getLogger(__name__)

COMMON_DEFAULTS: dict[str, Any] = {"device": None, "batch_size": 32, "precision": "fp32"}
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


def parse_options(
    model: str,
    options: Mapping[str, Any],
    defaults: Mapping[str, Any],
    choices: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Merge the ``load`` ``options`` of ``model`` over the common and model ``defaults``; validate.

    ``choices`` lists the allowed values of enumerated options (``pooling`` ...); ``precision``
    is always checked. Returns every option with its value.

    Raises
    ------
    InputError
        Unknown option names, a value outside its choices, or a non-positive batch size.
    """
    known = {**COMMON_DEFAULTS, **defaults}
    unknown = sorted(set(options) - set(known))
    if unknown:
        msg = f"unknown option(s) {', '.join(unknown)} for model {model!r}; valid: {', '.join(sorted(known))}"
        raise InputError(msg)
    out = {**known, **options}
    for key, allowed in {"precision": PRECISIONS, **(choices or {})}.items():
        if out[key] not in allowed:
            msg = (
                f"option {key}={out[key]!r} for model {model!r} is not one of {', '.join(map(str, allowed))}"
            )
            raise InputError(msg)
    bs = out["batch_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        msg = f"option batch_size={bs!r} for model {model!r} must be a positive integer"
        raise InputError(msg)
    return out


def positive_int(model: str, key: str, value: Any, *, minimum: int = 1) -> int:
    """Check an integer option (``top_k``, ``max_length``); raises :class:`InputError`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        msg = f"option {key}={value!r} for model {model!r} must be an integer ≥ {minimum}"
        raise InputError(msg)
    return int(value)


def iter_expressed(X: Any, keep: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Per cell, the kept genes with positive expression, in var (column) order.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)`` dense array or scipy sparse matrix.
    keep
        bool ``(n_genes,)``: genes to consider (the vocabulary mask).

    Yields
    ------
    tuple
        ``(row, columns int64 (k,), values float64 (k,))`` with ``values > 0``.
    """
    X = sp.csr_matrix(X)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    indptr, indices, data = X.indptr, X.indices, X.data
    for i in range(X.shape[0]):
        idx = indices[indptr[i] : indptr[i + 1]]
        val = data[indptr[i] : indptr[i + 1]]
        m = keep[idx] & (val > 0)
        yield i, idx[m].astype(np.int64), val[m].astype(np.float64)


def var_column(var: Any, key: str) -> np.ndarray:
    """``var[key]`` as a str array; raises :class:`InputError` when the column is missing."""
    if key not in var:
        msg = f"adata.var lacks the column {key!r} required by the AnnData contract (see embedder.base)"
        raise InputError(msg)
    return np.asarray(var[key].fillna("").astype(str).to_numpy(), dtype=object)


@dataclass
class TokenizedCells:
    """Unpadded token ids per cell: ``ids`` (one int64 array per cell, special tokens included),
    ``n_genes`` (int64 ``(n_cells,)`` genes represented; 0 → NaN embedding), ``pad_id``."""

    ids: list[np.ndarray]
    n_genes: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``(n_cells,)`` token counts."""
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))

    def subset(self, idx: Sequence[int] | np.ndarray) -> TokenizedCells:
        """The cells ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        return TokenizedCells([self.ids[i] for i in idx], self.n_genes[idx], self.pad_id)

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ``(input_ids, attention_mask)``, both int64 ``(n_cells, max_length)``."""
        lengths = self.lengths
        width = int(max(1, lengths.max(initial=0)))
        ids = np.full((len(self), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(self), width), dtype=np.int64)
        for row, (toks, n) in enumerate(zip(self.ids, lengths, strict=True)):
            ids[row, :n] = toks
            mask[row, :n] = 1
        return ids, mask


class HFEmbedder(SortedBatchEmbedder):
    """Base of the ``transformers`` adapters: batching, forward, masked pooling, spec.

    Subclasses implement ``load`` (reading their checkpoint layout and calling
    ``__init__``), :meth:`tokenize`, :meth:`in_vocabulary` and :meth:`_tokenizer_spec`;
    they may override :meth:`_hidden_index` (which hidden state to pool) and
    :meth:`_pool_mask` (which positions to average).

    Attributes
    ----------
    padding_report
        :class:`~embedder._torch.PaddingReport` accumulated over :meth:`embed` calls.
    options
        The parsed load options.
    """

    pooling_choices: ClassVar[tuple[str, ...]] = ()

    def __init__(self, module: Any, files: Sequence[Path], options: Mapping[str, Any], device: Any) -> None:
        self._module = module
        self._files = sorted(Path(f) for f in files)
        self._hashes: dict[str, str] | None = None
        self.options = dict(options)
        self.device = device
        self.batch_size = int(options["batch_size"])
        self.precision = str(options["precision"])
        self.pooling = str(options["pooling"])
        self.padding_report = PaddingReport()

    @staticmethod
    def resolve_device(device: str | None) -> Any:
        """:func:`~embedder._torch.pick_device`, turning a bad device string into :class:`InputError`."""
        try:
            return pick_device(device)
        except (RuntimeError, ValueError) as exc:
            msg = f"option device={device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', ...)"
            raise InputError(msg) from exc

    # -- model --------------------------------------------------------------------------
    def torch_module(self) -> Any:
        """The loaded ``transformers`` model in the release's layout (``*ForMaskedLM``/``*ForCausalLM``).

        Its ``base_model`` (``bert``/``transformer``/``model``) produces the hidden states
        that are pooled; LoRA adapters injected into it (``peft``) are used by
        :meth:`hidden_states`.
        """
        return self._module

    @property
    def dim(self) -> int:
        """Hidden size of the model (= embedding dimension)."""
        return int(self._module.config.hidden_size)

    def _hidden_index(self) -> int | None:
        """Index into ``hidden_states`` to pool, or None for ``last_hidden_state``."""
        return None

    def _pool_mask(self, tokens: TokenizedCells, attention_mask: np.ndarray) -> np.ndarray:
        """Positions averaged by the pooling (default: every real token)."""
        return attention_mask

    def hidden_states(self, tokens: TokenizedCells) -> Any:
        """Differentiable hidden states ``(n_cells, max_length, dim)`` (grad mode as the caller sets).

        Raises
        ------
        InputError
            When ``tokens`` holds no cell.
        """
        import torch

        if len(tokens) == 0:
            msg = "hidden_states() needs at least one tokenised cell"
            raise InputError(msg)
        ids, mask = tokens.padded()
        input_ids = torch.from_numpy(ids).to(self.device)
        attention = torch.from_numpy(mask).to(self.device)
        layer = self._hidden_index()
        with autocast_context(self.device, self.precision):  # type: ignore[arg-type]
            out = self._module.base_model(
                input_ids=input_ids,
                attention_mask=attention,
                output_hidden_states=layer is not None,
                use_cache=False,
            )
        return out.last_hidden_state if layer is None else out.hidden_states[layer]

    def forward(self, tokens: TokenizedCells) -> Any:
        """Hidden states in inference mode, float32 ``(n_cells, max_length, dim)`` on the device."""
        import torch

        with torch.inference_mode():
            return self.hidden_states(tokens).float()

    def pool_torch(self, hidden: Any, tokens: TokenizedCells) -> Any:
        """Differentiable pooling: masked mean of ``hidden`` ``(n, L, dim)`` → ``(n, dim)``."""
        import torch

        _, mask = tokens.padded()
        sel = torch.from_numpy(self._pool_mask(tokens, mask)).to(hidden.device)
        return masked_mean(hidden.float(), sel)

    def pool(self, hidden: Any, tokens: TokenizedCells) -> np.ndarray:
        """Pooled float32 ``(n_cells, dim)``; cells without genes are NaN."""
        out = self.pool_torch(hidden, tokens).detach().cpu().numpy().astype(np.float32)
        out[np.asarray(tokens.n_genes) == 0] = np.nan
        return out

    def versions(self) -> dict[str, str]:
        """Package versions, plus ``transformers``."""
        import transformers

        return {**super().versions(), "transformers": transformers.__version__}
