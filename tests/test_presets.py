"""Issue 19: `evaluate --preset scdrugmap2026` (the paper's protocol) on the demo path, its settings stored."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from scdrugmap.cli import main
from scdrugmap.store.catalog import Store


def _cli(*args: str, ok: bool = True):
    res = CliRunner().invoke(main, list(args))
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    """The demo's first steps: simulate → ingest → embed pca (a small collection)."""
    tmp = tmp_path_factory.mktemp("preset")
    store = str(tmp / "store")
    _cli("simulate", "--out", str(tmp / "sim"), "--n-cells", "800")
    _cli("--store", store, "ingest", "--manifest", str(tmp / "sim" / "manifest.csv"))
    _cli("--store", store, "embed", "--model", "pca", "--no-progress")
    return store


@pytest.mark.slow  # about 25 s of CPU (simulate, ingest, embed, 2 × 10 folds); in .ci/run
def test_preset_runs_the_papers_protocol_and_records_it(demo_store):
    out = _cli("--store", demo_store, "evaluate", "--model", "pca", "--preset", "scdrugmap2026",
               "--value", "Cell line", "--side-by-side").output  # fmt: skip
    st = Store.open(demo_store)
    runs = st.query(
        "SELECT run_id, head, grouping, k, protocol, positive_class, spec FROM eval_runs ORDER BY head"
    )
    paper = runs[runs["head"] == "mlp_paper"].iloc[0]
    honest = runs[runs["head"] == "mlp"].iloc[0]
    assert (paper["grouping"], paper["k"], paper["protocol"], paper["positive_class"]) == (
        "cell",
        10,
        "pooled",
        "sensitive",
    )
    preset = json.loads(paper["spec"])["preset"]
    assert preset["name"] == "scdrugmap2026"
    assert (preset["head"], preset["grouping"], preset["k"], preset["metric"]) == (
        "mlp_paper",
        "cell",
        10,
        "f1",
    )
    assert "unweighted mean over the values" in preset["averaging"]
    # the project's defaults ran beside it, on grouped folds, without the preset tag
    assert honest["grouping"] == "sample"
    assert "preset" not in json.loads(honest["spec"])
    f1 = st.query(
        "SELECT AVG(value) FROM metrics WHERE run_id = ? AND metric = 'f1'", [paper["run_id"]]
    ).iloc[0, 0]
    line = next(x for x in out.splitlines() if x.strip().startswith("Cell line") and "  " in x and "0." in x)
    assert f"{f1:.4f}" in line
    assert "(mean over values)" in out
    assert "f1 (defaults: mlp, sample folds)" in out


def test_preset_refuses_a_conflicting_option(tmp_path):
    res = _cli("--store", str(tmp_path / "s"), "evaluate", "--model", "pca", "--preset", "scdrugmap2026",
               "--group", "sample", ok=False)  # fmt: skip
    assert res.exit_code == 2
    assert "--preset scdrugmap2026 sets --group cell" in res.output
    assert not (tmp_path / "s").exists()
