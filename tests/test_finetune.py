"""Frozen vs LoRA on a small simulated collection with the tiny Geneformer (CPU), round trip, re-embed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import model_fixture

from scdrugmap.classify.finetune import finetuned_embedder, predict_cells
from scdrugmap.classify.lora import CellSource
from scdrugmap.cli import main
from scdrugmap.store import Store

ARGS = ["--value", "Cell line", "--k", "3", "--epochs", "1", "--max-train-cells", "24", "--batch-size", "8"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tiny = model_fixture("geneformer") / "tiny"
    tmp = tmp_path_factory.mktemp("ft")
    store = tmp / "store"
    runner = CliRunner()

    def ok(*args: str) -> str:
        res = runner.invoke(main, ["--store", str(store), *args])
        assert res.exit_code == 0, res.output
        return res.output

    ok("simulate", "--out", str(tmp / "sim"), "--n-cells", "360", "--n-genes", "1000", "--seed", "2")
    ok("ingest", "--manifest", str(tmp / "sim" / "manifest.csv"))
    ok(
        "embed",
        "--model",
        "geneformer",
        "--checkpoint",
        str(tiny),
        "--where",
        "tissue = 'Cell line'",
        "--no-progress",
    )
    for protocol in ("pooled", "cross"):
        ok("evaluate", "--model", "geneformer", "--head", "mlp", "--protocol", protocol, "--category", "tissue",
           "--value", "Cell line", "--k", "3")  # fmt: skip
        ok("finetune", "--model", "geneformer", "--checkpoint", str(tiny), "--protocol", protocol, *ARGS)
    return store, tiny


@pytest.mark.slow  # LoRA training of every fold (~1 min on a free machine); .ci/run runs it
def test_frozen_and_lora_share_folds_and_land_in_the_catalog(collection: tuple[Path, Path]) -> None:
    store, _ = collection
    st = Store.open(store)
    runs = st.query(
        "SELECT strategy, protocol, fold_set_id, n_cells FROM eval_runs ORDER BY protocol, strategy"
    )
    assert runs["strategy"].tolist() == ["frozen", "lora", "frozen", "lora"]
    for _, grp in runs.groupby("protocol"):
        assert grp["fold_set_id"].nunique() == 1  # LoRA uses the same persisted folds
    out = CliRunner().invoke(main, ["--store", str(store), "sql", "--csv", (
        "SELECT r.strategy, r.protocol, AVG(m.value) AS auroc FROM metrics m JOIN eval_runs r USING (run_id) "
        "WHERE m.metric = 'auroc' GROUP BY ALL ORDER BY 2, 1"
    )])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert len(out.output.strip().splitlines()) == 5
    n_pred = st.query(
        "SELECT COUNT(*) AS n FROM predictions p JOIN eval_runs r USING (run_id) WHERE r.strategy = 'lora'"
    )
    assert n_pred["n"].iloc[0] > 0


def test_saved_adapter_and_head_reproduce_predictions_exactly(collection: tuple[Path, Path]) -> None:
    import anndata as ad

    store, tiny = collection
    st = Store.open(store)
    run = st.query("SELECT run_id FROM eval_runs WHERE strategy = 'lora' AND protocol = 'pooled'")[
        "run_id"
    ].iloc[0]
    stored = st.query(
        "SELECT p.cell_uid, p.probability, c.dataset_id FROM predictions p JOIN cells c USING (cell_uid) "
        "WHERE p.run_id = ? AND p.fold = 0 ORDER BY p.cell_uid",
        [run],
    )
    emb, head = finetuned_embedder(st, run, 0, checkpoint=tiny)
    adatas = {d: ad.read_h5ad(st.dataset_file(d)) for d in stored["dataset_id"].unique()}
    rows = np.array([
        int(np.flatnonzero(adatas[d].obs["cell_uid"].to_numpy() == u)[0])
        for d, u in zip(stored["dataset_id"], stored["cell_uid"], strict=True)
    ])  # fmt: skip
    source = CellSource(adatas, stored["dataset_id"].to_numpy(), rows)
    prob = predict_cells(emb, head, source, np.arange(len(stored)), batch_size=8)
    np.testing.assert_array_equal(prob, stored["probability"].to_numpy())


def test_reembed_with_finetuned_backbone_gets_its_own_revision(collection: tuple[Path, Path]) -> None:
    store, tiny = collection
    st = Store.open(store)
    run = st.query("SELECT run_id FROM eval_runs WHERE strategy = 'lora' AND protocol = 'pooled'")[
        "run_id"
    ].iloc[0]
    res = CliRunner().invoke(main, ["--store", str(store), "embed", "--model", "geneformer", "--checkpoint", str(tiny),
                                    "--lora", run, "--fold", "1", "--datasets", "SIM01", "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    revs = st.query("SELECT revision, spec FROM embeddings WHERE model = 'geneformer'")
    assert len(revs) == 2
    assert revs["spec"].str.contains("adapter").any() or revs["revision"].nunique() == 2


def test_rank_ablation_and_bad_targets(collection: tuple[Path, Path]) -> None:
    store, tiny = collection
    runner = CliRunner()
    base = ["--store", str(store), "finetune", "--model", "geneformer", "--checkpoint", str(tiny)]
    res = runner.invoke(main, [*base, *ARGS, "--target-modules", "nonexistent_proj"])
    assert res.exit_code == 1
    assert "not found" in res.output
    res = runner.invoke(main, [*base, "--model", "pca", *ARGS])
    assert res.exit_code == 1
    res = runner.invoke(main, [*base, *ARGS, "--ranks", "2,4", "--k", "2"])
    assert res.exit_code == 0, res.output
    ranks = Store.open(store).query("SELECT head_params FROM eval_runs WHERE strategy = 'lora' AND k = 2")
    assert sorted('"rank": 2' in p or '"rank": 4' in p for p in ranks["head_params"]) == [True, True]


@pytest.fixture(scope="module")
def lora_prediction(collection: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """CLI ``predict --fold 1`` of the cross-data LoRA run on SIM02: (run_id, input h5ad, scored obs, output)."""
    import anndata as ad

    store, tiny = collection
    run = Store.open(store).query(
        "SELECT run_id FROM eval_runs WHERE strategy = 'lora' AND protocol = 'cross'"
    )
    run = run["run_id"].iloc[0]
    src = next((store.parent / "sim").glob("SIM02*.h5ad"))
    out = tmp_path_factory.mktemp("pred") / "p.h5ad"
    res = CliRunner().invoke(main, ["--store", str(store), "predict", str(src), "--head", run, "--fold", "1",
                                    "--checkpoint", str(tiny), "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    return run, src, ad.read_h5ad(out).obs, res.output


def test_predict_with_a_lora_head(lora_prediction) -> None:
    _, _, scored, output = lora_prediction
    assert scored["scdrugmap_p_sensitive"].between(0, 1).mean() > 0.9
    assert "recorded for dataset SIM02" in output


def test_service_predicts_with_a_lora_head(collection: tuple[Path, Path], lora_prediction) -> None:
    """``/models`` lists LoRA heads as predictable with their folds; ``/predict`` applies a fold like the CLI."""
    from fastapi.testclient import TestClient

    from scdrugmap.classify.service import create_app

    store, _ = collection
    run, src, scored, _ = lora_prediction
    with TestClient(create_app(store)) as client:
        heads = {h["run_id"]: h for h in client.get("/models").json()["heads"]}
        assert heads[run]["predictable"] is True
        saved = sorted(int(p.name[4:]) for p in (store / "lora" / run).glob("fold*"))
        assert heads[run]["folds"] == saved
        assert 1 in saved
        frozen = [h for h in heads.values() if h["strategy"] == "frozen"]
        assert frozen
        assert all(h["folds"] is None for h in frozen)

        def post(**fields: str):
            with src.open("rb") as fh:
                files = {"file": (src.name, fh, "application/octet-stream")}
                return client.post("/predict", files=files, data={"head": run, "wait": "600", **fields})

        r = post(fold="1")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["summary"]["strategy"] == "lora"
        assert body["summary"]["fold"] == 1
        bad = post(fold="99")
        assert bad.status_code == 422
        assert "fold 99" in bad.json()["detail"]
        assert post(fold="x").status_code == 422
    expected = scored["scdrugmap_p_sensitive"].to_numpy()
    np.testing.assert_allclose(np.asarray(body["cells"]["p_sensitive"], dtype=float), expected, rtol=1e-6)
