"""Ingest: labels, QC, gene mapping, and every bad input leaving the store unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from synth import toy_adata

from scdrugmap.cli import main
from scdrugmap.store import Store
from scdrugmap.store.errors import InputError
from scdrugmap.store.labels import map_labels


def _files(store: Path) -> list[str]:
    return sorted(
        str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and p.name != "catalog.duckdb.wal"
    )


def _ingest(store: Path, path: Path, *extra: str) -> object:
    args = ["--store", str(store), "ingest", str(path), "--dataset-id", "d1", "--label-key", "response"]
    args += ["--sample-key", "sample", "--min-genes", "100", *extra]
    return CliRunner().invoke(main, args)


@pytest.fixture
def base(tmp_path: Path) -> tuple[Path, Path]:
    """A store holding dataset d1, and the h5ad it came from."""
    path = tmp_path / "d1.h5ad"
    toy_adata(seed=1).write_h5ad(path)
    store = tmp_path / "store"
    res = _ingest(store, path, "--meta", "tissue=Cell line", "--meta", "drug_class=targeted")
    assert res.exit_code == 0, res.output
    return store, path


def test_ingest_records_cells_labels_genes(base: tuple[Path, Path]) -> None:
    store, _ = base
    st = Store.open(store)
    ds = st.datasets().iloc[0]
    assert ds["dataset_id"] == "d1"
    assert ds["x_kind"] == "counts"
    assert ds["qc_applied"]
    assert ds["drug_class"] == "targeted therapy"
    assert ds["study"] == "d1"  # defaults to the dataset id
    assert ds["n_genes_mapped"] == ds["n_genes"] == 300
    cells = st.query("SELECT * FROM cells ORDER BY cell_uid")
    assert cells["cell_uid"].tolist() == list(range(ds["n_cells"]))
    assert set(cells["label"]) == {"sensitive", "resistant"}
    # sample-level labels survive: one label per sample
    assert (cells.groupby("sample_id")["label"].nunique() == 1).all()
    genes = st.query("SELECT * FROM genes WHERE dataset_id = 'd1' ORDER BY var_index")
    assert genes["ensembl_id"].str.startswith("ENSG").all()
    assert (st.dataset_file("d1")).exists()


def test_reingest_same_content_is_a_noop(base: tuple[Path, Path]) -> None:
    store, path = base
    before = Store.open(store).snapshot()
    res = _ingest(store, path, "--meta", "tissue=Cell line", "--meta", "drug_class=targeted")
    assert res.exit_code == 0, res.output
    assert "unchanged" in res.output
    assert Store.open(store).snapshot() == before


def test_qc_drops_low_quality_and_high_mito_cells(tmp_path: Path) -> None:
    adata = toy_adata(seed=2)
    X = adata.X.toarray()
    X[0, :] = 0
    X[0, :5] = 1  # 5 detected genes
    X[1, -3:] = X[1].sum() * 2  # mitochondrial share > 10 %
    adata.X = __import__("scipy.sparse", fromlist=["csr_matrix"]).csr_matrix(X)
    path = tmp_path / "q.h5ad"
    adata.write_h5ad(path)
    res = _ingest(tmp_path / "s", path)
    assert res.exit_code == 0, res.output
    names = set(Store.open(tmp_path / "s").query("SELECT obs_name FROM cells")["obs_name"])
    assert "c0" not in names
    assert "c1" not in names
    assert len(names) == adata.n_obs - 2


def test_scaled_input_skips_qc_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    adata = toy_adata(seed=3)
    X = np.log1p(adata.X.toarray())
    adata.X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    path = tmp_path / "z.h5ad"
    adata.write_h5ad(path)
    res = _ingest(tmp_path / "s", path)
    assert res.exit_code == 0, res.output
    ds = Store.open(tmp_path / "s").datasets().iloc[0]
    assert ds["x_kind"] == "scaled"
    assert not ds["qc_applied"]
    assert ds["n_cells"] == adata.n_obs
    assert "QC skipped" in res.output


def test_label_mapping_rules() -> None:
    out = map_labels(["Responder", "non-responder", None, "NA"], key="k")
    assert list(out) == ["sensitive", "resistant", None, None]
    with pytest.raises(InputError, match=r"--sensitive"):
        map_labels([1, 0], key="k")  # 1/0 must be mapped explicitly
    assert list(map_labels([1, 0], key="k", sensitive=["1"], resistant=["0"])) == ["sensitive", "resistant"]
    with pytest.raises(InputError, match="both"):
        map_labels(["a"], key="k", sensitive=["a"], resistant=["a"])


def _bad_cases(tmp_path: Path, good: Path) -> dict[str, tuple[list[str], str]]:
    """name → (CLI args after `ingest`, expected message fragment)."""
    text = tmp_path / "bad.h5ad"
    text.write_text("not an h5ad")
    dup = toy_adata(seed=1)
    dup.obs_names = ["same"] * dup.n_obs
    dup_path = tmp_path / "dup.h5ad"
    dup.write_h5ad(dup_path)
    nan = toy_adata(seed=4)
    X = nan.X.toarray()
    X[3, 4] = np.nan
    X[5, 6] = np.inf
    nan.X = X
    nan_path = tmp_path / "nan.h5ad"
    nan.write_h5ad(nan_path)
    neg = toy_adata(seed=5)
    neg.X = neg.X.toarray() - 1.0
    neg_path = tmp_path / "neg.h5ad"
    neg.write_h5ad(neg_path)
    other = tmp_path / "other.h5ad"
    toy_adata(seed=99).write_h5ad(other)
    base_args = ["--label-key", "response", "--sample-key", "sample", "--min-genes", "100"]
    return {
        "missing file": ([str(tmp_path / "nope.h5ad"), "--dataset-id", "x", *base_args], "file not found"),
        "not an h5ad": ([str(text), "--dataset-id", "x", *base_args], "not an h5ad"),
        "missing label key": ([str(good), "--dataset-id", "x", "--label-key", "nope"], "not an obs column"),
        "unmapped labels": ([str(good), "--dataset-id", "x", "--label-key", "resp01"], "--sensitive"),
        "duplicate obs names": ([str(dup_path), "--dataset-id", "x", *base_args], "duplicate obs names"),
        "nan in X": ([str(nan_path), "--dataset-id", "x", *base_args], "NaN/inf"),
        "negative counts": (
            [str(neg_path), "--dataset-id", "x", *base_args, "--input-type", "counts"],
            "negative",
        ),
        "zero cells after QC": (
            [str(good), "--dataset-id", "x", "--label-key", "response", "--min-genes", "100000"],
            "no cell passes QC",
        ),
        "reingest different content": (
            [str(other), "--dataset-id", "d1", *base_args],
            "different file content",
        ),
        "reingest different options": (
            [str(good), "--dataset-id", "d1", "--label-key", "response", "--min-genes", "100"],
            "different ingest options",
        ),
        "bad metadata field": (
            [str(good), "--dataset-id", "x", "--meta", "colour=red"],
            "unknown metadata field",
        ),
        "bad label confidence": (
            [str(good), "--dataset-id", "x", "--meta", "label_confidence=5"],
            "1, 2 or 3",
        ),
        "bad dataset id": ([str(good), "--dataset-id", "a/b"], "bad dataset id"),
    }


def test_each_bad_input_fails_cleanly(base: tuple[Path, Path], tmp_path: Path) -> None:
    store, good = base
    cases = _bad_cases(tmp_path, good)
    before = Store.open(store).snapshot()
    files = _files(store)
    for name, (args, fragment) in cases.items():
        res = CliRunner().invoke(main, ["--store", str(store), "ingest", *args])
        assert res.exit_code != 0, f"{name}: exited 0"
        assert fragment in res.output, f"{name}: {res.output!r}"
        assert res.output.strip().startswith("Error:"), f"{name}: {res.output!r}"
        assert "Traceback" not in res.output
        assert Store.open(store).snapshot() == before, name
        assert _files(store) == files, name


def test_manifest_is_all_or_nothing(base: tuple[Path, Path], tmp_path: Path) -> None:
    store, good = base
    ok = tmp_path / "ok.h5ad"
    toy_adata(seed=7, prefix="k").write_h5ad(ok)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,dataset_id,label_key,sample_key,min_genes,tissue\n"
        f"{ok.name},d2,response,sample,100,Cell line\n"
        f"{os.path.relpath(good, tmp_path)},d3,resp01,sample,100,Cell line\n"  # unmapped 1/0 labels
    )
    before = Store.open(store).snapshot()
    files = sorted(p.name for p in (store / "datasets").iterdir())
    res = CliRunner().invoke(main, ["--store", str(store), "ingest", "--manifest", str(manifest)])
    assert res.exit_code != 0
    assert Store.open(store).snapshot() == before
    # d2 was staged to a temporary file before d3 failed: nothing of it is left
    assert sorted(p.name for p in (store / "datasets").iterdir()) == files
    manifest.write_text(manifest.read_text().replace("resp01,", "response,"))
    res = CliRunner().invoke(main, ["--store", str(store), "ingest", "--manifest", str(manifest)])
    assert res.exit_code == 0, res.output
    assert set(Store.open(store).datasets()["dataset_id"]) == {"d1", "d2", "d3"}
    cells = Store.open(store).query("SELECT dataset_id, obs_name, cell_uid FROM cells ORDER BY cell_uid")
    assert cells["cell_uid"].tolist() == list(range(len(cells)))
    for dataset_id, rows in cells.groupby("dataset_id"):  # the files carry the catalog's cell_uid
        obs = ad.read_h5ad(Store.open(store).dataset_file(dataset_id), backed="r").obs
        assert obs["cell_uid"].tolist() == rows["cell_uid"].tolist()
        assert obs.index.tolist() == rows["obs_name"].tolist()


def test_failed_ingest_into_new_store_leaves_nothing(tmp_path: Path) -> None:
    store = tmp_path / "fresh"
    res = CliRunner().invoke(
        main, ["--store", str(store), "ingest", str(tmp_path / "nope.h5ad"), "--dataset-id", "x"]
    )
    assert res.exit_code == 1
    assert not store.exists()
