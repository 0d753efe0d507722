"""One store, several processes (real subprocesses): writers wait for each other, readers wait for
writers, ``--no-wait`` refuses, and a writer killed with ``kill -9`` leaves no debris behind."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from scdrugmap.cli import main
from scdrugmap.store import Store

CLI = [sys.executable, "-m", "scdrugmap.cli"]
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "SCDRUGMAP_WAIT_TIMEOUT": "120"}


def _cli(*args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *map(str, args)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("concurrency")
    res = CliRunner().invoke(
        main, ["simulate", "--out", str(root / "sim"), "--n-cells", "400", "--n-genes", "1000"]
    )
    assert res.exit_code == 0, res.output
    return root / "sim" / "manifest.csv"


def _halves(manifest: Path, folder: Path) -> tuple[Path, Path]:
    rows = list(csv.DictReader(manifest.open()))
    out = []
    for k, part in enumerate((rows[::2], rows[1::2])):
        path = folder / f"half{k}.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in part:
                w.writerow({**r, "path": str(manifest.parent / r["path"])})
        out.append(path)
    return out[0], out[1]


HOLD = """
import sys, time
from scdrugmap.store import Store
st = Store(sys.argv[1])
with {what}:
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(store: Path, what: str, seconds: float) -> subprocess.Popen:
    """A process holding the store lock (``st.writing()``) or the catalog file (``st.connect()``)."""
    code = HOLD.format(what=what)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(store), str(seconds)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_ingests_on_one_store_both_succeed(sim: Path, tmp_path: Path) -> None:
    a, b = _halves(sim, tmp_path)
    store = tmp_path / "store"
    procs = [_cli("--store", store, "ingest", "--manifest", m) for m in (a, b)]
    results = [_finish(p) for p in procs]
    for code, _out, err in results:
        assert code == 0, err
        assert "Traceback" not in err
    st = Store.open(store)
    ids = sorted(st.datasets()["dataset_id"])
    assert ids == sorted(r["dataset_id"] for r in csv.DictReader(sim.open()))
    assert sorted(p.stem for p in st.datasets_dir.glob("*.h5ad")) == ids
    assert not list(st.datasets_dir.glob(".*"))
    counts = st.query(
        "SELECT COUNT(*) AS n, COUNT(DISTINCT cell_uid) AS u, MAX(cell_uid) AS m FROM cells"
    ).iloc[0]
    assert counts["n"] == counts["u"] == counts["m"] + 1  # cell_uids unique and contiguous


def test_a_writer_waits_for_the_store_lock_and_says_who_holds_it(sim: Path, tmp_path: Path) -> None:
    a, b = _halves(sim, tmp_path)
    store = tmp_path / "store"
    assert CliRunner().invoke(main, ["--store", str(store), "ingest", "--manifest", str(a)]).exit_code == 0
    holder = _hold(store, "st.writing()", 8)  # longer than the CLI's start-up on a busy machine
    t0 = time.monotonic()
    code, _, err = _finish(_cli("--store", store, "ingest", "--manifest", b))
    assert code == 0, err
    assert time.monotonic() - t0 > 1.5
    assert f"store is busy (PID {holder.pid}:" in err
    holder.wait()
    refused = _hold(store, "st.writing()", 30)
    try:
        code, _out, err = _finish(_cli("--store", store, "--no-wait", "ingest", "--manifest", b))
        assert code == 1
        assert err.strip().count("\n") == 0
        assert "busy" in err
        assert f"PID {refused.pid}" in err
        assert "Traceback" not in err
    finally:
        refused.kill()
        refused.wait()


def test_sql_waits_for_a_writer_and_answers(sim: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert CliRunner().invoke(main, ["--store", str(store), "ingest", "--manifest", str(sim)]).exit_code == 0
    holder = _hold(store, "st.connect()", 2.5)  # a writer inside its transaction
    code, out, err = _finish(_cli("--store", store, "sql", "SELECT COUNT(*) AS n FROM cells"))
    assert code == 0, err
    assert f"store is busy (PID {holder.pid}:" in err
    n = Store.open(store).query("SELECT COUNT(*) AS n FROM cells")["n"].iloc[0]
    assert str(n) in out
    holder.wait()
    # and while a real embed runs, every query answers
    embed = _cli("--store", store, "embed", "--model", "hvg", "--no-progress")
    answers = 0
    while embed.poll() is None and answers < 2:
        code, out, err = _finish(_cli("--store", store, "sql", "SELECT COUNT(*) AS n FROM embedded_cells"))
        assert code == 0, err
        answers += 1
    code, out, err = _finish(embed)
    assert code == 0, err
    assert "complete" in out
    assert answers >= 1


KILLED_INGEST = """
import sys, time
import anndata as ad
from scdrugmap.store import Store
from scdrugmap.store.manifest import ingest_manifest

write = ad.AnnData.write_h5ad

def slow_write(self, path, *args, **kwargs):
    write(self, path, *args, **kwargs)
    print("wrote", path, flush=True)
    time.sleep(60)

ad.AnnData.write_h5ad = slow_write
ingest_manifest(Store.open(sys.argv[1], create=True), sys.argv[2])
"""


def test_kill_9_during_manifest_ingest_then_rerun_leaves_no_temporary_file(sim: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_INGEST, str(store), str(sim)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("wrote"), line
    tmp = Path(line.split(" ", 1)[1].strip())
    assert tmp.name.startswith(".")
    assert f".tmp-{proc.pid}" in tmp.name
    assert tmp.exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp.exists()  # the debris the crash left
    code, out, err = _finish(_cli("--store", store, "ingest", "--manifest", sim))
    assert code == 0, err
    assert not tmp.exists()
    assert not [p for p in (store / "datasets").iterdir() if p.name.startswith(".")]
    code, out, err = _finish(_cli("--store", store, "doctor"))
    assert code == 0, out + err
    assert out.strip() == "store is consistent"


def test_two_embeds_of_one_revision_do_not_corrupt_it(sim: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert CliRunner().invoke(main, ["--store", str(store), "ingest", "--manifest", str(sim)]).exit_code == 0
    procs = [_cli("--store", store, "embed", "--model", "pca", "--no-progress") for _ in range(2)]
    results = [_finish(p) for p in procs]
    for code, out, err in results:
        assert code == 0, err
        assert "complete" in out
    assert (
        sorted(int(out.split("; ")[1].split()[0]) for _, out, _ in results)[0] == 0
    )  # the second found them done
    st = Store.open(store)
    n_cells = st.query("SELECT COUNT(*) AS n FROM cells")["n"].iloc[0]
    done = st.query(
        "SELECT revision, COUNT(*) AS n, COUNT(DISTINCT cell_uid) AS u FROM embedded_cells GROUP BY 1"
    )
    assert len(done) == 1
    assert done["n"].iloc[0] == done["u"].iloc[0] == n_cells
