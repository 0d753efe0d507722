"""Cell–cell communication (issue 21): ``analyze ccc`` on a simulated collection with planted cell
types, recomputed from the stored spec; the one-type note; bad input; real PC9 + SCAD A375 (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import shared_path

from scdrugmap.classify.analyze.ccc import recompute, stored_results
from scdrugmap.cli import main
from scdrugmap.store import Store


def _run(args: list[str]):
    return CliRunner().invoke(main, args)


def _ok(args: list[str]) -> str:
    res = _run(args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SIM01 of a 600-cell simulation with 4 planted cell types, ingested and annotated."""
    root = tmp_path_factory.mktemp("ccc")
    _ok(["simulate", "--out", str(root / "sim"), "--n-cells", "600", "--cell-types", "4"])
    path = root / "store"
    for d in ("SIM01",):
        _ok(["--store", str(path), "ingest", str(root / "sim" / f"{d}.h5ad"), "--dataset-id", d, "--label-key",
             "response", "--sample-key", "sample_id", "--meta", "tissue=Cell line"])  # fmt: skip
    _ok(["--store", str(path), "analyze", "celltypes", "annotate", "--dataset", "SIM01"])
    return path


def _latest(st: Store) -> pd.Series:
    return st.query("SELECT * FROM ccc_runs ORDER BY created_at DESC LIMIT 1").iloc[0]


def test_ccc_by_label_is_stored_and_recomputable(store: Path, tmp_path: Path) -> None:
    """Acceptance 1: runs through the CLI, the spec is stored, the stored table is recomputed exactly."""
    out = _ok(["--store", str(store), "analyze", "ccc", "--dataset", "SIM01", "--n-perms", "100", "--out",
               str(tmp_path)])  # fmt: skip
    assert "resistant" in out
    assert "sensitive" in out
    st = Store.open(store)
    run = _latest(st)
    spec = json.loads(run["spec"])
    assert spec["dataset_ids"] == ["SIM01"]
    assert (spec["groupby"], spec["method"], spec["resource"], spec["seed"]) == (
        "label",
        "cellphonedb",
        "consensus",
        0,
    )
    assert json.loads(run["versions"])["liana"]
    assert run["note"] == ""  # 4 planted types: a mixed sample
    stored = stored_results(st, run["ccc_id"])
    assert len(stored) > 20
    assert set(stored["source"]) == {"resistant", "sensitive"}
    again = recompute(st, run["ccc_id"])
    pd.testing.assert_frame_equal(again, stored, check_dtype=False)
    assert (tmp_path / "index.md").read_text().count("Cell–cell communication") == 1
    assert len(list(tmp_path.glob("ccc_SIM01_label.*"))) == 2
    # same options again: the same id, its rows replaced (not duplicated)
    _ok(
        [
            "--store",
            str(store),
            "analyze",
            "ccc",
            "--dataset",
            "SIM01",
            "--n-perms",
            "100",
            "--out",
            str(tmp_path),
        ]
    )
    assert int(
        st.query("SELECT count(*) FROM ccc_results WHERE ccc_id = ?", [run["ccc_id"]]).iloc[0, 0]
    ) == len(stored)


def test_ccc_by_label_and_cell_type(store: Path, tmp_path: Path) -> None:
    out = _ok(["--store", str(store), "analyze", "ccc", "--dataset", "SIM01", "--groupby", "label+cell_type",
               "--method", "rank_aggregate", "--n-perms", "50", "--out", str(tmp_path)])  # fmt: skip
    assert "left out" in out or "|resistant" in out
    st = Store.open(store)
    run = _latest(st)
    groups = json.loads(run["spec"])["groups"]
    assert any(g.startswith("epithelial|") for g in groups)
    res = stored_results(st, run["ccc_id"])
    assert res["source"].str.contains("|", regex=False).all()
    assert res["magnitude"].between(0, 1).all()  # aggregated ranks
    pd.testing.assert_frame_equal(recompute(st, run["ccc_id"]), res, check_dtype=False)


def test_one_type_dataset_says_no_microenvironment(store: Path, tmp_path: Path) -> None:
    """All cells of one type (here: an epithelial-only marker table) → resistant vs sensitive tumour cells."""
    markers = tmp_path / "epi.csv"
    markers.write_text(
        "cell_type,gene\n"
        + "".join(f"epithelial,{g}\n" for g in ("EPCAM", "KRT8", "KRT18", "KRT19", "CDH1", "CLDN4"))
    )
    base = ["--store", str(store)]
    _ok([*base, "analyze", "celltypes", "annotate", "--dataset", "SIM01", "--markers", str(markers), "--method",
         "epi", "--min-score", "-100"])  # fmt: skip
    out = _ok([*base, "analyze", "ccc", "--dataset", "SIM01", "--celltype-method", "epi", "--n-perms", "50", "--out",
               str(tmp_path)])  # fmt: skip
    assert "no microenvironment interaction can be inferred" in out
    assert "(epithelial)" in out
    assert "no microenvironment" in _latest(Store.open(store))["note"]


