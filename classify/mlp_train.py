"""The MLP heads' training step written out by hand: forward, backward and AdamW on one flat buffer.

The heads' network is small (``d → 512 → 512 → 2``) and its batches are small (128 or 256 cells),
so under autograd a step spends about a third of its time outside the eight matrix products that
are its work: the autograd engine, per-parameter bookkeeping and an optimiser loop over six tensors
(``benchmarks/bench_catalogue.py --stages mlpfold``). :class:`FlatTrainer` runs the same
mathematics without autograd:

- forward ``h1 = relu(x W1ᵀ + b1)``, ``h2 = relu(h1 W2ᵀ + b2)``, ``z = h2 W3ᵀ + b3`` into buffers
  allocated once;
- the gradient of the (optionally class-weighted) mean cross-entropy with respect to the logits,
  ``w_i (softmax(z_i) - onehot(y_i)) / Σ w_i`` — exactly what :class:`torch.nn.CrossEntropyLoss`
  differentiates — then the layers' gradients by the chain rule (``threshold_backward`` for ReLU);
- one AdamW update (PyTorch's fused CPU kernel where available) over a single flat vector that
  holds all six parameters, so the update is one kernel call instead of a loop over tensors.

AdamW is elementwise, so one flat vector gives the same update as six tensors; the gradients equal
autograd's up to float rounding (checked in ``tests/test_mlp_train.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = ["FORWARD_BLOCK", "FlatTrainer"]

#: rows per block of a forward pass without gradient (the validation loss): a block's hidden
#: activations (2 × 2,048 × 512 float32) stay in cache; one pass over 134 k cells × 50 dims ran at
#: 159 GFLOP/s instead of 101 on one thread, with the same values
FORWARD_BLOCK = 2048


class FlatTrainer:
    """Train an ``nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)`` by hand-written steps.

    The trainer copies the network's parameters into one flat float32 vector, trains that vector,
    and writes it back into the network with :meth:`write_back`.

    Parameters
    ----------
    net
        The network: three ``nn.Linear`` at positions 0, 2 and 4 (``d → h → h → k``).
    lr, weight_decay
        AdamW's learning rate and decoupled weight decay (applied to every parameter, as
        ``torch.optim.AdamW(net.parameters(), ...)`` does).
    weight
        Class weights ``(k,)`` of the cross-entropy (None: unweighted mean).
    batch
        The largest batch :meth:`step` will see (sizes the work buffers).

    Raises
    ------
    ValueError
        When ``net`` is not of that shape.
    """

    def __init__(
        self,
        net: Any,
        *,
        lr: float,
        weight_decay: float,
        weight: Any = None,
        batch: int,
    ) -> None:
        import torch
        from torch import nn

        layers = [net[i] for i in (0, 2, 4)] if len(net) == 5 else []
        if len(layers) != 3 or not all(isinstance(m, nn.Linear) for m in layers):
            msg = f"FlatTrainer needs Linear, ReLU, Linear, ReLU, Linear; got {net}"
            raise ValueError(msg)
        self.net, self.weight = net, weight
        params = [p for m in layers for p in (m.weight, m.bias)]
        sizes = [p.numel() for p in params]
        self.flat = torch.cat([p.detach().reshape(-1) for p in params]).contiguous()
        self.grad = torch.zeros_like(self.flat)
        spans = list(zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes), strict=True))
        self.views = [self.flat[a:b].view(p.shape) for (a, b), p in zip(spans, params, strict=True)]
        self.grads = [self.grad[a:b].view(p.shape) for (a, b), p in zip(spans, params, strict=True)]
        # AdamW's state for the one flat vector (torch.optim.AdamW's defaults: betas, eps)
        self.lr, self.weight_decay = lr, weight_decay
        self._m, self._v = torch.zeros_like(self.flat), torch.zeros_like(self.flat)
        self._t = torch.zeros((), dtype=torch.float32)
        self._fused = _fused_adamw_available()
        h1, h2, k = (m.out_features for m in layers)
        self._h1, self._g1 = torch.empty(batch, h1), torch.empty(batch, h1)
        self._h2, self._g2 = torch.empty(batch, h2), torch.empty(batch, h2)
        self._z = torch.empty(batch, k)
        self._eye = torch.eye(k)
        self._threshold_backward = torch.ops.aten.threshold_backward.grad_input

    def step(self, xb: Any, yb: Any) -> None:
        """One AdamW step on a batch: ``xb`` ``(n, d)`` float32, ``yb`` ``(n,)`` int64 classes."""
        import torch

        W1, b1, W2, b2, W3, b3 = self.views
        gW1, gb1, gW2, gb2, gW3, gb3 = self.grads
        n = len(yb)
        h1, h2, g1, g2, z = self._h1[:n], self._h2[:n], self._g1[:n], self._g2[:n], self._z[:n]
        with torch.no_grad():
            torch.addmm(b1, xb, W1.T, out=h1).relu_()
            torch.addmm(b2, h1, W2.T, out=h2).relu_()
            torch.addmm(b3, h2, W3.T, out=z)
            g = torch.softmax(z, 1)
            g -= self._eye[yb]
            if self.weight is None:
                g /= n
            else:
                w = self.weight[yb]
                g *= (w / w.sum())[:, None]
            torch.mm(g.T, h2, out=gW3)
            torch.sum(g, 0, out=gb3)
            torch.mm(g, W3, out=g2)
            self._threshold_backward(g2, h2, 0, grad_input=g2)
            torch.mm(g2.T, h1, out=gW2)
            torch.sum(g2, 0, out=gb2)
            torch.mm(g2, W2, out=g1)
            self._threshold_backward(g1, h1, 0, grad_input=g1)
            torch.mm(g1.T, xb, out=gW1)
            torch.sum(g1, 0, out=gb1)
            self._adamw()

    def _adamw(self) -> None:
        """One AdamW update of the flat vector with torch.optim.AdamW's default betas and eps.

        Calls the fused CPU kernel ``torch._fused_adamw_`` directly where this torch has it (what
        ``torch.optim.AdamW(fused=True)`` runs, without its ≈ 0.1–0.2 ms of per-step Python
        bookkeeping), else the public functional ``torch.optim.adamw.adamw``.
        """
        import torch

        if self._fused:
            self._t += 1
            torch._fused_adamw_(
                [self.flat], [self.grad], [self._m], [self._v], [], [self._t],
                lr=self.lr, beta1=0.9, beta2=0.999, weight_decay=self.weight_decay, eps=1e-8,
                amsgrad=False, maximize=False,
            )  # fmt: skip
            return
        from torch.optim.adamw import adamw

        adamw(  # increments the step count self._t itself
            [self.flat], [self.grad], [self._m], [self._v], [], [self._t],
            foreach=False, amsgrad=False, beta1=0.9, beta2=0.999,
            lr=self.lr, weight_decay=self.weight_decay, eps=1e-8, maximize=False,
        )  # fmt: skip

    def logits(self, X: Any) -> Any:
        """Logits ``(n, k)`` of the current parameters for ``X`` ``(n, d)`` (no gradient).

        Computed :data:`FORWARD_BLOCK` rows at a time into reused buffers, so the hidden
        activations stay in cache (each row's values are those of one pass over all rows).
        """
        import torch

        W1, b1, W2, b2, W3, b3 = self.views
        n = int(X.shape[0])
        out = torch.empty((n, W3.shape[0]), dtype=X.dtype)
        block = min(n, FORWARD_BLOCK)
        h1 = torch.empty((block, W1.shape[0]), dtype=X.dtype)
        h2 = torch.empty((block, W2.shape[0]), dtype=X.dtype)
        with torch.no_grad():
            for start in range(0, n, max(1, block)):
                xb = X[start : start + block]
                m = int(xb.shape[0])
                a = torch.addmm(b1, xb, W1.T, out=h1[:m]).relu_()
                c = torch.addmm(b2, a, W2.T, out=h2[:m]).relu_()
                torch.addmm(b3, c, W3.T, out=out[start : start + m])
        return out

    def loss(self, X: Any, y: Any) -> float:
        """The (weighted) mean cross-entropy of the current parameters on ``X``/``y``."""
        import torch

        return float(torch.nn.functional.cross_entropy(self.logits(X), y, weight=self.weight))

    def state(self) -> Any:
        """A copy of the flat parameter vector (for :meth:`restore`)."""
        return self.flat.clone()

    def restore(self, state: Any) -> None:
        """Set the parameters from a :meth:`state` copy."""
        self.flat.copy_(state)

    def write_back(self) -> None:
        """Copy the trained parameters into the network's own parameters."""
        import torch

        params = [p for i in (0, 2, 4) for p in (self.net[i].weight, self.net[i].bias)]
        with torch.no_grad():
            for p, v in zip(params, self.views, strict=True):
                p.copy_(v)


@functools.cache
def _fused_adamw_available() -> bool:
    """Whether this torch has AdamW's fused CPU kernel with the signature used here (torch ≥ 2.4)."""
    import torch

    p, g, m, v, t = torch.zeros(2), torch.ones(2), torch.zeros(2), torch.zeros(2), torch.ones(())
    try:
        torch._fused_adamw_([p], [g], [m], [v], [], [t], lr=0.1, beta1=0.9, beta2=0.999,
                            weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)  # fmt: skip
    except (AttributeError, RuntimeError, TypeError):
        return False
    return bool(torch.all(p < 0))
