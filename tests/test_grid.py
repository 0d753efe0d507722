"""The evaluation grid (issue 18): many runs in one call, (run × fold) tasks in parallel, the same stored
metrics and predictions as the sequential runs with the same per-task thread count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from scdrugmap.cli import main
from scdrugmap.store.catalog import Store

METRICS = "SELECT r.run_id, m.fold, m.metric, m.value FROM metrics m JOIN eval_runs r USING (run_id) ORDER BY 1, 2, 3"
PREDICTIONS = "SELECT run_id, cell_uid, probability FROM predictions ORDER BY 1, 2"
GRID = [
    "--head",
    "logreg,mlp",
    "--protocol",
    "pooled,cross",
    "--category",
    "tissue",
    "--k",
    "3",
    "--threads",
    "1",
]


def _cli(*args) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    """A simulated 1,200-cell collection with its pca embedding."""
    tmp = tmp_path_factory.mktemp("grid")
    _cli(
        "--store", tmp / "unused", "simulate", "--out", tmp / "sim", "--n-cells", "1200", "--n-genes", "1000"
    )
    _cli("--store", tmp / "store", "ingest", "--manifest", tmp / "sim" / "manifest.csv")
    _cli("--store", tmp / "store", "embed", "--model", "pca", "--no-progress")
    return tmp / "store"


@pytest.fixture(scope="module")
def sequential(embedded, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("seq") / "store"
    shutil.copytree(embedded, store)
    for head in ("logreg", "mlp"):
        for protocol in ("pooled", "cross"):
            _cli("--store", store, "evaluate", "--model", "pca", "--head", head, "--protocol", protocol,
                 "--category", "tissue", "--k", "3", "--threads", "1")  # fmt: skip
    return store


def _same_results(a: Path, b: Path) -> None:
    sa, sb = Store.open(a), Store.open(b)
    ma, mb = sa.query(METRICS), sb.query(METRICS)
    assert len(ma) > 0
    assert ma.equals(mb)
    assert sa.query(PREDICTIONS).equals(sb.query(PREDICTIONS))


@pytest.mark.slow  # with the grid file test ~90 s: run by .ci/run (issue 18 acceptance 2)
def test_local_grid_equals_the_sequential_runs(embedded, sequential, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(embedded, store)
    out = _cli("--store", store, "evaluate", "--model", "pca", *GRID, "--workers", "2")
    _same_results(sequential, store)
    specs = Store.open(store).query("SELECT spec FROM eval_runs")["spec"].map(json.loads)
    assert (specs.map(lambda s: s["threads"]) == 1).all()
    assert len(specs) == out.count(": done (")  # one progress line per run
    # a grid that overlaps a finished one is answered from the catalog for the overlap
    again = _cli("--store", store, "evaluate", "--model", "pca", *GRID, "--workers", "2")
    assert again.count("(from catalog)") == len(specs)
    assert ": done (" not in again


@pytest.mark.slow
def test_grid_file_and_bad_grid_files(embedded, sequential, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(embedded, store)
    grid = tmp_path / "grid.toml"
    grid.write_text(
        'models = ["pca"]\nheads = ["logreg", "mlp"]\nprotocols = ["pooled", "cross"]\n'
        'categories = ["tissue"]\nseeds = [0]\n[options]\nk = 3\n'
    )
    _cli("--store", store, "evaluate", "--grid", grid, "--threads", "1")
    _same_results(sequential, store)
    for text, words in (("models = 'pca'", "models must be a list"), ("colour = [1]", "unknown key"),
                        ("models = [", "not valid TOML")):  # fmt: skip
        grid.write_text(text)
        res = CliRunner().invoke(main, ["--store", str(store), "evaluate", "--grid", str(grid)])
        assert res.exit_code != 0
        assert words in res.output
        assert "Traceback" not in res.output


def test_unknown_head_in_a_grid_is_refused_before_anything_runs(embedded, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(embedded, store)
    before = Store.open(store).query("SELECT COUNT(*) AS n FROM eval_runs").iloc[0, 0]
    res = CliRunner().invoke(
        main, ["--store", str(store), "evaluate", "--model", "pca", "--head", "logreg,svm"]
    )
    assert res.exit_code != 0
    assert "unknown head 'svm'" in res.output
    assert Store.open(store).query("SELECT COUNT(*) AS n FROM eval_runs").iloc[0, 0] == before


@pytest.mark.slow
def test_ray_grid_equals_the_sequential_runs(embedded, sequential, tmp_path):
    pytest.importorskip("ray")
    store = tmp_path / "store"
    shutil.copytree(embedded, store)
    _cli("--store", store, "evaluate", "--model", "pca", *GRID, "--executor", "ray", "--workers", "2")
    _same_results(sequential, store)
