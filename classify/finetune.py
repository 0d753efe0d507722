"""LoRA fine-tuning per persisted fold (scDrugMap's second training strategy) into the catalog.

For each fold of the SAME persisted fold set the frozen heads use, a freshly loaded backbone
gets LoRA adapters (:mod:`classify.lora`), the MLP head is trained jointly with them on the
training cells (AdamW, cross-entropy, optional gradient accumulation and bf16 autocast on
CUDA), the held-out cells are scored, and adapters + head are saved under
``<store>/lora/<run_id>/fold<k>/``. Runs go to ``eval_runs`` with ``strategy = 'lora'`` and the
LoRA settings in ``head_params``; metrics and predictions as for every other strategy.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np

from scdrugmap.classify.folds import get_fold_set
from scdrugmap.classify.lora import CellSource, LoraSpec, attach_lora, build_head, embed_cells, save_adapter
from scdrugmap.classify.runs import completed_run, run_folds, write_run
from scdrugmap.embedder.base import spec_hash
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError

__all__ = ["finetune", "finetuned_embedder", "predict_cells"]

log = logging.getLogger(__name__)


def _source(store: Store, emb: Any, cells: Any) -> tuple[CellSource, np.ndarray]:
    adatas, valid = {}, np.zeros(len(cells), dtype=bool)
    row = np.zeros(len(cells), dtype=np.int64)
    for ds in cells["dataset_id"].unique():
        a = ad.read_h5ad(store.dataset_file(ds))
        adatas[ds] = a
        pos = {int(u): i for i, u in enumerate(a.obs["cell_uid"])}
        sel = np.flatnonzero(cells["dataset_id"].to_numpy() == ds)
        rows = np.array([pos[int(u)] for u in cells["cell_uid"].to_numpy()[sel]])
        row[sel] = rows
        known = np.asarray(emb.in_vocabulary(a.var), dtype=bool)
        expressed = np.asarray((a.X[:, known] != 0).sum(axis=1)).ravel() > 0
        valid[sel] = expressed[rows]
    return CellSource(adatas, cells["dataset_id"].to_numpy(), row), valid


def _memory_estimate(emb: Any, spec: LoraSpec) -> str:
    module = emb.torch_module()
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    dim = int(emb.dim)
    act = (
        spec.batch_size * 2048 * dim * 4 * 16
    )  # rough upper bound: 2,048 tokens, ~16 activations/token/layer
    return f"peak memory estimate ≈ {(weights + act) / 2**20:,.0f} MiB (weights {weights / 2**20:,.0f} MiB)"


def _train_predict(
    load: Any,
    source: CellSource,
    y: np.ndarray,
    spec: LoraSpec,
    seed: int,
    out_dir: Path,
    meta: dict[str, Any],
):
    """fit_predict callback: one fold = fresh backbone + LoRA + head."""
    import torch

    def fit_predict(train: np.ndarray, test: np.ndarray, fold: int) -> np.ndarray:
        emb = load()
        device = next(emb.torch_module().parameters()).device
        params = attach_lora(emb, spec, seed=seed + fold)
        head = build_head(int(emb.dim), seed=seed + fold, device=device)
        opt = torch.optim.AdamW([*params, *head.parameters()], lr=spec.lr)
        rng = np.random.default_rng(seed + fold)
        if spec.max_train_cells and train.size > spec.max_train_cells:
            train = np.sort(rng.choice(train, size=spec.max_train_cells, replace=False))
        loss_fn = torch.nn.CrossEntropyLoss()
        emb.torch_module().train()
        head.train()
        step = 0
        for _ in range(spec.epochs):
            perm = rng.permutation(train)
            for start in range(0, perm.size, spec.batch_size):
                idx = perm[start : start + spec.batch_size]
                target = torch.from_numpy(y[idx].astype(np.int64)).to(device)
                loss = loss_fn(head(embed_cells(emb, source, idx)), target) / spec.grad_accum
                loss.backward()
                step += 1
                if step % spec.grad_accum == 0:
                    opt.step()
                    opt.zero_grad()
        if step % spec.grad_accum:
            opt.step()
            opt.zero_grad()
        emb.torch_module().eval()
        head.eval()
        save_adapter(emb, head, out_dir / f"fold{fold}", meta={**meta, "fold": fold})
        return predict_cells(emb, head, source, test, batch_size=spec.batch_size)

    return fit_predict


def predict_cells(emb: Any, head: Any, source: CellSource, idx: np.ndarray, *, batch_size: int) -> np.ndarray:
    """Probability of class 1 for cells ``idx`` with a fine-tuned backbone and head (eval mode)."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, idx.size, batch_size):
            logits = head(embed_cells(emb, source, idx[start : start + batch_size]))
            out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def finetune(
    store: Store,
    *,
    model: str,
    checkpoint: str | Path | None,
    protocol: Literal["pooled", "cross"] = "pooled",
    category: str = "tissue",
    value: str,
    grouping: Literal["sample", "cell"] | None = None,
    k: int = 10,
    seed: int = 0,
    lora: LoraSpec | None = None,
    options: dict[str, Any] | None = None,
    positive_class: Literal["sensitive", "resistant"] = "sensitive",
    shots: int = 0,
    rerun: bool = False,
) -> str:
    """LoRA-fine-tune ``model`` + MLP head on each persisted fold of ``category = value``.

    Parameters
    ----------
    store
        The store (datasets must be ingested; no frozen embedding is needed).
    model, checkpoint, options
        Embedder name, checkpoint directory and load options.
    protocol, category, value, grouping, k, seed
        As in :func:`classify.evaluate.evaluate`; the same persisted folds are used.
    lora
        LoRA/training settings (defaults: rank 8, alpha 8, dropout 0.05, adapter's targets).
    positive_class, shots, rerun
        As in :func:`classify.evaluate.evaluate`.

    Returns
    -------
    str
        The run id (``eval_runs.strategy = 'lora'``).

    Raises
    ------
    InputError
        Bad options, a model without a network (pca/hvg), LoRA targets not found.
    """
    from scdrugmap.embedder.base import load_embedder

    opts = dict(options or {})
    if (lora or LoraSpec()).precision != "fp32":
        opts["precision"] = (lora or LoraSpec()).precision

    def load() -> Any:
        return load_embedder(model, checkpoint, **opts)

    probe = load()
    probe.torch_module()  # raises for pca/hvg
    spec = (lora or LoraSpec()).resolved(probe)
    revision = probe.revision()
    fs = get_fold_set(
        store, protocol=protocol, category=category, value=value, grouping=grouping, k=k, seed=seed
    )
    key = {"model": model, "revision": revision, "lora": asdict(spec), "fold_set": fs.fold_set_id, "seed": seed,
           "positive": positive_class, "shots": shots}  # fmt: skip
    run_id = "lora-" + spec_hash(key)
    if completed_run(store, run_id) is not None and not rerun:
        return run_id
    log.warning("%s", _memory_estimate(probe, spec))
    t0 = time.perf_counter()
    source, valid = _source(store, probe, fs.cells)
    if not valid.all():
        log.warning(
            "%d cells have no %s-vocabulary gene expressed and are left out", int((~valid).sum()), model
        )
    cells = fs.cells.loc[valid].reset_index(drop=True)
    source = CellSource(source.adatas, source.dataset[valid], source.row[valid])
    y = (cells["label"] == positive_class).to_numpy().astype(int)
    out_dir = store.path / "lora" / run_id
    meta = {"run_id": run_id, "model": model, "revision": revision, "checkpoint": str(checkpoint), "options": opts,
            "lora": asdict(spec), "seed": seed}  # fmt: skip
    fit_predict = _train_predict(load, source, y, spec, seed, out_dir, meta)
    metrics, preds = run_folds(
        cells["cell_uid"].to_numpy(),
        y,
        cells["fold"].to_numpy(),
        len(fs.fold_names),
        fit_predict,
        shots=shots,
        seed=seed,
    )
    row = {
        "run_id": run_id, "model": model, "revision": revision, "strategy": "lora", "head": "mlp",
        "head_params": json.dumps({"lora": asdict(spec), "head": "mlp d→512→512→2"}), "protocol": protocol,
        "category": category, "value": str(value), "fold_set_id": fs.fold_set_id, "grouping": fs.spec.grouping,
        "k": fs.spec.k, "seed": seed, "positive_class": positive_class, "spec": json.dumps({**key, "options": opts}, default=str),
        "versions": json.dumps(probe.versions()), "n_cells": len(cells), "n_excluded": int((~valid).sum()),
        "status": "complete", "created_at": datetime.now(UTC).replace(tzinfo=None), "duration_s": time.perf_counter() - t0,
    }  # fmt: skip
    write_run(store, row, metrics, preds)
    return run_id


