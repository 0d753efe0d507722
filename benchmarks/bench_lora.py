"""LoRA training step time and peak memory per model (tiny fixture checkpoints on CPU; any size on GPU).

For each model whose checkpoint is given (default: the tiny fixtures in ../shared/fixtures/models),
injects LoRA (rank 8) on the default targets, runs ``--steps`` optimisation steps of
backbone + MLP head on a batch of the fixture's cells, and prints ms/step and peak memory
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS growth of the process).

Usage::

    python benchmarks/bench_lora.py [--models geneformer,tgpt] [--batch-size 8] [--steps 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    import tempfile

    import torch

    from scdrugmap.classify.lora import CellSource, LoraSpec, attach_lora, build_head, embed_cells

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="geneformer,tgpt,scgpt,scfoundation,uce,cellplm,scbert,celllm,llm")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from test_lora import _load  # the fixture-based loader of the LoRA tests

    print(f"{'model':14s} {'params':>10s} {'lora':>8s} {'ms/step':>9s} {'peak MiB':>9s}")
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                emb, adata = _load(model, Path(tmp))
            except BaseException as exc:
                print(f"{model:14s} skipped: {exc}")
                continue
            n = min(args.batch_size, adata.n_obs)
            params = attach_lora(emb, LoraSpec().resolved(emb), seed=0)
            device = next(emb.torch_module().parameters()).device
            head = build_head(int(emb.dim), seed=0, device=device)
            opt = torch.optim.AdamW([*params, *head.parameters()], lr=1e-4)
            src = CellSource({"d": adata}, np.full(adata.n_obs, "d"), np.arange(adata.n_obs))
            y = torch.tensor(np.arange(n) % 2, device=device)
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(head(embed_cells(emb, src, np.arange(n))), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() / 2**20
            else:
                peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
            total = sum(p.numel() for p in emb.torch_module().parameters())
            n_lora = sum(p.numel() for p in params)
            print(f"{model:14s} {total:10,d} {n_lora:8,d} {1000 * np.median(times):9.1f} {peak:9.1f}")


if __name__ == "__main__":
    main()
