"""Load test of ``POST /predict``: N requests of an h5ad of C cells from K concurrent clients.

Starts ``scdrugmap serve`` on 127.0.0.1 (a free port) over a store — by default a fresh demo
store (simulated, pca + logreg) in a temporary folder — then sends a bounded number of
requests and stops the server. Prints p50/p99 latency, errors, throughput and the server's
resident memory (VmRSS) idle, after one warm-up request and after the run.

    python benchmarks/bench_service.py                      # 200 requests × 500 cells, 8 clients
    python benchmarks/bench_service.py --store S --head RUN --requests 50
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _upload(store: Path, out: Path, n_cells: int, seed: int) -> Path:
    """n_cells cells drawn from the demo's simulated inputs (same genes as the store)."""
    import anndata as ad

    parts = [ad.read_h5ad(p) for p in sorted((store / "demo_input").glob("*.h5ad"))]
    if not parts:
        sys.exit(f"{store}/demo_input has no h5ad files; pass --upload FILE.h5ad")
    whole = ad.concat(parts, join="inner")
    whole.obs_names_make_unique()
    if whole.n_obs < n_cells:
        sys.exit(
            f"only {whole.n_obs} cells available for a {n_cells}-cell upload; use a bigger demo (--demo-cells)"
        )
    keep = np.sort(np.random.default_rng(seed).choice(whole.n_obs, n_cells, replace=False))
    whole[keep].copy().write_h5ad(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--store", type=Path, help="Existing store (default: a fresh demo store in a temp folder)."
    )
    ap.add_argument("--head", help="run_id to apply (default: the demo's pooled 'Cell line' run).")
    ap.add_argument("--upload", type=Path, help="h5ad to send (default: --cells cells of the demo inputs).")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--cells", type=int, default=500)
    ap.add_argument("--demo-cells", type=int, default=1200)
    ap.add_argument("--workers", type=int, default=2, help="Server prediction workers.")
    ap.add_argument("--deadline", type=float, default=1800.0, help="Stop sending after this many seconds.")
    args = ap.parse_args()

    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    store = args.store
    if store is None:
        from scdrugmap.classify.demo import run_demo

        store = tmp / "store"
        t0 = time.perf_counter()
        run_demo(store, n_cells=args.demo_cells, heads=["logreg"], echo=lambda _: None)
        print(f"demo store built in {time.perf_counter() - t0:.0f} s: {store}")
    head = args.head
    if head is None:
        from scdrugmap.store import Store

        head = (
            Store.open(store)
            .query(
                "SELECT run_id FROM eval_runs WHERE protocol = 'pooled' AND strategy = 'frozen' ORDER BY value = 'Cell line' DESC"
            )["run_id"]
            .iloc[0]
        )
    upload = args.upload or _upload(store, tmp / "upload.h5ad", args.cells, seed=0)
    payload = upload.read_bytes()

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "scdrugmap.cli", "--store", str(store), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(args.workers), "--log-level", "warning"],
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            sys.exit("server did not start")
        rss_idle = _rss_mib(server.pid)

        def post(client: httpx.Client) -> tuple[float, int, int]:
            t = time.perf_counter()
            r = client.post(
                f"{base}/predict",
                files={"file": (upload.name, payload, "application/octet-stream")},
                data={"head": head, "wait": "600"},
            )
            n = len(r.json().get("cells", {}).get("obs_name", [])) if r.status_code == 200 else 0
            return time.perf_counter() - t, r.status_code, n

        with httpx.Client(timeout=600) as c:
            warm, code, _ = post(c)
        print(f"warm-up request: {warm:.2f} s (status {code}; trains and saves the final head once)")
        rss_warm = _rss_mib(server.pid)

        lock = threading.Lock()
        sent = 0
        latencies: list[float] = []
        errors: list[str] = []
        t_start = time.perf_counter()

        def client_loop() -> None:
            nonlocal sent
            with httpx.Client(timeout=600) as c:
                while True:
                    with lock:
                        if sent >= args.requests or time.perf_counter() - t_start > args.deadline:
                            return
                        sent += 1
                    try:
                        dt, status, n = post(c)
                    except httpx.HTTPError as exc:
                        with lock:
                            errors.append(type(exc).__name__)
                        continue
                    with lock:
                        if status == 200 and n == args.cells:
                            latencies.append(dt)
                        else:
                            errors.append(f"status {status}, {n} cells")

        threads = [threading.Thread(target=client_loop) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        rss_after = _rss_mib(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    lat = np.array(latencies) if latencies else np.array([np.nan])
    summary = {
        "requests": sent,
        "ok": len(latencies),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "concurrency": args.concurrency,
        "cells_per_request": args.cells,
        "upload_mib": round(len(payload) / 2**20, 2),
        "server_workers": args.workers,
        "p50_s": round(float(np.percentile(lat, 50)), 3),
        "p99_s": round(float(np.percentile(lat, 99)), 3),
        "mean_s": round(float(lat.mean()), 3),
        "wall_s": round(wall, 1),
        "requests_per_s": round(len(latencies) / wall, 2),
        "cells_per_s": round(len(latencies) * args.cells / wall, 1),
        "rss_idle_mib": round(rss_idle, 1),
        "rss_after_warmup_mib": round(rss_warm, 1),
        "rss_after_mib": round(rss_after, 1),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
