"""Folds, metrics and evaluate: persisted shared folds, grouping, NULL metrics, reuse, SQL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn import metrics as skm
from synth import toy_adata

from scdrugmap.classify.evaluate import evaluate, summarise
from scdrugmap.classify.folds import get_fold_set
from scdrugmap.classify.metrics import fold_metrics
from scdrugmap.cli import main
from scdrugmap.embedder.runner import embed_datasets
from scdrugmap.store import Store
from scdrugmap.store.errors import InputError
from scdrugmap.store.ingest import ingest_h5ad


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Three studies of one tissue, 12 samples each, embedded with pca and hvg."""
    tmp = tmp_path_factory.mktemp("eval")
    st = Store.open(tmp / "store", create=True)
    for i in range(3):
        path = tmp / f"s{i}.h5ad"
        toy_adata(n_cells=240, seed=10 + i, n_samples=12, prefix=f"s{i}_").write_h5ad(path)
        ingest_h5ad(
            st, path, dataset_id=f"s{i}", label_key="response", sample_key="sample", min_genes=100,
            meta={"tissue": "Cell line", "drug_class": "chemotherapy"},
        )  # fmt: skip
    embed_datasets(st, "pca", progress=False, options={"n_comps": 10})
    embed_datasets(st, "hvg", progress=False, options={"n_top_genes": 40})
    return st


def test_two_models_share_the_persisted_folds(store: Store) -> None:
    a = evaluate(store, model="pca", head="logreg", category="tissue", value="Cell line")[0]
    b = evaluate(store, model="hvg", head="logreg", category="tissue", value="Cell line")[0]
    assert a.spec.fold_set_id == b.spec.fold_set_id
    pa = store.query("SELECT cell_uid, fold FROM predictions WHERE run_id = ? ORDER BY cell_uid", [a.run_id])
    pb = store.query("SELECT cell_uid, fold FROM predictions WHERE run_id = ? ORDER BY cell_uid", [b.run_id])
    assert pa.equals(pb)
    assert store.query("SELECT COUNT(*) AS n FROM fold_sets")["n"].iloc[0] == 1


def test_grouped_folds_never_split_a_sample(store: Store) -> None:
    fs = get_fold_set(
        store, protocol="pooled", category="tissue", value="Cell line", grouping="sample", seed=3
    )
    per_sample = fs.cells.groupby("group")["fold"].nunique()
    assert (per_sample == 1).all()
    assert fs.cells["fold"].nunique() == 10
    # cell-level folds (the paper's) do split samples, with a warning about leakage
    cell = get_fold_set(
        store, protocol="pooled", category="tissue", value="Cell line", grouping="cell", seed=3
    )
    assert (cell.cells.groupby("group")["fold"].nunique() > 1).any()


def test_cell_level_split_warns_on_sample_level_labels(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    get_fold_set(store, protocol="pooled", category="tissue", value="Cell line", grouping="cell", seed=11)
    assert "cell-level splits on sample-level labels" in caplog.text


def test_cross_is_leave_one_study_out(store: Store) -> None:
    fs = get_fold_set(store, protocol="cross", category="tissue", value="Cell line")
    assert fs.fold_names == ["s0", "s1", "s2"]
    assert (fs.cells.groupby("study")["fold"].nunique() == 1).all()
    out = evaluate(store, model="pca", head="logreg", protocol="cross", category="tissue", value="Cell line")[
        0
    ]
    folds = store.query("SELECT DISTINCT fold FROM metrics WHERE run_id = ? ORDER BY 1", [out.run_id])["fold"]
    assert folds.tolist() == [0, 1, 2]


def test_stored_predictions_reproduce_stored_metrics(store: Store) -> None:
    out = evaluate(store, model="pca", head="mlp", category="drug_class", value="chemotherapy", k=5)[0]
    preds = store.query(
        "SELECT p.fold, p.probability, c.label FROM predictions p JOIN cells c USING (cell_uid) WHERE run_id = ?",
        [out.run_id],
    )
    stored = store.query("SELECT fold, metric, value FROM metrics WHERE run_id = ?", [out.run_id])
    for fold, part in preds.groupby("fold"):
        y = (part["label"] == "sensitive").astype(int).to_numpy()
        p = part["probability"].to_numpy()
        got = stored[stored["fold"] == fold].set_index("metric")["value"]
        assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, p))
        assert got["auprc"] == pytest.approx(skm.average_precision_score(y, p))
        assert got["f1"] == pytest.approx(skm.f1_score(y, p >= 0.5))
        assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p >= 0.5))


