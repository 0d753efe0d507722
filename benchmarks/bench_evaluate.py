"""Time pooled ``evaluate`` (mlp and logreg heads) on a simulated 100,000-cell × 50-dim collection.

Builds the collection once (simulate → ingest → embed pca with 50 components) in a store
under ``--workdir`` (reused when present), then times 10-fold pooled evaluation per head on
the largest category value and prints cells/s (cells × folds trained+scored per second is
not used: cells/s = cells in the evaluated population / wall seconds of the whole run).

Usage::

    python benchmarks/bench_evaluate.py [--n-cells 100000] [--workdir /tmp/scdrugmap-bench]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    from scdrugmap.classify.evaluate import evaluate
    from scdrugmap.embedder.runner import embed_datasets
    from scdrugmap.store import Store
    from scdrugmap.store.manifest import ingest_manifest
    from scdrugmap.store.simulate import simulate_collection

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cells", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scdrugmap-bench"))
    ap.add_argument("--heads", default="logreg,mlp")
    ap.add_argument("--category", default="source")
    args = ap.parse_args()

    store_dir = args.workdir / f"store-{args.n_cells}"
    if not (store_dir / "catalog.duckdb").exists():
        t = time.perf_counter()
        manifest = simulate_collection(args.workdir / f"sim-{args.n_cells}", n_cells=args.n_cells, seed=0)
        st = Store.open(store_dir, create=True)
        ingest_manifest(st, manifest)
        print(f"setup: simulate + ingest {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        res = embed_datasets(st, "pca", progress=False, options={"n_comps": 50})
        print(f"setup: embed pca {res.n_done} cells × {res.dim} dims in {time.perf_counter() - t:.1f} s")
    st = Store.open(store_dir)
    counts = st.query(
        f"SELECT d.{args.category} AS v, COUNT(*) AS n FROM cells c JOIN datasets d USING (dataset_id) "
        "WHERE c.label IS NOT NULL GROUP BY 1 ORDER BY 2 DESC"
    )
    value, n = str(counts["v"].iloc[0]), int(counts["n"].iloc[0])
    total = int(st.query("SELECT COUNT(*) AS n FROM cells")["n"].iloc[0])
    print(f"collection: {total} cells; evaluating {args.category} = {value!r} ({n} labelled cells), 10 folds")
    for head in args.heads.split(","):
        t = time.perf_counter()
        evaluate(
            st, model="pca", head=head, protocol="pooled", category=args.category, value=value, rerun=True
        )
        dt = time.perf_counter() - t
        print(f"{head:8s} pooled 10-fold: {dt:7.1f} s  {n / dt:9.0f} cells/s")


if __name__ == "__main__":
    main()
