"""The service keeps answering while SQL runs, answers 503 (no paths, no pids) for a busy store, and
its filters cannot write."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient
from test_service import demo_store

from scdrugmap.classify.service import create_app
from scdrugmap.classify.service.state import LockedStore
from scdrugmap.store import Store

ROOT = Path(__file__).resolve().parents[1]
SLOW = "SELECT SUM(a.range * b.range) FROM range(1000000) a, range(1000000) b"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_store(tmp_path_factory)


def test_health_answers_within_1s_while_8_slow_queries_run(store_path: Path) -> None:
    with TestClient(create_app(store_path, sql_time_limit_s=2)) as client:
        with ThreadPoolExecutor(8) as pool:
            t0 = time.monotonic()
            futures = [pool.submit(client.post, "/sql", json={"query": SLOW}) for _ in range(8)]
            time.sleep(0.5)
            for _ in range(3):
                t = time.monotonic()
                h = client.get("/health")
                assert h.status_code == 200
                assert time.monotonic() - t < 1.0
                assert h.json()["store"]["datasets"] == 8
                time.sleep(0.3)
            answers = [f.result(timeout=120) for f in futures]
        elapsed = time.monotonic() - t0
    codes = sorted(a.status_code for a in answers)
    assert set(codes) <= {400, 503}, [a.json() for a in answers]
    assert 400 in codes
    for a in answers:
        assert "time limit" in a.json()["detail"] or "busy" in a.json()["detail"]
    assert elapsed < 20  # queued queries are refused, not run one after another for 8 × 2 s


HOLD = """
import sys, time
from scdrugmap.store import Store
with Store(sys.argv[1]).connect():
    print("held", flush=True)
    time.sleep(30)
"""


def test_busy_catalog_gives_503_without_paths_or_pids(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(LockedStore, "busy_timeout_s", 1.0)
    with TestClient(create_app(store_path)) as client:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(store_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout.readline().strip() == "held"
            for res in (client.get("/datasets"), client.post("/sql", json={"query": "SELECT 1"})):
                assert res.status_code == 503, res.text
                detail = res.json()["detail"]
                assert "busy" in detail
                assert str(store_path) not in detail
                assert str(holder.pid) not in detail
                assert "PID" not in detail
                assert sys.executable not in detail
            t = time.monotonic()
            assert client.get("/health").status_code == 200
            assert time.monotonic() - t < 1.0
        finally:
            holder.kill()
            holder.wait()
        assert client.get("/datasets").status_code == 200


def test_service_filters_cannot_write(store_path: Path) -> None:
    before = Store.open(store_path).snapshot()
    with TestClient(create_app(store_path)) as client:
        res = client.get("/datasets", params={"tissue": "x'); DELETE FROM cells; --"})
        assert res.status_code == 200
        assert res.json()["total"] == 0
        res = client.get("/datasets", params={"tissue) OR (1=1": "x"})
        assert res.status_code == 400
        res = client.get("/datasets", params={"order_by": "dataset_id; DELETE FROM cells"})
        assert res.status_code in (400, 422)
        for query in ("SELECT 1; DELETE FROM cells", "DELETE FROM cells", "COPY cells TO '/tmp/x.csv'"):
            res = client.post("/sql", json={"query": query})
            assert res.status_code == 400, res.text
        res = client.get("/runs", params={"model": "pca' OR '1'='1"})
        assert res.status_code == 200
        assert res.json()["total"] == 0
    assert Store.open(store_path).snapshot() == before
