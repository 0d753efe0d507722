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
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _stage(name: str, args: list[str], store: Path, n_cells: int | None = None) -> dict:
    """Run ``scdrugmap ARGS`` under /usr/bin/time -v; wall, peak RSS (incl. children), cells/s."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "scdrugmap.cli", "--store", str(store), *args]
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
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


def matmul_bound(d: int, hidden: int = 512, batch: int = 128) -> dict:
    """GFLOP/s of the MLP head's training matmuls (forward + backward) with 1 and 2 torch threads."""
    import torch

    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        x, w1, w2 = torch.randn(batch, d), torch.randn(d, hidden), torch.randn(hidden, hidden)
        g = torch.randn(batch, hidden)
        reps = 400
        t = time.perf_counter()
        for _ in range(reps):
            h = x @ w1
            h2 = h @ w2
            _ = g @ w2.T, h.T @ g, x.T @ (g @ w2.T)  # backward of both layers
            del h2
        dt = time.perf_counter() - t
        flops = reps * 2 * batch * (d * hidden + hidden * hidden) * 3
        out[f"gflops_{threads}t"] = round(flops / dt / 1e9, 1)
    return out


def head_fold(store: Path, threads: int) -> dict:
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
    train = (plan.cells["fold"].to_numpy() != 0) & ok
    head = make_head(plan.spec.head, seed=0, threads=threads)
    t = time.perf_counter()
    head.fit(X[train], y[train], groups=plan.cells["group"].to_numpy()[train])
    dt = time.perf_counter() - t
    net = head.inner
    d, hidden, batch = X.shape[1], 512, int(net.batch_size)
    flops = net.steps * 2 * batch * (d * hidden + hidden * hidden + hidden * 2) * 3
    return {"cells": int(train.sum()), "steps": int(net.steps), "fit_s": round(dt, 1),
            "gflops": round(flops / dt / 1e9, 1), "threads": threads, "dim": int(d)}  # fmt: skip


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
                )
            )
    if ("mlp" in args.heads.split(",") and "grid" in stages) or "mlpfold" in stages:
        results["matmul"] = matmul_bound(d=50)
        results["mlp_fold"] = [head_fold(store, t) for t in (1, 2)]
        print(json.dumps({"matmul": results["matmul"], "mlp_fold": results["mlp_fold"]}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
