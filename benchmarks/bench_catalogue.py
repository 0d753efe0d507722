"""Catalogue-scale pipeline: simulate → ingest → embed pca → the evaluation grid, each stage timed.

The collection follows scDrugMap's catalogue (``simulate --catalogue``; scale 1.0 = 495,237 cells,
2.4 ≈ 1.2 M). Every stage runs as its own ``scdrugmap`` process (as a user runs it) under
``/usr/bin/time``, so wall time and peak RSS include everything the stage started (workers too).
The grid is one model (pca) × tissue, cancer type, drug class, regimen × every value × pooled + cross
× the given heads. A matmul microbenchmark of the MLP head's shapes gives the machine's compute
bound; one fold of the ``mlp`` head on the largest tissue is timed and its achieved GFLOP/s compared.

Usage::

    python benchmarks/bench_catalogue.py --scale 1.0 --heads logreg --workers 2 [--executor local|ray]
    python benchmarks/bench_catalogue.py --scale 0.1 --heads logreg,mlp --workers 1,2 --skip-setup

Prints one line per stage (wall s, peak RSS MiB, cells/s) and a JSON summary (``--json FILE``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _stage(
    name: str, args: list[str], store: Path, n_cells: int | None = None, env: dict | None = None
) -> dict:
    """Run ``scdrugmap ARGS`` under /usr/bin/time -v; wall, peak RSS (incl. children), cells/s."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "scdrugmap.cli", "--store", str(store), *args]
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t
    if res.returncode != 0:
        print(res.stdout[-3000:], res.stderr[-3000:])
        msg = f"stage {name} failed ({res.returncode})"
        raise SystemExit(msg)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    out = {
        "stage": name,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(int(rss.group(1)) / 1024) if rss else None,
    }
    if n_cells:
        out["cells_per_s"] = round(n_cells / wall)
    print(json.dumps(out), flush=True)
    return out


def step_flops(d: int, hidden: int = 512, batch: int = 128) -> int:
    """FLOPs of one training step of the ``mlp`` head (d → hidden → hidden → 2) as autograd runs it:
    the forward, and the backward's weight gradients of every layer plus the input gradients of
    layers 2 and 3 (the cells' features need none). Bias, ReLU, loss and optimiser work is not
    counted (it is the overhead the ratio exposes)."""
    return 2 * batch * (2 * d * hidden + 3 * hidden * hidden + 6 * hidden)


def forward_flops(d: int, hidden: int = 512, cells: int = 1) -> int:
    """FLOPs of the head's forward matmuls for ``cells`` cells (the per-epoch validation pass)."""
    return 2 * cells * (d * hidden + hidden * hidden + 2 * hidden)


def mlp_work(trace: Path) -> dict:
    """The matmul work of every MLP fit in a trace (``SCDRUGMAP_MLP_TRACE``, one JSON line per fit):
    training steps (:func:`step_flops` each) plus each epoch's forward of the validation cells."""
    fits = [json.loads(line) for line in trace.read_text().splitlines()]
    flops = sum(
        f["steps"] * step_flops(f["d"], f["hidden"], f["batch"])
        + f["epochs"] * forward_flops(f["d"], f["hidden"], f["val_cells"])
        for f in fits
    )
    return {"fits": len(fits), "steps": sum(f["steps"] for f in fits), "gflop": round(flops / 1e9, 1),
            "fit_s": round(sum(f["fit_s"] for f in fits), 1)}  # fmt: skip


def _matmul_rate(d: int, hidden: int, batch: int, threads: int, seconds: float = 3.0) -> float:
    """GFLOP/s of exactly the step's matmuls (nn.Linear's layouts: ``x @ W.T`` forward, ``g @ W``
    and ``g.T @ h`` backward) with ``threads`` torch threads, repeated for ``seconds``."""
    import torch

    torch.set_num_threads(threads)
    x, g3 = torch.randn(batch, d), torch.randn(batch, 2)
    W1, W2, W3 = torch.randn(hidden, d), torch.randn(hidden, hidden), torch.randn(2, hidden)

    def step() -> None:
        h1 = x @ W1.T
        h2 = h1 @ W2.T
        _ = h2 @ W3.T
        g2 = g3 @ W3
        _ = g3.T @ h2
        g1 = g2 @ W2
        _ = g2.T @ h1
        _ = g1.T @ x

    for _ in range(50):
        step()
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        for _ in range(50):
            step()
        reps += 50
    return reps * step_flops(d, hidden, batch) / (time.perf_counter() - t) / 1e9


