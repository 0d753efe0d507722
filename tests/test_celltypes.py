"""Cell-type context (issue 21): marker annotation recovers the simulator's planted types, the
resistant/sensitive make-up per type (CLI and page), and evaluate's per-cell-type metrics."""

from __future__ import annotations

import functools
import operator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scdrugmap.classify.analyze.celltypes import UNASSIGNED, annotate, load_markers
from scdrugmap.cli import main
from scdrugmap.store import Store

DATASETS = ("SIM01", "SIM03")


def _run(args: list[str]):
    return CliRunner().invoke(main, args)


def _ok(args: list[str]) -> str:
    res = _run(args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def typed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """3 datasets of a 600-cell simulation with 5 planted cell types, ingested through the CLI."""
    root = tmp_path_factory.mktemp("celltypes")
    _ok(["simulate", "--out", str(root / "sim"), "--n-cells", "600", "--cell-types", "5"])
    store = root / "store"
    for d in DATASETS:
        _ok(["--store", str(store), "ingest", str(root / "sim" / f"{d}.h5ad"), "--dataset-id", d, "--label-key",
             "response", "--sample-key", "sample_id", "--meta", "tissue=Cell line"])  # fmt: skip
    return store, root / "sim"


def _truth(sim: Path) -> pd.Series:
    return pd.concat([ad.read_h5ad(sim / f"{d}.h5ad").obs["cell_type"].astype(str) for d in DATASETS])


def test_annotation_recovers_planted_types(typed: tuple[Path, Path]) -> None:
    """Acceptance 2 (first half): ≥ 0.8 of the cells get their planted type."""
    store, sim = typed
    out = _ok(
        [
            "--store",
            str(store),
            "analyze",
            "celltypes",
            "annotate",
            *functools.reduce(operator.iadd, [["--dataset", d] for d in DATASETS], []),
        ]
    )
    assert "epithelial" in out
    assert "frac_resistant" in out
    got = (
        Store.open(store)
        .query(
            "SELECT c.obs_name, t.cell_type FROM cell_types t JOIN cells c USING (cell_uid) WHERE t.method = 'markers'"
        )
        .set_index("obs_name")["cell_type"]
    )
    truth = _truth(sim).reindex(got.index)
    assert truth.notna().all()
    accuracy = float((got == truth).mean())
    print(f"planted cell types recovered: accuracy {accuracy:.3f} over {len(got)} cells")
    assert accuracy >= 0.8
    for t in ("epithelial", "T cell", "myeloid", "fibroblast", "endothelial"):  # every planted type is found
        assert ((got == t) & (truth == t)).sum() >= 0.7 * (truth == t).sum()


def test_proportions_table_counts_labels_per_type(typed: tuple[Path, Path]) -> None:
    store, _ = typed
    out = _ok(["--store", str(store), "analyze", "celltypes", "proportions", "--dataset", "SIM01"])
    assert "share_of_resistant" in out
    assert "SIM03" not in out
    st = Store.open(store)
    from scdrugmap.classify.analyze.celltypes import cell_type_proportions

    props = cell_type_proportions(st, dataset_ids=["SIM01"])
    raw = st.query(
        "SELECT t.cell_type, c.label FROM cell_types t JOIN cells c USING (cell_uid) WHERE c.dataset_id = 'SIM01'"
    )
    for r in props.itertuples():
        part = raw[raw["cell_type"] == r.cell_type]
        assert r.n_resistant == (part["label"] == "resistant").sum()
        assert r.n_sensitive == (part["label"] == "sensitive").sum()
    assert props["share_of_resistant"].sum() == pytest.approx(1.0)
    assert ((props["frac_resistant"] >= 0) & (props["frac_resistant"] <= 1)).all()


def test_bad_input_is_refused_and_nothing_is_written(typed: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = typed
    st = Store.open(store)
    before = int(st.query("SELECT count(*) FROM cell_types").iloc[0, 0])
    res = _run(["--store", str(store), "analyze", "celltypes", "annotate", "--dataset", "NOPE"])
    assert res.exit_code != 0
    assert "NOPE" in res.output
    bad = tmp_path / "markers.csv"
    bad.write_text("type,symbol\nT cell,CD3D\n")
    res = _run(
        [
            "--store",
            str(store),
            "analyze",
            "celltypes",
            "annotate",
            "--dataset",
            "SIM01",
            "--markers",
            str(bad),
        ]
    )
    assert res.exit_code != 0
    assert "cell_type,gene" in res.output
    bad.write_text("cell_type,gene\nalien,XYZ1\nalien,XYZ2\n")
    res = _run(
        [
            "--store",
            str(store),
            "analyze",
            "celltypes",
            "annotate",
            "--dataset",
            "SIM01",
            "--markers",
            str(bad),
        ]
    )
    assert res.exit_code != 0
    assert "HGNC" in res.output
    res = _run(["--store", str(store), "analyze", "celltypes", "proportions", "--method", "nothing"])
    assert res.exit_code != 0
    assert "annotate" in res.output
    assert int(st.query("SELECT count(*) FROM cell_types").iloc[0, 0]) == before


def test_simulate_refuses_too_many_cell_types(tmp_path: Path) -> None:
    res = _run(["simulate", "--out", str(tmp_path / "sim"), "--n-cells", "400", "--cell-types", "11"])
    assert res.exit_code != 0
    assert "cell_types=11" in res.output
    assert not (tmp_path / "sim" / "manifest.csv").exists()


def test_annotate_anndata_threshold_and_skipped_types() -> None:
    """The public function on an AnnData: marker-high cells get their type, flat cells 'unassigned'."""
    rng = np.random.default_rng(0)
    markers = load_markers()
    genes = [*markers["T cell"], *markers["B cell"], *[f"G{i}" for i in range(300)]]
    X = rng.poisson(1.0, (90, len(genes))).astype(np.float32)
    X[:30, : len(markers["T cell"])] += 20
    X[30:60, len(markers["T cell"]) : len(markers["T cell"]) + len(markers["B cell"])] += 20
    adata = ad.AnnData(sp.csr_matrix(np.log1p(X)), var=pd.DataFrame(index=genes))
    res = annotate(adata, min_score=0.5)
    assert (res.labels["cell_type"].iloc[:30] == "T cell").all()
    assert (res.labels["cell_type"].iloc[30:60] == "B cell").all()
    assert (res.labels["cell_type"].iloc[60:] == UNASSIGNED).mean() > 0.8
    assert "myeloid" in res.skipped
    assert set(res.scores.columns) == {"T cell", "B cell"}


def test_bundled_markers_are_unique_and_cited() -> None:
    markers = load_markers()
    genes = [g for gs in markers.values() for g in gs]
    assert len(markers) == 10
    assert len(genes) == len(set(genes))
    notice = (Path(__file__).parents[1] / "classify" / "analyze" / "data" / "NOTICE").read_text()
    assert "PanglaoDB" in notice
    assert "CellMarker 2.0" in notice
    assert "MIT" in notice


def test_evaluate_by_cell_type(typed: tuple[Path, Path]) -> None:
    store, _ = typed
    base = ["--store", str(store)]
    _ok([*base, "analyze", "celltypes", "annotate", "--dataset", "SIM01", "--dataset", "SIM03"])
    _ok([*base, "embed", "--model", "pca", "--no-progress"])
    out = _ok([*base, "evaluate", "--model", "pca", "--head", "logreg", "--protocol", "pooled", "--category",
               "tissue", "--value", "Cell line", "--k", "3", "--by-cell-type", "markers"])  # fmt: skip
    section = out.split("Per cell type (markers annotation")[1]
    assert "epithelial" in section
    assert "auroc" in section
    from scdrugmap.classify.analyze.celltypes import cell_type_metrics

    st = Store.open(store)
    run_id = st.query("SELECT run_id FROM eval_runs ORDER BY created_at DESC LIMIT 1").iloc[0, 0]
    df = cell_type_metrics(st, run_id)
    assert df.groupby("cell_type")["n_cells"].first().sum() == int(
        st.query("SELECT count(*) FROM predictions WHERE run_id = ?", [run_id]).iloc[0, 0]
    )
    res = _run([*base, "evaluate", "--model", "pca", "--head", "logreg", "--protocol", "pooled", "--category",
                "tissue", "--value", "Cell line", "--k", "3", "--by-cell-type", "nothing"])  # fmt: skip
    assert res.exit_code != 0
    assert "celltypes" in res.output


@pytest.mark.slow
def test_default_demo_with_cell_types(tmp_path: Path) -> None:
    """Acceptance 2 on `scdrugmap demo --cell-types 5` (3,000 cells, 8 datasets): ≥ 0.8 recovered."""
    store = tmp_path / "demo"
    out = _ok(["--store", str(store), "demo", "--cell-types", "5", "--heads", "logreg"])
    assert "annotated cell types (markers) of 8 datasets" in out
    got = (
        Store.open(store)
        .query("SELECT c.obs_name, t.cell_type FROM cell_types t JOIN cells c USING (cell_uid)")
        .set_index("obs_name")["cell_type"]
    )
    truth = pd.concat(
        [ad.read_h5ad(f).obs["cell_type"].astype(str) for f in sorted((store / "demo_input").glob("*.h5ad"))]
    ).reindex(got.index)
    accuracy = float((got == truth).mean())
    print(f"default demo: planted cell types recovered with accuracy {accuracy:.3f} over {len(got)} cells")
    assert accuracy >= 0.8