def test_same_spec_answers_from_catalog_unless_rerun(store: Store) -> None:
    first = evaluate(store, model="pca", head="lightgbm", category="tissue", value="Cell line", k=5)[0]
    n_before = store.snapshot()
    again = evaluate(store, model="pca", head="lightgbm", category="tissue", value="Cell line", k=5)[0]
    assert again.reused
    assert again.run_id == first.run_id
    assert store.snapshot() == n_before
    redo = evaluate(
        store, model="pca", head="lightgbm", category="tissue", value="Cell line", k=5, rerun=True
    )[0]
    assert not redo.reused
    assert store.snapshot() == n_before  # replaced, not duplicated
    other = evaluate(store, model="pca", head="lightgbm", category="tissue", value="Cell line", k=5, seed=1)[
        0
    ]
    assert other.run_id != first.run_id


def test_undefined_metrics_are_null_with_reason() -> None:
    vals = fold_metrics(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.7]))
    assert vals["auroc"] == (None, "test fold has only positive cells")
    assert vals["auprc"][0] is None
    assert vals["recall"][0] == pytest.approx(2 / 3)
    vals = fold_metrics(np.array([0, 0]), np.array([0.1, 0.2]))
    assert vals["precision"] == (None, "no cell predicted positive")
    assert vals["f1"][0] is None
    assert vals["accuracy"] == (1.0, None)


def test_summary_and_bad_options(store: Store) -> None:
    evaluate(store, model="pca", head="logreg", category="tissue", value="Cell line")
    df = summarise(store, where="model = 'pca'")
    assert {"f1", "auroc", "auprc", "accuracy", "precision", "recall", "balanced_accuracy", "mcc"} <= set(
        df["metric"]
    )
    with pytest.raises(InputError, match="unknown head"):
        evaluate(store, model="pca", head="svm", category="tissue")
    with pytest.raises(InputError, match="unknown category"):
        evaluate(store, model="pca", category="colour")
    with pytest.raises(InputError, match="no labelled cells"):
        evaluate(store, model="pca", category="tissue", value="Brain")
    with pytest.raises(InputError, match="fewer than k"):
        evaluate(store, model="pca", category="tissue", value="Cell line", k=50)
    with pytest.raises(InputError, match="≥ 2 studies"):
        evaluate(store, model="pca", protocol="cross", category="study", value="s0")


def test_sql_is_read_only(store: Store, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["--store", str(store.path), "sql"]
    res = runner.invoke(
        main, [*base, "SELECT run_id, fold, metric, value FROM metrics ORDER BY 1, 2 LIMIT 5"]
    )
    assert res.exit_code == 0, res.output
    assert "auroc" in res.output or "accuracy" in res.output
    before = store.snapshot()
    target = tmp_path / "leak.csv"
    for bad in (
        "DELETE FROM cells",
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO meta VALUES ('a', 'b')",
        f"COPY cells TO '{target}'",
        f"ATTACH '{tmp_path / 'x.duckdb'}' AS x",
        "INSTALL httpfs",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SET enable_external_access = true",
    ):
        res = runner.invoke(main, [*base, bad])
        assert res.exit_code != 0, bad
        assert res.output.startswith("Error:"), (bad, res.output)
    assert store.snapshot() == before
    assert not target.exists()


def test_cli_evaluate_and_results(store: Store) -> None:
    runner = CliRunner()
    base = ["--store", str(store.path)]
    res = runner.invoke(
        main, [*base, "evaluate", "--model", "pca", "--head", "logreg", "--category", "tissue", "--k", "5"]
    )
    assert res.exit_code == 0, res.output
    assert "auroc" in res.output
    res = runner.invoke(main, [*base, "results", "--where", "head = 'logreg'"])
    assert res.exit_code == 0, res.output
    assert "logreg" in res.output
    res = runner.invoke(main, [*base, "datasets", "--filter", "tissue=Cell line"])
    assert res.exit_code == 0
    assert "s2" in res.output
    res = runner.invoke(main, [*base, "evaluate", "--model", "nope"])
    assert res.exit_code == 1
    assert "no embeddings of model 'nope'" in res.output


def test_few_shot_moves_k_cells_per_class_into_training(store: Store) -> None:
    zero = evaluate(
        store, model="pca", head="logreg", protocol="cross", category="tissue", value="Cell line"
    )[0]
    few = evaluate(
        store, model="pca", head="logreg", protocol="cross", category="tissue", value="Cell line", shots=5
    )[0]
    assert few.run_id != zero.run_id
    n0 = store.query(
        "SELECT fold, n_test, n_train FROM metrics WHERE run_id = ? AND metric = 'f1' ORDER BY 1",
        [zero.run_id],
    )
    n5 = store.query(
        "SELECT fold, n_test, n_train FROM metrics WHERE run_id = ? AND metric = 'f1' ORDER BY 1",
        [few.run_id],
    )
    assert (n0["n_test"] - n5["n_test"] == 10).all()
    assert (n5["n_train"] - n0["n_train"] == 10).all()
    assert (
        store.query("SELECT COUNT(*) AS n FROM predictions WHERE run_id = ?", [few.run_id])["n"].iloc[0]
        == n5["n_test"].sum()
    )