def matmul_bound(d: int, hidden: int = 512, batch: int = 128) -> dict:
    """The machine's compute bound for the head: GFLOP/s of the step's matmuls on 1 thread, on
    2 threads, and summed over 2 one-thread processes at once (what the grid's 2 workers get)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    out = {f"gflops_{t}t": round(_matmul_rate(d, hidden, batch, t), 1) for t in (1, 2)}
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        rates = list(pool.map(_matmul_rate, [d] * 2, [hidden] * 2, [batch] * 2, [1, 1]))
    out["gflops_2x1p"] = round(sum(rates), 1)
    return out


def head_fold(store: Path, threads: int, fold: int = 0) -> dict:
    """Train the ``mlp`` head on one pooled fold of the largest tissue: time, steps, achieved GFLOP/s."""
    from scdrugmap.classify.evaluate import embeddings_for, plan_runs
    from scdrugmap.classify.heads import make_head
    from scdrugmap.store.catalog import Store

    st = Store.open(store)
    sizes = st.query(
        "SELECT d.tissue, COUNT(*) n FROM cells c JOIN datasets d USING (dataset_id) WHERE c.label IS NOT NULL "
        "GROUP BY 1 ORDER BY 2 DESC"
    )
    plan = plan_runs(
        st, model="pca", head="mlp", protocol="pooled", category="tissue", value=sizes.iloc[0, 0]
    )[0]
    X, ok = embeddings_for(st, "pca", plan.spec.revision, plan.fs, plan.cells)
    y = (plan.cells["label"] == "sensitive").to_numpy(int)
    train = (plan.cells["fold"].to_numpy() != fold) & ok
    head = make_head(plan.spec.head, seed=0, threads=threads)
    t = time.perf_counter()
    head.fit(X[train], y[train], groups=plan.cells["group"].to_numpy()[train])
    dt = time.perf_counter() - t
    net, d = head.inner, X.shape[1]
    flops = net.steps * step_flops(d, 512, int(net.batch_size))
    # the per-epoch validation pass: a forward of the inner validation cells
    flops += net.epochs_run * forward_flops(d, 512, net.n_val)
    return {"cells": int(train.sum()), "steps": int(net.steps), "epochs": int(net.epochs_run),
            "val_cells": int(net.n_val), "fit_s": round(dt, 1), "gflops": round(flops / dt / 1e9, 1),
            "threads": threads, "dim": int(d)}  # fmt: skip


def head_folds(store: Path) -> list[dict]:
    """One fold on 1 thread, on 2 threads, and two folds at once in two one-thread processes (as the
    grid's 2 workers run them; their GFLOP/s summed)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    out = [head_fold(store, 1), head_fold(store, 2)]
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        pair = list(pool.map(head_fold, [store] * 2, [1, 1], [0, 1]))
    out.append({"pair": pair, "gflops": round(sum(p["gflops"] for p in pair), 1), "threads": "2x1p"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument(
        "--catalogue", type=Path, default=REPO.parent / "shared" / "catalog" / "scdrugmap_datasets.csv"
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scdrugmap-catalogue"))
    ap.add_argument("--heads", default="logreg")
    ap.add_argument("--workers", default="2", help="comma-separated worker counts to compare, e.g. 1,2")
    ap.add_argument("--executor", default="local", help="comma-separated: local,ray")
    ap.add_argument("--skip-setup", action="store_true", help="reuse the store of an earlier run")
    ap.add_argument(
        "--stages",
        default="simulate,ingest,embed,grid",
        help="comma-separated subset of simulate,ingest,embed,grid,mlpfold (e.g. simulate,ingest to prepare a store)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = args.workdir / f"scale-{args.scale}"
    store, sim = work / "store", work / "sim"
    results: dict = {"scale": args.scale, "stages": []}
    stages = set(args.stages.split(",")) - ({"simulate", "ingest", "embed"} if args.skip_setup else set())
    work.mkdir(parents=True, exist_ok=True)
    if "simulate" in stages:
        results["stages"].append(_stage("simulate", ["simulate", "--out", str(sim), "--catalogue", str(args.catalogue),
                                                     "--scale", str(args.scale)], work / "unused"))  # fmt: skip
    if "ingest" in stages:
        results["stages"].append(_stage("ingest", ["ingest", "--manifest", str(sim / "manifest.csv")], store))
    from scdrugmap.store.catalog import Store

    n_cells = int(Store.open(store).query("SELECT COUNT(*) FROM cells").iloc[0, 0])
    results["n_cells"] = n_cells
    if "embed" in stages:
        results["stages"].append(
            _stage("embed pca", ["embed", "--model", "pca", "--no-progress"], store, n_cells)
        )
    grid = ["evaluate", "--model", "pca", "--head", args.heads, "--protocol", "pooled,cross",
            "--category", "tissue,cancer_type,drug_class,regimen"]  # fmt: skip
    for executor in args.executor.split(",") if "grid" in stages else []:
        for workers in (int(w) for w in args.workers.split(",")):
            name = f"grid {args.heads} {executor} x{workers}"
            trace = work / f"mlp-trace-{executor}-{workers}.jsonl"
            trace.unlink(missing_ok=True)
            results["stages"].append(
                _stage(
                    name,
                    [
                        *grid,
                        "--executor",
                        executor,
                        "--workers",
                        str(workers),
                        "--threads",
                        str(max(1, 2 // workers)),
                        "--rerun",
                    ],
                    store,
                    n_cells,
                    env={"SCDRUGMAP_MLP_TRACE": str(trace)},
                )
            )
            if trace.exists():
                results["stages"][-1]["mlp_work"] = mlp_work(trace)
    if ("mlp" in args.heads.split(",") and "grid" in stages) or "mlpfold" in stages:
        results["matmul"] = bound = matmul_bound(d=50)
        results["mlp_fold"] = head_folds(store)
        print(json.dumps({"matmul": results["matmul"], "mlp_fold": results["mlp_fold"]}))
        two_core = max(bound["gflops_2t"], bound["gflops_2x1p"])
        for st in (st for st in results["stages"] if "mlp_work" in st):
            # the grid's compute bound: its matmul work at the 2-core matmul rate
            st["compute_bound_s"] = round(st["mlp_work"]["gflop"] / two_core, 1)
            st["wall_over_bound"] = round(st["wall_s"] / st["compute_bound_s"], 2)
            print(json.dumps(st))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
