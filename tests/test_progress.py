"""Progress of long steps (issue 20): plain lines on stderr, ``--quiet``, and the web jobs' progress."""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from scdrugmap import cli
from scdrugmap.store import progress as prog


@pytest.fixture(autouse=True)
def _shown(monkeypatch: pytest.MonkeyPatch):
    """Progress shown at once (the small stores here finish before the default delay)."""
    monkeypatch.setattr(prog, "DELAY_S", 0.0)
    prog.configure(enabled=True)
    yield
    prog.configure(enabled=True)


# ---- the module ------------------------------------------------------------------------------
def test_plain_lines_on_stderr_never_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(prog.track(range(20), "evaluate", unit="folds")) == list(range(20))
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == "evaluate: 2/20 folds (10%)"  # one line at every tenth of the way
    assert "evaluate: 10/20 folds (50%)" in lines
    assert len(lines) == 10  # nine tenths + the final line
    assert re.fullmatch(r"evaluate: 20/20 folds \(100%\) in \d+\.\d s", lines[-1])


def test_quick_loops_print_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(prog, "DELAY_S", 60.0)
    list(prog.track(range(50), "quick"))
    assert capsys.readouterr().err == ""


def test_stage_unknown_total_and_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    with prog.progress("ingest", None, unit="datasets") as p:
        p.update(stage="reading SIM01")
        p.update(stage="reading SIM02")  # unknown total: a line at most every few seconds
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "ingest: 1 datasets – reading SIM01"
    assert re.fullmatch(r"ingest: 2 datasets in \d+\.\d s", lines[1])
    assert len(lines) == 2
    prog.configure(enabled=False)
    list(prog.track(range(3), "quiet"))
    assert capsys.readouterr().err == ""


def test_quiet_also_hides_download_lines(capsys: pytest.CaptureFixture[str]) -> None:
    from scdrugmap.store.fetch import _Progress

    prog.configure(enabled=False)
    _Progress("f.tar", 100, 0, True).update(100)
    assert capsys.readouterr().err == ""
    prog.configure(enabled=True)
    _Progress("f.tar", 100, 0, True).update(100)
    assert "f.tar: 100% of 100 bytes" in capsys.readouterr().err


def test_callback_gets_the_nested_fraction(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[tuple[float, str]] = []
    with prog.report_to(lambda f, t: seen.append((f, t))):
        with prog.progress("job", 2, unit="steps") as outer:
            outer.set_stage("scoring")
            for _ in prog.track(range(4), "cells", unit="batches"):
                pass
            outer.update(stage="writing")
            outer.update()
    assert capsys.readouterr().err == ""  # the callback replaces stderr
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions)  # never goes back
    assert (0.25, "job 0/2 steps: scoring › cells 2/4 batches") in seen  # (0 + 2/4) / 2
    assert seen[-1] == (1.0, "job: done")
    # outside the block: stderr again
    list(prog.track(range(1), "after"))
    assert "after: 1/1 steps (100%)" in capsys.readouterr().err


