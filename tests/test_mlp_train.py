"""The hand-written MLP training step against autograd + torch.optim.AdamW."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from scdrugmap.classify.mlp_train import FlatTrainer  # noqa: E402


def _net(d: int, hidden: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2)
    )


def _autograd_grads(net, xb, yb, weight):
    net.zero_grad()
    nn.CrossEntropyLoss(weight=weight)(net(xb), yb).backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("fused", [True, False])  # the fused kernel and the functional fallback
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n", [32, 19])  # a full batch and a shorter last batch
def test_gradients_and_update_match_autograd(weighted: bool, n: int, fused: bool) -> None:
    rng = np.random.default_rng(0)
    d, hidden = 7, 16
    xb = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    yb = torch.from_numpy(rng.integers(0, 2, n).astype(np.int64))
    weight = torch.tensor([0.6, 2.5]) if weighted else None
    ref, net = _net(d, hidden), _net(d, hidden)
    expected = _autograd_grads(ref, xb, yb, weight)
    trainer = FlatTrainer(net, lr=1e-2, weight_decay=0.01, weight=weight, batch=32)
    trainer._fused = fused and trainer._fused
    trainer.step(xb, yb)
    np.testing.assert_allclose(trainer.grad.numpy(), expected.numpy(), rtol=1e-4, atol=1e-7)
    # AdamW on the flat vector = AdamW on the six tensors, given the same gradients (the first
    # update is about lr * sign(g), so it is compared on identical gradients)
    for p, g in zip(ref.parameters(), trainer.grads, strict=True):
        p.grad = g.clone()
    torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01).step()
    updated = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    np.testing.assert_allclose(trainer.flat.numpy(), updated.numpy(), rtol=0, atol=1e-6)
    # the network itself is untouched until write_back
    assert not torch.equal(torch.cat([p.detach().reshape(-1) for p in net.parameters()]), trainer.flat)
    trainer.write_back()
    with torch.no_grad():
        np.testing.assert_allclose(net(xb).numpy(), trainer.logits(xb).numpy(), atol=1e-6)


def test_training_tracks_autograd_and_learns() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 5)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    ref, net = _net(5, 32), _net(5, 32)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
    trainer = FlatTrainer(net, lr=1e-3, weight_decay=0.01, batch=50)
    before = trainer.loss(Xt, yt)
    for _ in range(5):
        for lo in range(0, 400, 50):
            xb, yb = Xt[lo : lo + 50], yt[lo : lo + 50]
            opt.zero_grad()
            nn.CrossEntropyLoss()(ref(xb), yb).backward()
            opt.step()
            trainer.step(xb, yb)
    after = trainer.loss(Xt, yt)
    with torch.no_grad():
        ref_loss = float(nn.CrossEntropyLoss()(ref(Xt), yt))
    assert after < 0.8 * before
    assert after == pytest.approx(ref_loss, rel=1e-3)


def test_state_and_restore() -> None:
    trainer = FlatTrainer(_net(3, 8), lr=1e-2, weight_decay=0.0, batch=4)
    saved = trainer.state()
    trainer.step(torch.ones(4, 3), torch.tensor([0, 1, 0, 1]))
    assert not torch.equal(saved, trainer.flat)
    trainer.restore(saved)
    assert torch.equal(saved, trainer.flat)


def test_rejects_another_architecture() -> None:
    with pytest.raises(ValueError, match="Linear, ReLU, Linear, ReLU, Linear"):
        FlatTrainer(nn.Sequential(nn.Linear(3, 2)), lr=1e-3, weight_decay=0.0, batch=4)


def test_heads_record_their_training_and_trace_it(tmp_path, monkeypatch) -> None:
    import json

    from scdrugmap.classify.heads import HeadSpec, make_head
    from scdrugmap.classify.mlp_head import TRACE_ENV

    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    rng = np.random.default_rng(2)
    X = rng.normal(size=(600, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    paper = make_head(HeadSpec.create("mlp_paper", {"hidden": 16}), seed=0)
    paper.fit(X, y)
    paper.fit(X, y)  # a refit counts its own steps only
    tuned = make_head(HeadSpec.create("mlp", {"hidden": 16, "min_steps": 40}), seed=0)
    tuned.fit(X, y, groups=rng.integers(0, 12, 600))
    fits = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(fits) == 3
    assert fits[0] == {**fits[1], "fit_s": fits[0]["fit_s"]}
    assert fits[0]["steps"] == paper.inner.steps == 10 * -(-600 // 256)  # 10 epochs of batch 256
    assert (fits[0]["batch"], fits[0]["val_cells"], fits[0]["d"], fits[0]["hidden"]) == (256, 0, 6, 16)
    inner = tuned.inner
    assert fits[2]["steps"] == inner.steps >= 40
    assert fits[2]["epochs"] == inner.epochs_run
    assert 0 < fits[2]["val_cells"] == inner.n_val < 600
    assert inner.steps == inner.epochs_run * -(-(600 - inner.n_val) // inner.batch_run)


@pytest.mark.parametrize("n", [0, 1, 7, 50])
def test_blocked_forward_equals_the_network(n: int, monkeypatch) -> None:
    """The validation forward runs in blocks of rows; every row equals the network's own forward."""
    from scdrugmap.classify import mlp_train

    monkeypatch.setattr(mlp_train, "FORWARD_BLOCK", 7)  # 50 rows: 7 full blocks and a short one
    net = _net(5, 16)
    X = torch.from_numpy(np.random.default_rng(3).normal(size=(n, 5)).astype(np.float32))
    y = torch.from_numpy((np.arange(n) % 2).astype(np.int64))
    trainer = FlatTrainer(net, lr=1e-2, weight_decay=0.0, weight=None, batch=8)
    got = trainer.logits(X)
    assert got.shape == (n, 2)
    with torch.no_grad():
        np.testing.assert_allclose(got.numpy(), net(X).numpy(), rtol=1e-6, atol=1e-6)
        if n:
            expected = float(nn.CrossEntropyLoss()(net(X), y))
            assert trainer.loss(X, y) == pytest.approx(expected, rel=1e-6)