def test_bad_input_is_refused_and_nothing_is_written(store: Path) -> None:
    st = Store.open(store)
    before = st.query("SELECT (SELECT count(*) FROM ccc_runs) AS r, (SELECT count(*) FROM ccc_results) AS n")
    base = ["--store", str(store), "analyze", "ccc"]
    res = _run([*base, "--dataset", "NOPE"])
    assert res.exit_code != 0
    assert "NOPE" in res.output
    res = _run([*base, "--dataset", "SIM01", "--groupby", "cell_type", "--celltype-method", "nothing"])
    assert res.exit_code != 0
    assert "analyze celltypes" in res.output
    res = _run([*base, "--dataset", "SIM01", "--min-cells", "100000"])
    assert res.exit_code != 0
    assert "at least 2 groups" in res.output
    res = _run([*base, "--dataset", "SIM01", "--resource", "nowhere"])
    assert res.exit_code != 0
    assert "nowhere" in res.output
    after = st.query("SELECT (SELECT count(*) FROM ccc_runs) AS r, (SELECT count(*) FROM ccc_results) AS n")
    pd.testing.assert_frame_equal(before, after)


@pytest.mark.slow
def test_real_pc9_and_scad_a375(tmp_path: Path) -> None:
    """Acceptance 1 on real data: PC9 raw counts (one labelled class: resistant vs the unlabelled replicate;
    one cell type) and SCAD A375 z-scores (shifted per gene, noted)."""
    a375 = shared_path("data", "real", "scad_targets", "SCAD_PLX4720_A375_GSE108383_tp4k_z.h5ad")
    pc9 = shared_path("data", "real", "pc9_erlotinib_d11", "GSE149214_PC9_D11_erlotinib_raw_counts.h5ad")
    base = ["--store", str(tmp_path / "store")]
    _ok([*base, "ingest", str(a375), "--dataset-id", "a375", "--label-key", "label_PLX4720"])
    _ok([*base, "ingest", str(pc9), "--dataset-id", "pc9", "--label-key", "scDEAL_scAdaDrug_label", "--sample-key",
         "batch"])  # fmt: skip
    out = _ok([*base, "analyze", "ccc", "--dataset", "a375", "--out", str(tmp_path / "fig")])
    assert "z-scored input shifted per gene" in out
    res = _run([*base, "analyze", "ccc", "--dataset", "pc9"])
    assert res.exit_code != 0
    assert "--include-unlabelled" in res.output  # one labelled class only
    _ok([*base, "analyze", "celltypes", "annotate", "--dataset", "pc9"])
    out = _ok(
        [*base, "analyze", "ccc", "--dataset", "pc9", "--include-unlabelled", "--out", str(tmp_path / "fig")]
    )
    assert "all cells are of one type (epithelial)" in out
    st = Store.open(tmp_path / "store")
    runs = st.query("SELECT ccc_id, n_cells, note FROM ccc_runs ORDER BY created_at")
    assert len(runs) == 2
    for ccc_id in runs["ccc_id"]:
        stored = stored_results(st, ccc_id)
        assert (stored["specificity"] <= 0.05).sum() > 10
        pd.testing.assert_frame_equal(recompute(st, ccc_id), stored, check_dtype=False)


def test_report_has_the_ccc_figure(store: Path, tmp_path: Path) -> None:
    """Acceptance 1: a figure in the report (dot/heat plot per stored run, proportions per cell type)."""
    if Store.open(store).query("SELECT count(*) FROM ccc_runs").iloc[0, 0] == 0:
        _ok(["--store", str(store), "analyze", "ccc", "--dataset", "SIM01", "--n-perms", "50"])
    _ok(["--store", str(store), "report", "--out", str(tmp_path), "--no-umap"])
    index = (tmp_path / "index.html").read_text()
    assert "Cell context" in index
    assert "Cell–cell communication — SIM01 by label" in index
    assert (tmp_path / "ccc_SIM01_label.png").stat().st_size > 10_000
    assert (tmp_path / "celltype_proportions.svg").exists()