def test_each_thread_has_its_own_sink() -> None:
    seen: dict[str, list[str]] = {"a": [], "b": []}

    def work(name: str) -> None:
        with prog.report_to(lambda f, t: seen[name].append(t)):
            for _ in prog.track(range(3), name):
                time.sleep(0.01)

    threads = [threading.Thread(target=work, args=(n,)) for n in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(t.startswith("a") for t in seen["a"][:-1])
    assert seen["a"][-1] == "a: done"
    assert all(t.startswith("b") for t in seen["b"][:-1])
    assert seen["b"][-1] == "b: done"


# ---- the commands ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the session's demo store (1,200 cells, pca, logreg runs)."""
    from test_service import demo_store

    path = tmp_path_factory.mktemp("progress") / "store"
    shutil.copytree(demo_store(tmp_path_factory), path)
    return path


def _cli(*args: object, ok: bool = True):
    res = CliRunner().invoke(cli.main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def test_evaluate_reports_folds_on_stderr_and_quiet_hides_them(demo: Path) -> None:
    args = ["--store", demo, "evaluate", "--model", "pca", "--head", "logreg", "--k", "4", "--value", "Cell line",
            "--seed", "7"]  # fmt: skip
    res = _cli(*args)
    assert "evaluate: 4/4 folds (100%) in" in res.stderr
    assert "folds (" in res.stderr
    assert "evaluate:" not in res.stdout  # stdout keeps only the table
    again = _cli(args[0], args[1], "--quiet", *args[2:], "--rerun")
    assert "folds" not in again.stderr
    assert again.stdout.splitlines()[-1] == res.stdout.splitlines()[-1]  # the same result row


def test_predict_and_report_show_their_steps(demo: Path, tmp_path: Path) -> None:
    from test_service import pooled_run, upload_file

    cells = upload_file(demo, tmp_path / "cells.h5ad", n_cells=120)
    res = _cli("--store", demo, "predict", cells, "--head", pooled_run(demo), "--out", tmp_path / "o.h5ad")
    assert "predict: 1/5 steps (20%) – reading the file and QC" in res.stderr
    assert re.search(r"^predict: 5/5 steps \(100%\) in \d+\.\d s$", res.stderr, re.M)
    assert "predict:" not in res.stdout
    rep = _cli("--store", demo, "report", "--out", tmp_path / "rep", "--no-umap")
    assert re.search(r"^report: 1/\d+ steps \(\d+%\)$", rep.stderr, re.M)
    assert "steps (100%) in" in rep.stderr
    assert "report:" not in rep.stdout


def test_ingest_manifest_counts_datasets(demo: Path, tmp_path: Path) -> None:
    files = sorted((demo / "demo_input").glob("SIM0[12].h5ad"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,dataset_id,label_key,sample_key,min_genes\n" + "".join(
        f"{f},{f.stem},response,sample_id,10\n" for f in files))  # fmt: skip
    res = _cli("--store", tmp_path / "s", "ingest", "--manifest", manifest)
    assert "ingest: 1/3 steps (33%) – reading SIM02" in res.stderr
    assert "ingest: 3/3 steps (100%) in" in res.stderr
    assert "ingest:" not in res.stdout


# ---- the web page's jobs -------------------------------------------------------------------------
def test_job_status_reports_the_running_fraction() -> None:
    from scdrugmap.classify.service.jobs import JobManager

    jobs = JobManager(workers=1)
    halfway, go_on = threading.Event(), threading.Event()

    def work(job) -> None:
        with prog.progress("prediction job", 4, unit="steps") as bar:
            bar.update(stage="scoring")
            for i in prog.track(range(2), "cells", unit="batches"):
                if i == 1:
                    halfway.set()
                    assert go_on.wait(30)

    try:
        job = jobs.create("run-x", "cells.h5ad")
        future = jobs.start(job, work)
        assert halfway.wait(30)
        running = job.to_dict()
        assert running["status"] == "running"
        assert running["progress"] == pytest.approx((1 + 1 / 2) / 4)  # step 1 done, 1 of 2 batches
        assert running["progress_detail"] == "prediction job 1/4 steps: scoring › cells 1/2 batches"
        go_on.set()
        future.result(timeout=30)
        done = job.to_dict()
        assert (done["status"], done["progress"], done["progress_detail"]) == ("done", 1.0, "done")
    finally:
        go_on.set()
        jobs.close()


def test_prediction_job_records_its_steps(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient
    from test_service import pooled_run, upload_file

    from scdrugmap.classify.service import create_app
    from scdrugmap.classify.service.jobs import Job

    seen: list[tuple[float, str]] = []
    record = Job.record

    def spy(self: Job, fraction: float, detail: str) -> None:
        seen.append((fraction, detail))
        record(self, fraction, detail)

    monkeypatch.setattr(Job, "record", spy)
    cells = upload_file(demo, tmp_path / "cells.h5ad", n_cells=100, seed=3)
    with TestClient(create_app(demo, max_upload_mb=4)) as client, open(cells, "rb") as fh:
        r = client.post(
            "/predict", files={"file": ("cells.h5ad", fh)}, data={"head": pooled_run(demo), "wait": "0"}
        )
        assert r.status_code in (200, 202), r.text
        job = r.json()["job_id"]
        for _ in range(600):
            status = client.get(f"/jobs/{job}").json()
            assert 0.0 <= status["progress"] <= 1.0
            if status["status"] in ("done", "failed"):
                break
            time.sleep(0.1)
    assert status["status"] == "done", status
    assert status["progress"] == 1.0
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions)  # the page's bar never goes back
    details = " | ".join(d for _, d in seen)
    assert (
        "prediction job 1/3 steps: QC, embedding and scoring › predict 2/5 steps: embedding and scoring"
        in details
    )
    assert "› predict: cells 1/1 batches" in details
    assert seen[-1] == (1.0, "prediction job: done")
