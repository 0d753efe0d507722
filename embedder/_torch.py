"""Device choice, CUDA out-of-memory back-off, padding-aware batching and masked pooling.

Shared by every torch-based adapter so that each adapter file only holds what is
specific to its model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from scdrugmap.embedder.base import Embedder

__all__ = [
    "PaddingReport",
    "SortedBatchEmbedder",
    "autocast_context",
    "embed_length_sorted",
    "length_sorted_order",
    "masked_mean",
    "pick_device",
    "run_with_oom_backoff",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


def pick_device(device: str | None = None):
    """Return ``torch.device(device)``, or CUDA when available, else CPU.

    Raises
    ------
    InputError
        An unknown device name, or a CUDA device on a machine (or torch build) without CUDA.
    """
    import torch

    from scdrugmap.store.errors import InputError

    if device:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError) as exc:
            msg = f"unknown --device {device!r} ({str(exc).splitlines()[0]}); use cpu, cuda or cuda:N"
            raise InputError(msg) from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            msg = (
                f"--device {device}: CUDA is not available here (no GPU, driver or CUDA build of torch "
                f"{torch.__version__}); use --device cpu or run on a machine with a GPU"
            )
            raise InputError(msg)
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            msg = f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0 … or cpu"
            raise InputError(msg)
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_context(device, precision: Literal["fp32", "bf16", "fp16"] = "fp32"):
    """Autocast context for ``precision`` on CUDA; a no-op context for fp32 or CPU."""
    import contextlib

    import torch

    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def masked_mean(hidden, mask):
    """Mean of ``hidden`` over positions where ``mask`` is true.

    Parameters
    ----------
    hidden
        Tensor ``(batch, seq, dim)``.
    mask
        Tensor ``(batch, seq)``, 1/True for positions to average.

    Returns
    -------
    torch.Tensor
        ``(batch, dim)``; rows with an empty mask are NaN (never silently zero).
    """
    m = mask.to(hidden.dtype).unsqueeze(-1)
    total = (hidden * m).sum(dim=1)
    count = m.sum(dim=1)
    return total / count


def length_sorted_order(lengths: Sequence[int] | np.ndarray, *, window: int) -> np.ndarray:
    """Order cells by descending token length inside consecutive windows of ``window`` cells.

    Sorting within a window (not globally) keeps memory use local while cutting padding.

    Returns
    -------
    numpy.ndarray
        int64 permutation of ``range(len(lengths))``.
    """
    lengths = np.asarray(lengths)
    order = []
    for start in range(0, len(lengths), max(1, window)):
        idx = np.arange(start, min(start + window, len(lengths)))
        order.append(idx[np.argsort(-lengths[idx], kind="stable")])
    return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)


@dataclass
class PaddingReport:
    """Padding tokens with and without length sorting (for the progress report)."""

    padded_unsorted: int = 0
    padded_sorted: int = 0

    def add(self, lengths: np.ndarray, order: np.ndarray, batch_size: int) -> None:
        """Account a window of cells with token ``lengths`` embedded in ``order``."""
        for pos in range(0, len(lengths), batch_size):
            raw = lengths[pos : pos + batch_size]
            srt = lengths[order[pos : pos + batch_size]]
            self.padded_unsorted += int(raw.max() * len(raw) - raw.sum()) if len(raw) else 0
            self.padded_sorted += int(srt.max() * len(srt) - srt.sum()) if len(srt) else 0

    @property
    def saved_fraction(self) -> float:
        """Fraction of padding tokens avoided by sorting."""
        if self.padded_unsorted == 0:
            return 0.0
        return 1.0 - self.padded_sorted / self.padded_unsorted


def run_with_oom_backoff(
    fn: Callable[[Sequence[int]], list[np.ndarray]],
    indices: Sequence[int],
    *,
    batch_size: int,
    min_batch_size: int = 1,
) -> tuple[np.ndarray, int]:
    """Call ``fn`` on consecutive batches of ``indices``; on CUDA OOM halve the batch and go on.

    Parameters
    ----------
    fn
        Maps a batch of cell indices to a list of ``(dim,)`` arrays (one per index).
    indices
        Cells to process, in order.
    batch_size
        Initial batch size.
    min_batch_size
        Below this an out-of-memory error is re-raised.

    Returns
    -------
    tuple
        ``(stacked results (len(indices), dim), final batch size)``.
    """
    import torch

    out: list[np.ndarray] = []
    pos = 0
    bs = max(1, batch_size)
    while pos < len(indices):
        batch = indices[pos : pos + bs]
        try:
            out.extend(fn(batch))
        except torch.OutOfMemoryError:
            if bs <= min_batch_size:
                raise
            torch.cuda.empty_cache()
            bs = max(min_batch_size, bs // 2)
            log.warning("CUDA out of memory; halving the batch size to %d", bs)
            continue
        pos += len(batch)
    if not out:
        return np.zeros((0, 0), dtype=np.float32), bs
    return np.stack(out).astype(np.float32, copy=False), bs


#: ``embed_length_sorted``'s default warning (fields ``name``, ``missing``, ``total``)
NAN_ROWS_WARNING = (
    "%(name)s: %(missing)d of %(total)d cells have no in-vocabulary expressed gene; their embeddings are NaN"
)


def embed_length_sorted(
    adapter,
    tokens,
    *,
    lengths: np.ndarray,
    usable: np.ndarray,
    logger: logging.Logger = log,
    warning: str = NAN_ROWS_WARNING,
) -> np.ndarray:
    """Run ``adapter.forward`` / ``adapter.pool`` over length-sorted batches with OOM back-off.

    Parameters
    ----------
    adapter
        An embedder with ``dim``, ``name``, ``batch_size``, ``padding_report``, ``forward`` and
        ``pool``; ``adapter.batch_size`` is updated to the batch size that fitted.
    tokens
        Tokenized cells offering ``subset(indices)``.
    lengths
        Token length of every cell ``(n,)``.
    usable
        bool ``(n,)``; False rows (no in-vocabulary gene expressed) are NaN.
    logger, warning
        Where and what to log when some rows are NaN; ``warning`` is %-formatted with the
        mapping ``name``, ``missing``, ``total``.

    Returns
    -------
    numpy.ndarray
        float32 ``(n, adapter.dim)`` in input order.
    """
    n = len(lengths)
    out = np.full((n, adapter.dim), np.nan, dtype=np.float32)
    ok = np.flatnonzero(usable)
    if len(ok) < n:
        logger.warning(warning, {"name": adapter.name, "missing": n - len(ok), "total": n})
    if len(ok) == 0:
        return out
    ok_lengths = np.asarray(lengths)[ok]
    order = length_sorted_order(ok_lengths, window=len(ok))
    adapter.padding_report.add(ok_lengths, order, adapter.batch_size)

    def run(batch: Sequence[int]) -> list[np.ndarray]:
        sub = tokens.subset(ok[np.asarray(batch)])
        return list(adapter.pool(adapter.forward(sub), sub))

    res, adapter.batch_size = run_with_oom_backoff(run, order, batch_size=adapter.batch_size)
    out[ok[order]] = res
    return out


class SortedBatchEmbedder(Embedder):
    """Base of the checkpoint adapters whose tokens carry ``n_genes`` and ``lengths``.

    Shares :meth:`embed` (tokenize, then length-sorted mini-batches with CUDA OOM back-off via
    :func:`embed_length_sorted`) and :meth:`spec` (checkpoint file hashes, tokenizer settings,
    pooling, precision — not device or batch size). Subclasses set ``_files``, ``_hashes``
    (None), ``pooling``, ``precision`` and implement :meth:`_tokenizer_spec`.
    """

    _files: Sequence[Any] = ()
    _hashes: dict[str, str] | None = None

    def embed(self, adata: Any) -> np.ndarray:
        """Embed cells: tokenize, then forward/pool in length-sorted mini-batches.

        Returns
        -------
        numpy.ndarray
            float32 ``(adata.n_obs, dim)`` in ``adata`` order; NaN rows (with a warning) for
            cells without any in-vocabulary expressed gene.
        """
        tokens = self.tokenize(adata)
        usable = np.asarray(tokens.n_genes) > 0
        logger = logging.getLogger(type(self).__module__)
        return embed_length_sorted(self, tokens, lengths=tokens.lengths, usable=usable, logger=logger)

    def _tokenizer_spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """Checkpoint file hashes, tokenizer settings, pooling and precision (not device/batch size)."""
        from scdrugmap.embedder.base import hash_files

        if self._hashes is None:
            self._hashes = hash_files(self._files)
        out = {
            "model": self.name,
            "files": self._hashes,
            "tokenizer": self._tokenizer_spec(),
            "pooling": self.pooling,
            "precision": self.precision,
        }
        if self.vocab is not None:
            out["gene_matching"] = self.gene_matching
        return out
