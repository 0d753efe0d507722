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
def _shown():
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
    assert all(t.startswith("a") for t in seen["a"][:-1]) and seen["a"][-1] == "a: done"
    assert all(t.startswith("b") for t in seen["b"][:-1]) and seen["b"][-1] == "b: done"
