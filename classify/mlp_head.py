"""The torch MLP heads: ``mlp_paper`` (:class:`MLPHead`, scDrugMap's fixed schedule) and ``mlp``
(:class:`TunedMLPHead`, scDrugMap's network trained to convergence at any data size).

scDrugMap's fixed schedule (lr 1e-4, 10 epochs, batch 256; head ``mlp_paper``) makes about 40
optimiser steps on a thousand cells and leaves the network near its initialisation. This head keeps
the architecture (``d → 512 → 512 → 2``, ReLU, AdamW) and trains it properly:

- an inner validation split of the training side (``val_fraction``) that respects the grouping:
  :class:`sklearn.model_selection.StratifiedGroupKFold` over the groups of the outer folds (samples,
  patients or cells), so early stopping never sees a validation cell whose sample also trains;
- at least ``min_steps`` optimiser steps, at most ``max_epochs`` epochs; after ``min_steps``,
  training stops when the validation loss has not improved for ``patience`` epochs and the weights
  of the best epoch are restored;
- ``class_weight="balanced"`` weights the loss by inverse class frequency (default ``"none"``).

When no inner split with both classes on both sides exists (too few groups), it trains
``min_steps`` steps on the whole training side without early stopping.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Literal

import numpy as np

from scdrugmap.classify.mlp_train import FlatTrainer

__all__ = ["MLPHead", "TunedMLPHead", "inner_split"]

log = logging.getLogger(__name__)


def inner_split(
    y: np.ndarray, groups: np.ndarray | None, *, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Train/validation indices of a grouped, stratified inner split, or None when impossible.

    Parameters
    ----------
    y
        0/1 labels of the training side.
    groups
        Group of each cell (None: every cell its own group).
    val_fraction
        About this fraction of the groups validates (``n_splits = round(1 / val_fraction)``).
    seed
        Shuffling seed.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    n_groups = len(np.unique(groups))
    n_splits = min(max(2, round(1 / val_fraction)), n_groups)
    if n_splits < 2:
        return None
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        for train, val in splitter.split(np.zeros(len(y)), y, groups):
            if np.unique(y[train]).size == 2 and np.unique(y[val]).size == 2:
                return train, val
    except ValueError:
        return None
    return None


#: rows gathered at once by :func:`_batches` (bounds the copy to ≈ 8 k cells × d)
GATHER_ROWS = 8192


def _batches(Xt, yt, perm, batch: int):
    """Yield ``(X[perm[i:i + batch]], y[perm[i:i + batch]])`` for consecutive batches of ``perm``.

    Rows are gathered :data:`GATHER_ROWS` at a time and the batches are contiguous slices of that
    block: one index operation per block instead of two per step (an index was ≈ 6 % of a step of the
    ``mlp`` head). The batches hold exactly the same values as per-step indexing.
    """
    block = max(batch, GATHER_ROWS // batch * batch)
    for lo in range(0, len(perm), block):
        rows = perm[lo : lo + block]
        Xb, yb = Xt[rows], yt[rows]
        for start in range(0, len(rows), batch):
            yield Xb[start : start + batch], yb[start : start + batch]


class MLPHead:
    """scDrugMap's MLP head in torch with its fixed schedule (head ``mlp_paper``; :mod:`classify.heads`)."""

    #: torch intra-op threads while training and predicting (set by :func:`make_head`)
    threads: int = 1

    def __init__(
        self, *, hidden: int, lr: float, epochs: int, batch_size: int, weight_decay: float, seed: int
    ):
        self.hidden, self.lr, self.epochs = hidden, lr, epochs
        self.batch_size, self.weight_decay, self.seed = batch_size, weight_decay, seed
        #: after :meth:`fit`: optimiser steps, epochs trained, their batch size and the cells of
        #: the inner validation split (0 without one)
        self.steps = self.epochs_run = self.batch_run = self.n_val = 0

    def build(self, d: int) -> None:
        """Create the (seeded) network for ``d`` input features."""
        import torch
        from torch import nn

        torch.manual_seed(self.seed)
        self.net = nn.Sequential(
            nn.Linear(d, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, 2),
        )

    def fit(self, X: np.ndarray, y: np.ndarray) -> MLPHead:
        """Train on ``X`` ``(n_cells, d)`` and 0/1 labels ``y`` with :attr:`threads` torch threads
        (default 1: the head's small matmuls gain little from more; the evaluation grid gives each
        task its share of the cores instead)."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        # AdamW's second moments of rarely-active weights decay into subnormal floats, which made
        # its update 3 × slower on x86; flushed to zero while training (torch's default is off)
        torch.set_flush_denormal(True)
        self.steps, start = 0, time.perf_counter()
        try:
            self._fit(X, y)
        finally:
            torch.set_num_threads(threads)
            torch.set_flush_denormal(False)
        _trace(self, X.shape[1], time.perf_counter() - start)
        return self

    def _fit(self, X: np.ndarray, y: np.ndarray) -> MLPHead:
        import torch

        gen = torch.Generator().manual_seed(self.seed)
        self.build(X.shape[1])
        trainer = FlatTrainer(self.net, lr=self.lr, weight_decay=self.weight_decay, batch=self.batch_size)
        Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
        for _ in range(self.epochs):
            perm = torch.randperm(len(Xt), generator=gen)
            for xb, yb in _batches(Xt, yt, perm, self.batch_size):
                trainer.step(xb, yb)
                self.steps += 1
        self.epochs_run, self.batch_run = self.epochs, self.batch_size
        trainer.write_back()
        self.net.eval()
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            logits = self.net(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))
            return torch.softmax(logits, dim=1).numpy().astype(np.float64)


class TunedMLPHead(MLPHead):
    """scDrugMap's MLP with early stopping on a grouped inner split (see module docstring)."""

    accepts_groups = True

    def __init__(
        self,
        *,
        hidden: int,
        lr: float,
        batch_size: int,
        weight_decay: float,
        max_epochs: int,
        min_steps: int,
        patience: int,
        val_fraction: float,
        class_weight: Literal["none", "balanced"],
        seed: int,
    ) -> None:
        super().__init__(
            hidden=hidden,
            lr=lr,
            epochs=max_epochs,
            batch_size=batch_size,
            weight_decay=weight_decay,
            seed=seed,
        )
        self.min_steps, self.patience, self.val_fraction = min_steps, patience, val_fraction
        self.class_weight = class_weight
        self.groups: np.ndarray | None = None
        self.best_epoch = -1

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> TunedMLPHead:
        """Train on ``X``/``y``; ``groups`` (one per cell) keep the inner split grouped."""
        self.groups = groups
        super().fit(X, y)
        return self

    def _fit(self, X: np.ndarray, y: np.ndarray) -> TunedMLPHead:
        import torch

        y = np.asarray(y, dtype=np.int64)
        split = inner_split(y, self.groups, val_fraction=self.val_fraction, seed=self.seed)
        train, val = split if split is not None else (np.arange(len(y)), None)
        if split is None:
            log.info(
                "mlp: no grouped inner split with both classes; %d steps without early stopping",
                self.min_steps,
            )
        gen = torch.Generator().manual_seed(self.seed)
        self.build(X.shape[1])
        Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        yt = torch.from_numpy(y)
        weight = None
        if self.class_weight == "balanced":
            counts = np.bincount(y[train], minlength=2).astype(np.float32)
            weight = torch.from_numpy(len(train) / (2 * np.maximum(counts, 1)))
        tr = torch.from_numpy(train)
        batch = self.batch_run = min(self.batch_size, max(16, len(train) // 4))
        trainer = FlatTrainer(
            self.net, lr=self.lr, weight_decay=self.weight_decay, weight=weight, batch=batch
        )
        per_epoch = -(-len(train) // batch)
        epochs = max(self.epochs, -(-self.min_steps // per_epoch)) if val is None else self.epochs
        best, best_state, since = np.inf, None, 0
        Xval, yval = (Xt[val], yt[val]) if val is not None else (None, None)
        self.n_val = 0 if val is None else len(val)
        for epoch in range(epochs):
            self.epochs_run = epoch + 1
            perm = tr[torch.randperm(len(tr), generator=gen)]
            for xb, yb in _batches(Xt, yt, perm, batch):
                trainer.step(xb, yb)
                self.steps += 1
            if val is None:
                if self.steps >= self.min_steps:
                    break
                continue
            v = trainer.loss(Xval, yval)
            if v < best - 1e-4:
                best, since, self.best_epoch = v, 0, epoch
                best_state = trainer.state()
            else:
                since += 1
            if self.steps >= self.min_steps and since >= self.patience:
                break
        if best_state is not None:
            trainer.restore(best_state)
        trainer.write_back()
        self.net.eval()
        return self


#: environment variable naming a JSON-lines file that every MLP fit appends its training facts to
#: (steps, epochs, batch, validation cells, d, hidden, seconds); set by
#: ``benchmarks/bench_catalogue.py`` to count the grid's work, inherited by the grid's workers
TRACE_ENV = "SCDRUGMAP_MLP_TRACE"


def _trace(head: MLPHead, d: int, seconds: float) -> None:
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    facts = {"steps": head.steps, "epochs": head.epochs_run, "batch": head.batch_run,
             "val_cells": head.n_val, "d": int(d), "hidden": head.hidden, "fit_s": round(seconds, 3)}  # fmt: skip
    with open(path, "a", encoding="utf-8") as fh:  # one short line per write: appends do not interleave
        fh.write(json.dumps(facts) + "\n")