def finetuned_embedder(store: Store, run_id: str, fold: int, *, checkpoint: str | Path | None = None) -> Any:
    """The backbone of a LoRA run's fold with its adapter loaded (own revision: base + adapter hash).

    Parameters
    ----------
    store
        The store holding the run.
    run_id, fold
        A ``strategy = 'lora'`` run and one of its folds.
    checkpoint
        Base checkpoint directory, if it moved since fine-tuning.

    Returns
    -------
    tuple
        ``(embedder, head)``: the embedder embeds like the fine-tuned model (use it with
        :func:`embedder.runner.embed_datasets`); the head is the fold's trained MLP.

    Raises
    ------
    InputError
        Unknown run/fold, or a base checkpoint that no longer matches the run's revision.
    """
    from scdrugmap.classify.lora import load_adapter
    from scdrugmap.embedder.base import load_embedder

    directory = store.path / "lora" / run_id / f"fold{fold}"
    if not (directory / "lora.json").exists():
        msg = f"no saved adapter for run {run_id!r} fold {fold}; see `scdrugmap sql \"SELECT run_id FROM eval_runs WHERE strategy = 'lora'\"`"
        raise InputError(msg)
    meta = json.loads((directory / "lora.json").read_text())
    emb = load_embedder(meta["model"], checkpoint or meta["checkpoint"], **meta["options"])
    if emb.revision() != meta["revision"]:
        msg = f"the base checkpoint now gives revision {emb.revision()}, not {meta['revision']}; give the original --checkpoint"
        raise InputError(msg)
    head = load_adapter(emb, directory, spec=LoraSpec(**{**meta["lora"], "targets": tuple(meta["lora"]["targets"]),
                        "target_parameters": tuple(meta["lora"]["target_parameters"])}), seed=int(meta["seed"]) + fold)  # fmt: skip
    emb.torch_module().eval()
    head.eval()
    return emb, head
