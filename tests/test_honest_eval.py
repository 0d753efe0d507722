"""Issue 16: baselines and degenerate flags, the trained mlp head, seeds, prevalence, patients,
the external protocol and the leakage report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import shared_path
from synth import toy_adata

from scdrugmap.classify.evaluate import evaluate, summarise
from scdrugmap.classify.folds import get_fold_set
from scdrugmap.classify.heads import HeadSpec, make_head
from scdrugmap.classify.leakage import leakage
from scdrugmap.classify.mlp_head import inner_split
from scdrugmap.classify.summary import format_summary, seed_summary
from scdrugmap.cli import main
from scdrugmap.embedder.runner import embed_datasets
from scdrugmap.store import Store
from scdrugmap.store.manifest import ingest_manifest
from scdrugmap.store.simulate import simulate_collection


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Two studies of one tissue, 12 samples each; patients p0..p5 shared by both datasets."""
    tmp = tmp_path_factory.mktemp("honest")
    rows = ["path,dataset_id,label_key,sample_key,patient_key,patient_scope,study,tissue,min_genes"]
    for i in range(2):
        a = toy_adata(n_cells=240, seed=20 + i, n_samples=12, prefix=f"h{i}_")
        # donor = sample // 2: two samples (same label parity) per donor; the same donors in both datasets
        a.obs["donor"] = [f"p{int(s[1:]) // 4 * 2 + int(s[1:]) % 2}" for s in a.obs["sample"]]
        a.write_h5ad(tmp / f"h{i}.h5ad")
        rows.append(f"h{i}.h5ad,h{i},response,sample,donor,trialA,st{i},Cell line,100")
    (tmp / "manifest.csv").write_text("\n".join(rows) + "\n")
    st = Store.open(tmp / "store", create=True)
    ingest_manifest(st, tmp / "manifest.csv")
    embed_datasets(st, "pca", progress=False, options={"n_comps": 10})
    return st


def test_patients_are_shared_across_datasets_and_never_split(store: Store) -> None:
    cells = store.query("SELECT dataset_id, sample_id, patient_id FROM cells")
    assert cells["patient_id"].str.startswith("trialA/p").all()
    per_patient = cells.groupby("patient_id")["dataset_id"].nunique()
    assert (per_patient == 2).all()  # every patient has cells in both datasets
    fs = get_fold_set(store, protocol="pooled", category="tissue", value="Cell line", k=3, seed=1)
    assert fs.spec.grouping == "patient"  # the default when patient ids exist
    merged = fs.cells.merge(cells.assign(cell_uid=store.query("SELECT cell_uid FROM cells")["cell_uid"]))
    assert (merged.groupby("patient_id")["fold"].nunique() == 1).all()
    by_sample = get_fold_set(
        store, protocol="pooled", category="tissue", value="Cell line", grouping="sample", k=3, seed=1
    )
    both = by_sample.cells.merge(cells.assign(cell_uid=store.query("SELECT cell_uid FROM cells")["cell_uid"]))
    assert (both.groupby("patient_id")["fold"].nunique() > 1).any()  # sample grouping splits patients


def test_summary_has_baselines_fold_counts_and_flags_constant_runs(store: Store) -> None:
    good = evaluate(store, model="pca", head="logreg", category="tissue", value="Cell line", k=3)[0]
    # learning rate → 0: the boosting start (the training prior) for every cell, a constant classifier
    const = evaluate(
        store, model="pca", head="lightgbm", category="tissue", value="Cell line", k=3,
        head_params={"learning_rate": 1e-12, "n_estimators": 1},
    )[0]  # fmt: skip
    df = summarise(store, [good.run_id, const.run_id])
    preds = store.query(
        "SELECT p.run_id, p.fold, p.probability, c.label FROM predictions p JOIN cells c USING (cell_uid) "
        "WHERE p.run_id = ?",
        [const.run_id],
    )
    prev = preds.assign(y=preds["label"] == "sensitive").groupby("fold")["y"].mean()
    row = df[(df["run_id"] == const.run_id)].set_index("metric")
    assert row.loc["f1", "baseline"] == pytest.approx(np.mean(2 * prev / (1 + prev)))
    assert row.loc["auprc", "baseline"] == pytest.approx(prev.mean())
    assert row.loc["auroc", "baseline"] == 0.5
    assert row.loc["auroc", "n_folds_total"] == 3
    assert bool(row["degenerate"].iloc[0])
    assert row.loc["mcc", "mean"] == pytest.approx(0.0)
    assert row["n_one_class_folds"].iloc[0] == 3
    ok = df[df["run_id"] == good.run_id]
    assert not ok["degenerate"].any()
    # an undefined precision (no positive call) is NULL, counted and explained
    prec = row.loc["precision"]
    assert prec["n_folds"] + prec["n_undefined"] == 3
    if prec["n_undefined"]:
        assert "no cell predicted positive" in prec["undefined_reason"]
    text = format_summary(df)
    assert max(len(line) for line in text.splitlines()) <= 120
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("run-")}
    assert "DEGEN" in lines[const.run_id]
    assert "DEGEN" not in lines[good.run_id]
    assert " sen " in lines[good.run_id]  # positive class named
    assert "2p/(1+p)" in text


