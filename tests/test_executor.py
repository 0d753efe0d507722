"""Scattered embedding (issue 18): local worker processes and Ray actors write the same array as the
single-process runner, survive a killed worker on rerun, and never touch the catalog."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from scdrugmap.cli import main
from scdrugmap.embedder.executor import EmbedJob, embed_shard, make_executor, plan_shards
from scdrugmap.store.catalog import Store
from scdrugmap.store.embeddings import open_embeddings
from scdrugmap.store.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """A simulated 1,200-cell collection (8 datasets) ingested into a store."""
    tmp = tmp_path_factory.mktemp("collection")
    _cli(
        "--store", tmp / "unused", "simulate", "--out", tmp / "sim", "--n-cells", "1200", "--n-genes", "1000"
    )
    _cli("--store", tmp / "store", "ingest", "--manifest", tmp / "sim" / "manifest.csv")
    return tmp / "store"


def _copy(store: Path, dst: Path) -> Path:
    shutil.copytree(store, dst)
    return dst


def _embed(store: Path, *args: str) -> np.ndarray:
    _cli("--store", store, "embed", "--model", "pca", "--no-progress", "--chunk-rows", "64", *args)
    st = Store.open(store)
    row = st.query("SELECT rows_done, rows_selected, status FROM embeddings").iloc[0]
    assert row["status"] == "complete"
    assert row["rows_done"] == row["rows_selected"]
    return np.asarray(open_embeddings(st, "pca").values)


@pytest.mark.slow  # 2 spawned workers (~20 s); .ci/run runs test_executor.py -m slow; .ci/run runs it
def test_local_workers_write_the_serial_array_bit_for_bit(ingested, tmp_path):
    serial = _embed(_copy(ingested, tmp_path / "serial"))
    scattered = _embed(_copy(ingested, tmp_path / "local"), "--workers", "2")
    assert np.isfinite(serial).all()
    np.testing.assert_array_equal(scattered, serial)


def test_shards_follow_chunks_and_workers_never_open_the_catalog(ingested, tmp_path):
    store = _copy(ingested, tmp_path / "s")
    _embed(store)  # fits pca (fits/<revision>.npz) and writes the reference rows
    st = Store.open(store)
    rev = st.query("SELECT revision FROM embeddings").iloc[0, 0]
    ref = np.asarray(open_embeddings(st, "pca").values)
    cells = st.query("SELECT dataset_id, cell_uid FROM cells ORDER BY cell_uid")
    shards = plan_shards(cells, 64)
    assert [s.chunk for s in shards] == sorted({int(u) // 64 for u in cells["cell_uid"]})
    assert sum(s.n_cells for s in shards) == len(cells)
    assert all(int(u) // 64 == s.chunk for s in shards for _, part in s.parts for u in part)
    # a worker needs the dataset copies, the fitted state and the array: not the catalog
    (store / "catalog.duckdb").rename(store / "catalog.moved")
    arr_path = next((store / "embeddings.zarr" / "pca" / rev / "embedding" / "c").iterdir())
    shutil.rmtree(arr_path)  # forget the chunk files of one chunk row-range… then recompute them
    job = EmbedJob(str(store.resolve()), "pca", None, {}, rev, threads=1)
    for shard in shards:
        written = embed_shard(job, shard)
        assert set(written.tolist()) == {int(u) for _, part in shard.parts for u in part}
    (store / "catalog.moved").rename(store / "catalog.duckdb")
    np.testing.assert_array_equal(np.asarray(open_embeddings(Store.open(store), "pca").values), ref)


def test_bad_executor_settings_are_refused():
    with pytest.raises(InputError, match="unknown executor 'spark'"):
        make_executor("spark")
    with pytest.raises(InputError, match="--workers must be ≥ 1"):
        make_executor("local", workers=0)
    with pytest.raises(InputError, match="--address is for --executor ray"):
        make_executor("local", workers=2, address="ray://x:10001")


def _ray_actor_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"_ShardActor" in cmd:
                pids.append(int(proc.name))
    return pids


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _chunk_files(store: Path) -> int:
    return (
        sum(1 for _ in (store / "embeddings.zarr").rglob("c/*/0"))
        if (store / "embeddings.zarr").exists()
        else 0
    )


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["ray", "local"])
def test_killed_worker_then_rerun_gives_the_serial_array(ingested, tmp_path, executor):
    pytest.importorskip("ray") if executor == "ray" else None
    from conftest import model_fixture

    ckpt = model_fixture("tgpt") / "tiny"
    serial_store = _copy(ingested, tmp_path / "serial")
    _cli("--store", serial_store, "embed", "--model", "tgpt", "--checkpoint", ckpt, "--device", "cpu",
         "--no-progress", "--chunk-rows", "16")  # fmt: skip
    serial = np.asarray(open_embeddings(Store.open(serial_store), "tgpt").values)
    store = _copy(ingested, tmp_path / "scattered")
    cmd = [sys.executable, "-m", "scdrugmap.cli", "--store", str(store), "embed", "--model", "tgpt", "--checkpoint",
           str(ckpt), "--device", "cpu", "--no-progress", "--chunk-rows", "16", "--executor", executor,
           "--workers", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    victim = None
    while time.time() < deadline and proc.poll() is None and victim is None:
        if _chunk_files(store) >= 2:
            workers = _ray_actor_pids() if executor == "ray" else _children(proc.pid)
            victim = workers[0] if workers else None
        time.sleep(0.05)
    assert victim is not None, "no worker to kill before the run ended"
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    if proc.returncode != 0:  # the local pool breaks; Ray restarts the actor and retries the shard
        assert b"rerun the same `scdrugmap embed` command" in out, out.decode()[-2000:]
        assert b"Traceback" not in out
    _cli("--store", store, "embed", "--model", "tgpt", "--checkpoint", ckpt, "--device", "cpu",
         "--no-progress", "--executor", executor, "--workers", "2")  # fmt: skip
    st = Store.open(store)
    np.testing.assert_array_equal(np.asarray(open_embeddings(st, "tgpt").values), serial)
    counts = st.query("SELECT COUNT(*) AS n, COUNT(DISTINCT cell_uid) AS u FROM embedded_cells").iloc[0]
    assert counts["n"] == counts["u"] == len(st.query("SELECT 1 FROM cells"))


@pytest.mark.slow
def test_ray_actors_write_the_serial_pca_array(ingested, tmp_path):
    pytest.importorskip("ray")
    serial = _embed(_copy(ingested, tmp_path / "serial"))
    scattered = _embed(_copy(ingested, tmp_path / "ray"), "--executor", "ray", "--workers", "2")
    np.testing.assert_array_equal(scattered, serial)
