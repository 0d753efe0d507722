"""Every failure is one clear line: damaged catalog / chunk, full disk, bad values, unknown errors."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner, Result
from synth import toy_adata

from scdrugmap.classify.heads import HEADS, HeadSpec
from scdrugmap.cli import main
from scdrugmap.store import Store
from scdrugmap.store.errors import InputError


def _run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(res: Result, needle: str) -> None:
    assert res.exit_code == 0, res.output
    assert needle in res.output, res.output


def _one_line_error(res: Result, *needles: str) -> str:
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("Error: "), res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated store with a pca embedding."""
    root = tmp_path_factory.mktemp("failures")
    assert _run("simulate", "--out", root / "sim", "--n-cells", "400", "--n-genes", "1000").exit_code == 0
    store = root / "store"
    assert _run("--store", store, "ingest", "--manifest", root / "sim" / "manifest.csv").exit_code == 0
    assert _run("--store", store, "embed", "--model", "pca", "--no-progress").exit_code == 0
    return store


@pytest.fixture
def store(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(built, copy)
    return copy


def test_damaged_catalog_is_one_line(store: Path) -> None:
    with open(store / "catalog.duckdb", "r+b") as f:
        f.write(b"\0" * 12288)
    line = _one_line_error(_run("--store", store, "datasets"), "catalog.duckdb", "damaged")
    assert "backup" in line


def test_damaged_chunk_is_one_line_and_doctor_repairs_it(store: Path) -> None:
    chunks = sorted((store / "embeddings.zarr").rglob("c/0/0"))
    assert chunks
    raw = bytearray(chunks[0].read_bytes())
    raw[8:512] = b"\x07" * 504
    chunks[0].write_bytes(bytes(raw))
    args = ["--store", store, "evaluate", "--model", "pca", "--head", "logreg", "--category", "tissue"]
    _one_line_error(_run(*args, "--group", "cell", "--k", "3"), "embeddings.zarr", "damaged", "doctor")
    res = _run("--store", store, "doctor")
    assert res.exit_code == 1
    assert "damaged chunk" in res.output
    res = _run("--store", store, "doctor", "--repair")
    _ok(res, "[repaired]")
    res = _run("--store", store, "embed", "--model", "pca", "--no-progress")
    _ok(res, "complete")
    assert _run("--store", store, "doctor").output.strip() == "store is consistent"


def test_full_disk_in_process_is_one_line(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import scdrugmap.store.embeddings as embeddings

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(store / "embeddings.zarr"))

    monkeypatch.setattr(embeddings, "write_rows", full)
    monkeypatch.setattr("scdrugmap.embedder.runner.write_rows", full)
    shutil.rmtree(store / "embeddings.zarr")
    args = ["--store", store, "embed", "--model", "hvg", "--no-progress"]
    _one_line_error(_run(*args), "disk full", "free some space")


@pytest.fixture
def tmpfs(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True)
    if ok.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_on_tmpfs_is_one_line(built: Path, tmpfs: Path) -> None:
    store = tmpfs / "store"
    shutil.copytree(built, store, ignore=shutil.ignore_patterns("embeddings.zarr", "fits"))
    filler = tmpfs / "filler"
    free = shutil.disk_usage(tmpfs).free
    filler.write_bytes(b"\0" * max(free - 64 * 1024, 0))
    res = _run("--store", store, "embed", "--model", "hvg", "--no-progress")
    _one_line_error(res, "disk full")
    filler.unlink()
    res = _run("--store", store, "embed", "--model", "hvg", "--no-progress")  # the store survived
    _ok(res, "complete")


def test_unknown_exception_is_a_summary_with_a_traceback_file(
    store: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SCDRUGMAP_LOG_DIR", str(tmp_path / "logs"))

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr("scdrugmap.store.catalog.Store.datasets", boom)
    line = _one_line_error(_run("--store", store, "datasets"), "unexpected RuntimeError: kaboom", "--debug")
    saved = list((tmp_path / "logs").glob("*.txt"))
    assert len(saved) == 1
    assert str(saved[0]) in line
    assert "Traceback" in saved[0].read_text()
    assert "kaboom" in saved[0].read_text()
    res = _run("--debug", "--store", store, "datasets")
    assert isinstance(res.exception, RuntimeError)


def test_out_of_memory_is_one_line(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*_: object, **__: object) -> None:
        raise MemoryError

    monkeypatch.setattr("scdrugmap.store.catalog.Store.datasets", oom)
    _one_line_error(_run("--store", store, "datasets"), "out of memory", "--batch-size")


def test_cuda_without_cuda_is_refused() -> None:
    import torch

    from scdrugmap.embedder._torch import pick_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(InputError, match="unknown --device"):
        pick_device("tpu9")


@pytest.fixture
def h5ad(tmp_path: Path) -> Path:
    path = tmp_path / "d.h5ad"
    toy_adata(seed=4).write_h5ad(path)
    return path


def _ingest(store: Path, path: Path, *extra: str, dataset_id: str = "d1") -> Result:
    base = ["--store", store, "ingest", path, "--dataset-id", dataset_id, "--min-genes", "100"]
    return _run(*base, "--label-key", "response", "--sample-key", "sample", *extra)


def test_bad_ingest_inputs_are_one_line(tmp_path: Path, h5ad: Path) -> None:
    store = tmp_path / "store"
    _one_line_error(_ingest(store, h5ad, "--layer", "nope"), "--layer 'nope' not found")
    a = ad.read_h5ad(h5ad)
    a.layers["counts"] = a.X.copy()
    a.X = None
    nox = tmp_path / "nox.h5ad"
    a.write_h5ad(nox)
    _one_line_error(_ingest(store, nox), "no X matrix", "--layer counts")
    assert _ingest(store, nox, "--layer", "counts").exit_code == 0
    _one_line_error(_ingest(store, h5ad, dataset_id="D" * 500), "characters long")
    res = _ingest(store, h5ad, "--meta", "tissue=A", "--meta", "tissue=B", dataset_id="d2")
    assert res.exit_code != 0
    assert "tissue given twice" in res.output
    a = ad.read_h5ad(h5ad)
    a.obs["empty"] = np.nan
    nolab = tmp_path / "nolab.h5ad"
    a.write_h5ad(nolab)
    res = _run(
        "--store", store, "ingest", nolab, "--dataset-id", "d3", "--label-key", "empty", "--min-genes", "100"
    )
    _one_line_error(res, "no usable label")
    assert Store.open(store).datasets()["dataset_id"].tolist() == ["d1"]


def test_bad_manifests_are_one_line(tmp_path: Path, h5ad: Path) -> None:
    store = tmp_path / "store"
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _one_line_error(_run("--store", store, "ingest", "--manifest", empty), "is empty")
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,dataset_id,label_key,min_genes\n{h5ad},d1,response,lots\n")
    _one_line_error(_run("--store", store, "ingest", "--manifest", bad), "min_genes 'lots' is not an integer")
    assert not store.exists()


def test_predict_into_a_missing_folder_is_refused_first(tmp_path: Path, h5ad: Path) -> None:
    store = tmp_path / "store"
    assert _ingest(store, h5ad).exit_code == 0
    out = tmp_path / "missing" / "out.h5ad"
    res = _run("--store", store, "predict", h5ad, "--head", "no-such-run", "--out", out)
    _one_line_error(res, "does not exist", "mkdir")


EPOCHS_HEAD = "mlp_paper" if "mlp_paper" in HEADS else "mlp"  # the head with a fixed number of epochs


@pytest.mark.parametrize(
    ("head", "param", "needle"),
    [
        (EPOCHS_HEAD, {"epochs": -1}, "epochs must be an integer ≥ 1"),
        ("mlp", {"lr": "abc"}, "lr must be a number > 0"),
        ("mlp", {"batch_size": 0}, "batch_size must be an integer ≥ 1"),
        ("logreg", {"C": float("nan")}, "C must be a number > 0"),
        ("rf", {"depth": 3}, "unknown hyper-parameter"),
        ("lightgbm", {"n_estimators": 2.5}, "n_estimators must be an integer"),
    ],
)
def test_bad_head_parameters_are_refused(head: str, param: dict, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        HeadSpec.create(head, param)
    assert HeadSpec.create(head, {}).name == head


SLOW_QUERY = "SELECT SUM(a.range * b.range) FROM range(1000000) a, range(1000000) b"


def test_sql_time_limit_is_one_line(store: Path) -> None:
    _one_line_error(_run("--store", store, "sql", SLOW_QUERY, "--time-limit", "0.5"), "time limit of 0.5 s")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_sql_ctrl_c_is_one_line(store: Path) -> None:
    import signal
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        # a time limit the query cannot reach before the Ctrl-C
        [sys.executable, "-m", "scdrugmap.cli", "--store", str(store), "sql", SLOW_QUERY, "--time-limit", "600"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as a terminal delivers it: the pytest process may run with SIGINT ignored by then
        # (inherited across exec, so the CLI would never see it), so the child gets the default back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    catalog = os.path.realpath(store / "catalog.duckdb")
    deadline = time.monotonic() + 60
    cpu0 = None
    while time.monotonic() < deadline and proc.poll() is None:  # wait until the query burns CPU
        with contextlib.suppress(OSError):
            fds = [os.readlink(fd) for fd in Path(f"/proc/{proc.pid}/fd").iterdir()]
            if cpu0 is None and any(
                fd.startswith(catalog) for fd in fds
            ):  # "… (deleted)" once tmp is rotated
                cpu0 = _cpu_seconds(proc.pid)
            elif cpu0 is not None and _cpu_seconds(proc.pid) - cpu0 > 0.5:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # never leave a 10-minute query behind on failure
    assert proc.returncode == 130, err
    assert err.strip().startswith("Error: interrupted (Ctrl-C); nothing was half-written")
