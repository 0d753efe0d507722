"""import-embeddings: obs-only h5ad → new dataset + embedding; bad inputs leave the store unchanged."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from scdrugmap.cli import main
from scdrugmap.store import Store, export_obsm, open_embeddings


@pytest.fixture
def emb_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 90
    resp = rng.integers(0, 2, n)
    emb = (rng.normal(size=(n, 16)) + resp[:, None] * 0.8).astype(np.float32)
    obs = pd.DataFrame(
        {"resp01": resp, "donor": [f"p{i % 9}" for i in range(n)]}, index=[f"cell{i}" for i in range(n)]
    )
    adata = ad.AnnData(obs=obs, obsm={"X_custom": emb})
    path = tmp_path / "emb.h5ad"
    adata.write_h5ad(path)
    return path, emb


def _run(store: Path, *args: str):
    return CliRunner().invoke(main, ["--store", str(store), *args])


def test_import_new_dataset_without_expression(emb_file: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, emb = emb_file
    store = tmp_path / "s"
    res = _run(
        store, "import-embeddings", str(path), "--dataset-id", "e1", "--obsm", "X_custom", "--model", "custom",
        "--label-key", "resp01", "--sensitive", "1", "--resistant", "0", "--meta", "tissue=Cell line",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    st = Store.open(store)
    ds = st.datasets().iloc[0]
    assert not ds["has_expression"]
    assert ds["n_cells"] == 90
    np.testing.assert_array_equal(open_embeddings(st, "custom").values, emb)
    np.testing.assert_array_equal(export_obsm(st, "e1", "custom").obsm["X_scdrugmap_custom"], emb)
    res = _run(store, "evaluate", "--model", "custom", "--head", "logreg", "--category", "tissue", "--k", "5")
    assert res.exit_code == 0, res.output
    auroc = st.query("SELECT AVG(value) AS v FROM metrics WHERE metric = 'auroc'")["v"].iloc[0]
    assert auroc > 0.7
    # `embed` refuses datasets without expression
    res = _run(store, "embed", "--model", "pca", "--datasets", "e1")
    assert res.exit_code == 1
    assert "no datasets with an expression matrix" in res.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--obsm", "X_nope", "--model", "m"], "obsm key 'X_nope' not found"),
        (["--obsm", "X_custom", "--model", "bad/name"], "bad model name"),
        (["--obsm", "X_custom", "--model", "m", "--label-key", "resp01"], "--sensitive"),
    ],
)
def test_bad_imports_leave_store_unchanged(emb_file, tmp_path: Path, args: list[str], fragment: str) -> None:
    path, _ = emb_file
    store = tmp_path / "s"
    ok = _run(
        store, "import-embeddings", str(path), "--dataset-id", "e1", "--obsm", "X_custom", "--model", "custom"
    )
    assert ok.exit_code == 0, ok.output
    before = Store.open(store).snapshot()
    res = _run(store, "import-embeddings", str(path), "--dataset-id", "e2", *args)
    assert res.exit_code == 1
    assert fragment in res.output
    assert Store.open(store).snapshot() == before


def test_rows_must_belong_to_the_dataset(emb_file, tmp_path: Path) -> None:
    path, emb = emb_file
    store = tmp_path / "s"
    assert (
        _run(
            store, "import-embeddings", str(path), "--dataset-id", "e1", "--obsm", "X_custom", "--model", "a"
        ).exit_code
        == 0
    )
    other = ad.AnnData(obs=pd.DataFrame(index=["stranger"]), obsm={"X_custom": emb[:1]})
    other_path = tmp_path / "other.h5ad"
    other.write_h5ad(other_path)
    before = Store.open(store).snapshot()
    res = _run(
        store,
        "import-embeddings",
        str(other_path),
        "--dataset-id",
        "e1",
        "--obsm",
        "X_custom",
        "--model",
        "b",
    )
    assert res.exit_code == 1
    assert "not cells of dataset 'e1'" in res.output
    assert Store.open(store).snapshot() == before