def test_mlp_trains_to_convergence_and_inner_split_respects_groups() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 20))
    y = (X[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(int)
    groups = np.repeat(np.arange(30), 10)
    train, val = inner_split(y, groups, val_fraction=0.2, seed=0)
    assert not set(groups[train]) & set(groups[val])
    head = make_head(HeadSpec.create("mlp"), seed=0).fit(X, y, groups=groups)
    assert head.inner.steps >= 300  # the minimum number of optimiser steps
    paper = make_head(HeadSpec.create("mlp_paper"), seed=0).fit(X, y)
    acc = ((head.predict_proba(X) >= 0.5) == y).mean()
    acc_paper = ((paper.predict_proba(X) >= 0.5) == y).mean()
    assert acc > 0.85
    assert acc > acc_paper
    weighted = HeadSpec.create("mlp", {"class_weight": "balanced"})
    assert weighted.as_dict()["class_weight"] == "balanced"


def test_seeds_give_three_fold_sets_runs_and_an_interval(store: Store) -> None:
    outs = evaluate(
        store, model="pca", head="logreg", category="tissue", value="Cell line", k=3, seeds=[0, 1, 2]
    )
    assert len({o.run_id for o in outs}) == 3
    assert len({o.spec.fold_set_id for o in outs}) == 3
    summary = seed_summary(summarise(store, [o.run_id for o in outs]))
    auroc = summary[summary["metric"] == "auroc"].iloc[0]
    assert auroc["n_seeds"] == 3
    assert auroc["ci_low"] <= auroc["mean"] <= auroc["ci_high"]
    res = CliRunner().invoke(main, ["--store", str(store.path), "evaluate", "--model", "pca", "--head", "logreg",
                                    "--value", "Cell line", "--k", "3", "--seeds", "0,1,2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "Over seeds" in res.output
    assert "not independent replicates" in res.output


def test_prevalence_subsamples_the_test_side(store: Store) -> None:
    out = evaluate(
        store, model="pca", head="logreg", category="tissue", value="Cell line", k=3, prevalence=0.2
    )[0]
    preds = store.query(
        "SELECT p.fold, c.label FROM predictions p JOIN cells c USING (cell_uid) WHERE run_id = ?",
        [out.run_id],
    )
    frac = preds.assign(pos=preds["label"] == "sensitive").groupby("fold")["pos"].mean()
    assert np.allclose(frac, 0.2, atol=0.02)
    row = summarise(store, [out.run_id]).set_index("metric")
    assert row.loc["auprc", "baseline"] == pytest.approx(frac.mean(), abs=1e-9)


def test_leakage_reports_cell_over_sample_over_patient(tmp_path: Path) -> None:
    manifest = simulate_collection(
        tmp_path / "sim", n_cells=900, n_genes=1000, sample_effect=0.5, samples_per_patient=2
    )
    assert "patient_key" in pd.read_csv(manifest).columns
    st = Store.open(tmp_path / "store", create=True)
    ingest_manifest(st, manifest)
    embed_datasets(st, "pca", progress=False)
    df = leakage(st, model="pca", head="logreg", category="tissue", value="Cell line", k=5)
    auroc = df[df["metric"] == "auroc"].set_index("grouping")
    assert auroc.loc["study", "inflation"] == 0.0  # the reference: leave-one-study-out
    infl = auroc["inflation"]
    assert infl["cell"] > infl["sample"] >= infl["patient"]
    assert infl["cell"] > 0.1
    stored = st.query("SELECT grouping, metric, inflation FROM leakage WHERE metric = 'auroc'")
    assert set(stored["grouping"]) == {"cell", "sample", "patient", "study"}


def test_external_protocol_on_a_catalogue_simulation(tmp_path: Path) -> None:
    cat = pd.read_csv(shared_path("catalog", "scdrugmap_datasets.csv"), dtype=str, keep_default_na=False)
    counts = shared_path("catalog", "scdrugmap_category_counts.csv")
    sub = cat[cat["Tissue"].str.strip() == "Tumor tissue"]
    assert set(sub["Collections"]) == {"Primary collection", "External collection"}
    sub.to_csv(tmp_path / "tumor_datasets.csv", index=False)
    (tmp_path / "tumor_category_counts.csv").write_bytes(counts.read_bytes())
    base = ["--store", str(tmp_path / "store")]
    runner = CliRunner()
    for args in (
        ["simulate", "--out", str(tmp_path / "sim"), "--catalogue", str(tmp_path / "tumor_datasets.csv"),
         "--scale", "0.002", "--n-genes", "1000"],
        [*base, "ingest", "--manifest", str(tmp_path / "sim" / "manifest.csv")],
        [*base, "embed", "--model", "pca", "--no-progress"],
    ):  # fmt: skip
        res = runner.invoke(main, args)
        assert res.exit_code == 0, res.output
    res = runner.invoke(main, [*base, "evaluate", "--model", "pca", "--head", "logreg", "--protocol", "external",
                               "--value", "Tumor tissue"])  # fmt: skip
    assert res.exit_code == 0, res.output
    st = Store.open(tmp_path / "store")
    run = st.query("SELECT run_id, fold_set_id, protocol FROM eval_runs").iloc[0]
    assert run["protocol"] == "external"
    sides = st.query(
        "SELECT d.collection, MIN(f.fold) AS lo, MAX(f.fold) AS hi FROM folds f JOIN cells c USING (cell_uid) "
        "JOIN datasets d USING (dataset_id) WHERE f.fold_set_id = ? GROUP BY 1",
        [run["fold_set_id"]],
    ).set_index("collection")
    assert (sides.loc["primary", ["lo", "hi"]] == -1).all()  # trains only
    assert (sides.loc["external", ["lo", "hi"]] == 0).all()  # tested
    tested = st.query("SELECT DISTINCT d.collection FROM predictions p JOIN cells c USING (cell_uid) "
                      "JOIN datasets d USING (dataset_id) WHERE p.run_id = ?", [run["run_id"]])  # fmt: skip
    assert tested["collection"].tolist() == ["external"]
    assert " ext " in res.output


def test_ingest_patient_key_cli(tmp_path: Path) -> None:
    a = toy_adata(n_cells=60, seed=3, n_samples=4)
    a.obs["donor"] = ["d" + s[1:] for s in a.obs["sample"]]
    a.write_h5ad(tmp_path / "a.h5ad")
    res = CliRunner().invoke(main, ["--store", str(tmp_path / "st"), "ingest", str(tmp_path / "a.h5ad"),
                                    "--dataset-id", "A", "--label-key", "response", "--patient-key", "donor",
                                    "--min-genes", "100"])  # fmt: skip
    assert res.exit_code == 0, res.output
    ids = Store.open(tmp_path / "st").query("SELECT DISTINCT patient_id FROM cells ORDER BY 1")["patient_id"]
    assert ids.tolist() == ["A/d0", "A/d1", "A/d2", "A/d3"]
    res = CliRunner().invoke(main, ["--store", str(tmp_path / "st"), "ingest", str(tmp_path / "a.h5ad"),
                                    "--dataset-id", "B", "--label-key", "response", "--patient-key", "nope"])  # fmt: skip
    assert res.exit_code == 1
    assert "--patient-key 'nope'" in res.output


def test_ingest_spec_hash_unchanged_without_patients() -> None:
    import hashlib
    import json
    from dataclasses import asdict

    from scdrugmap.store.prepare import IngestSpec

    spec = IngestSpec(dataset_id="X", label_key="response")
    newer = ("patient_key", "patient_scope", "allow_unmapped")  # fields added later, unset here
    old = {k: v for k, v in asdict(spec).items() if k not in newer}
    before = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert spec.hash() == before  # stores ingested before patients existed re-ingest as no-ops
    assert spec.hash() != IngestSpec(dataset_id="X", label_key="response", patient_key="donor").hash()
    assert spec.hash() != IngestSpec(dataset_id="X", label_key="response", allow_unmapped=True).hash()


def test_service_serves_leakage_and_baselines(store: Store) -> None:
    from fastapi.testclient import TestClient

    from scdrugmap.classify.service import create_app

    df = leakage(store, model="pca", head="logreg", category="tissue", value="Cell line", k=3)
    assert set(df["grouping"]) == {"cell", "sample", "patient", "study"}
    with TestClient(create_app(store.path)) as client:
        items = client.get("/leakage", params={"value": "Cell line"}).json()["items"]
        assert {i["grouping"] for i in items} == {"cell", "sample", "patient", "study"}
        assert all(i["reference"] == "study" for i in items)
        run = df["run_id"].iloc[0]
        summary = client.get("/metrics", params={"run_id": run, "summary": True}).json()["items"]
        auroc = next(s for s in summary if s["metric"] == "auroc")
        assert auroc["baseline"] == 0.5
        assert auroc["positive_class"] == "sensitive"
        assert "degenerate" in auroc
