"""predict: frozen head on new cells, calibration, abstention, refusals; head save/load round trip."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import shared_path

from scdrugmap.classify.calibrate import expected_calibration_error, fit_calibrator
from scdrugmap.classify.demo import run_demo
from scdrugmap.classify.heads import HeadSpec, make_head
from scdrugmap.classify.persist import load_head, save_head
from scdrugmap.cli import main
from scdrugmap.store import Store
from scdrugmap.store.errors import InputError


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Store:
    path = tmp_path_factory.mktemp("demo") / "store"
    run_demo(path, n_cells=1500, heads=["logreg", "mlp"], echo=lambda _: None)
    return Store.open(path)


def _run(st: Store, head: str, protocol: str = "pooled") -> str:
    df = st.query(
        "SELECT run_id FROM eval_runs WHERE head = ? AND protocol = ? AND value = 'Cell line'",
        [head, protocol],
    )
    return str(df["run_id"].iloc[0])


@pytest.mark.parametrize("head", ["mlp", "logreg", "lightgbm"])
def test_head_save_load_round_trip_is_exact(tmp_path: Path, head: str) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 12)).astype(np.float32)
    y = (X[:, 0] + rng.normal(size=300) > 0).astype(int)
    spec = HeadSpec.create(head)
    fitted = make_head(spec, seed=3).fit(X, y)
    save_head(fitted, spec, tmp_path / "h", extra={"note": "t"})
    loaded, meta = load_head(tmp_path / "h")
    assert meta["note"] == "t"
    np.testing.assert_array_equal(loaded.predict_proba(X), fitted.predict_proba(X))


def test_rf_heads_are_refused_for_saving(tmp_path: Path) -> None:
    spec = HeadSpec.create("rf", {"n_estimators": 5})
    fitted = make_head(spec, seed=0).fit(np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2)
    with pytest.raises(InputError, match="without pickle"):
        save_head(fitted, spec, tmp_path / "rf", extra={})


@pytest.mark.slow  # every calibration on the demo (~45 s busy); .ci/run runs it
def test_calibration_does_not_worsen_reliability(demo: Store) -> None:
    oof = demo.query(
        "SELECT p.probability, c.label FROM predictions p JOIN cells c USING (cell_uid) WHERE p.run_id = ?",
        [_run(demo, "mlp")],
    )
    p = oof["probability"].to_numpy()
    y = (oof["label"] == "sensitive").to_numpy().astype(int)
    half = (
        np.random.default_rng(0).permutation(len(p)) < len(p) // 2
    )  # cross-fitted: fit on one half, score the other
    for method in ("platt", "isotonic"):
        cal_a = fit_calibrator(p[half], y[half], method=method)
        cal_b = fit_calibrator(p[~half], y[~half], method=method)
        calibrated = np.where(half, cal_b(p), cal_a(p))
        # ECE over 10 bins of ~1,100 cells has sampling noise of about 0.01
        assert expected_calibration_error(calibrated, y) <= expected_calibration_error(p, y) + 0.01, method


def test_predict_on_raw_pc9_scores_only_cells_passing_qc(demo: Store, tmp_path: Path) -> None:
    """Issue 17, acceptance 1 (on a subset) and 5: QC as at ingest; the output's conventions."""
    import scanpy as sc

    pc9 = shared_path("data", "real", "pc9_erlotinib_d11", "GSE149214_PC9_D11_erlotinib_raw_counts.h5ad")
    whole = ad.read_h5ad(pc9)
    rich = np.flatnonzero(np.asarray((whole.X > 0).sum(axis=1)).ravel() > 500)
    pick = np.sort(np.concatenate([rich[:120], np.arange(0, whole.n_obs, 60)[:240]]))
    small = whole[np.unique(pick)].copy()
    src = tmp_path / "pc9_small.h5ad"
    small.write_h5ad(src)
    qc = sc.pp.calculate_qc_metrics(
        ad.AnnData(X=small.X, var=pd.DataFrame({"mt": small.var_names.str.startswith("MT-")}, index=small.var_names)),
        qc_vars=["mt"], percent_top=None, log1p=False, inplace=False,
    )[0]  # fmt: skip
    passes = ((qc["n_genes_by_counts"] > 500) & (qc["pct_counts_mt"] < 10)).to_numpy()
    assert 50 < passes.sum() < small.n_obs - 50
    out = tmp_path / "pred.h5ad"
    run = _run(demo, "logreg")
    res = CliRunner().invoke(
        main,
        [
            "--store",
            str(demo.path),
            "predict",
            str(src),
            "--head",
            run,
            "--out",
            str(out),
            "--abstain",
            "0.3,0.7",
        ],
    )
    assert res.exit_code == 0, res.output
    scored = sc.read_h5ad(out)
    assert list(scored.obs_names) == list(small.obs_names)
    status = scored.obs["scdrugmap_status"].astype(str).to_numpy()
    np.testing.assert_array_equal(status != "not_scored", passes)  # exactly the cells passing ingest's QC
    assert (scored.obs["scdrugmap_call"].astype(str)[~passes] == "not_scored").all()
    assert scored.obs["scdrugmap_reason"][~passes].str.startswith("failed QC: ").all()
    assert f"QC (> 500 genes, < 10 % mito): {int((~passes).sum())} failed" in res.output
    p = scored.obs["scdrugmap_p_sensitive"].to_numpy()
    assert np.isfinite(p[passes]).all()
    assert ((p[passes] >= 0) & (p[passes] <= 1)).all()
    assert np.isnan(p[~passes]).all()
    calls = scored.obs["scdrugmap_call"].astype(str)[passes]
    inside = (p[passes] >= 0.3) & (p[passes] <= 0.7)
    assert ((calls == "abstain") == inside).all()
    assert set(calls[~inside]) <= {"sensitive", "resistant"}
    # conventions (acceptance 5): the embedding used, provenance, QC, calibration, versions
    emb = scored.obsm["X_scdrugmap_pca"]
    assert emb.shape == (small.n_obs, 50)
    assert "X_pca" not in scored.obsm
    assert np.isfinite(emb[passes]).all()
    assert np.isnan(emb[~passes]).all()
    meta = scored.uns["scdrugmap"]
    assert meta["run_id"] == run
    assert meta["positive_class"] == "sensitive"
    assert meta["model"] == "pca"
    assert (
        meta["revision"]
        == demo.query("SELECT revision FROM eval_runs WHERE run_id = ?", [run])["revision"][0]
    )
    assert meta["qc"]["n_failed"] == int((~passes).sum())
    assert meta["qc"]["min_genes"] == 500
    assert meta["calibration"]["method"] in ("platt", "isotonic", "none")
    assert "brier_raw" in meta["calibration"]["out_of_study"]["platt"]
    assert "scikit-learn" in meta["versions"]
    assert (demo.path / "heads" / run / "ensemble.json").exists()


def _cell_line_run_cells(st: Store, run: str) -> pd.DataFrame:
    return st.query(
        "SELECT c.obs_name, c.dataset_id, p.probability FROM predictions p JOIN cells c USING (cell_uid) "
        "WHERE p.run_id = ? ORDER BY c.cell_uid",
        [run],
    )


def test_predicting_a_file_that_trained_the_head_reports_no_in_sample_score(
    demo: Store, tmp_path: Path
) -> None:
    """Issue 17, acceptance 3: training cells get their out-of-fold prediction; figures kept apart."""
    run = _run(demo, "logreg")
    src = demo.path / "demo_input" / "SIM02.h5ad"
    n_metrics = len(demo.query("SELECT * FROM metrics"))
    res = CliRunner().invoke(main, ["--store", str(demo.path), "predict", str(src), "--head", run,
                                    "--out", str(tmp_path / "o.h5ad")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "accuracy on" not in res.output  # no accuracy of the head on its own training cells
    assert "out-of-fold (cross-validation) accuracy" in res.output
    assert "not a test on new cells" in res.output
    out = ad.read_h5ad(tmp_path / "o.h5ad").obs
    oof = _cell_line_run_cells(demo, run)
    oof = oof[oof["dataset_id"] == "SIM02"].set_index("obs_name")
    trained = out.index.isin(oof.index)
    assert trained.sum() == len(oof) > 100
    assert (out["scdrugmap_status"].astype(str)[trained] == "out_of_fold").all()
    np.testing.assert_allclose(
        out["scdrugmap_p_sensitive_raw"][trained], oof.loc[out.index[trained], "probability"]
    )
    assert (
        out["scdrugmap_status"].astype(str)[~trained] == "not_scored"
    ).all()  # failed QC at ingest and now
    # apart from cross-validation: own tables, nothing added to metrics / eval_runs
    assert len(demo.query("SELECT * FROM metrics")) == n_metrics
    assert demo.query("SELECT COUNT(*) AS n FROM eval_runs WHERE strategy = 'predict'")["n"][0] == 0
    figs = demo.query("SELECT cells, value, n FROM predict_metrics m JOIN predict_runs r USING (pred_id) "
                      "WHERE r.dataset_id = 'SIM02'").set_index("cells")  # fmt: skip
    assert figs.loc["new", "n"] == 0
    assert pd.isna(figs.loc["new", "value"])
    # the same cells in memory, reordered and renamed: recognised by the content of their rows
    from scdrugmap.classify.predict import predict

    a = ad.read_h5ad(src)[::-1].copy()
    a.obs_names = [f"x{i}" for i in range(a.n_obs)]
    mem = predict(a, head=run, store=demo)
    assert (mem.cells["status"] == "out_of_fold").sum() == len(oof)
    assert mem.summary["figures"] == {"labelled": False}


def test_fold_heads_reproduce_the_out_of_fold_scores(demo: Store) -> None:
    """New cells are scored by the kind of model the calibrator was fitted on: the run's fold heads."""
    from scdrugmap.classify.fold_heads import fold_ensemble
    from scdrugmap.classify.predict import _run_row
    from scdrugmap.store.embeddings import open_array, read_rows

    run = _run(demo, "logreg")
    row = _run_row(demo, run)
    ens = fold_ensemble(demo, row)
    preds = demo.query("SELECT fold, cell_uid, probability FROM predictions WHERE run_id = ?", [run])
    X = read_rows(open_array(demo, row["model"], row["revision"]), preds["cell_uid"].to_numpy())
    for f, head in zip(ens.meta["folds"], ens.heads, strict=True):
        sel = (preds["fold"] == f).to_numpy()
        np.testing.assert_allclose(head.predict_proba(X[sel]), preds["probability"][sel], atol=1e-6)
    assert len(ens.heads) == 10


def test_out_of_study_calibration_checks_recompute_with_sklearn(demo: Store) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import brier_score_loss

    from scdrugmap.classify.calibration_check import calibration_checks, default_calibration
    from scdrugmap.classify.fold_heads import oof_predictions

    run = _run(demo, "logreg")
    checks = calibration_checks(demo, run)
    assert set(checks["method"]) == {"platt", "isotonic"}
    oof = oof_predictions(demo, run)
    p, y = oof["probability"].to_numpy(), (oof["label"] == "sensitive").to_numpy().astype(int)
    logit = np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))[:, None]
    cal = np.empty_like(p)
    for s in oof["study"].unique():
        test = (oof["study"] == s).to_numpy()
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(logit[~test], y[~test])
        cal[test] = lr.predict_proba(logit[test])[:, 1]
    pooled = checks[(checks["method"] == "platt") & (checks["study"] == "*")].iloc[0]
    assert pooled["n"] == len(p)
    assert pooled["brier_raw"] == pytest.approx(brier_score_loss(y, p), abs=1e-9)
    assert pooled["brier_calibrated"] == pytest.approx(brier_score_loss(y, cal), abs=1e-6)
    bins = np.minimum((cal * 10).astype(int), 9)
    ece = sum((bins == b).mean() * abs(y[bins == b].mean() - cal[bins == b].mean()) for b in np.unique(bins))
    assert pooled["ece_calibrated"] == pytest.approx(ece, abs=1e-6)
    method, _ = default_calibration(checks)
    best = checks[checks["study"] == "*"].sort_values("brier_calibrated").iloc[0]
    assert method == (best["method"] if best["brier_calibrated"] < best["brier_raw"] else "none")


def test_export_and_in_memory_anndata_api(demo: Store, tmp_path: Path) -> None:
    import scanpy as sc

    from scdrugmap.classify.predict import predict
    from scdrugmap.store.ingest import ingest_anndata

    res = CliRunner().invoke(main, ["--store", str(demo.path), "export", "SIM01", "--model", "pca",
                                    "--out", str(tmp_path / "e.h5ad")])  # fmt: skip
    assert res.exit_code == 0, res.output
    e = sc.read_h5ad(tmp_path / "e.h5ad")
    assert e.obsm["X_scdrugmap_pca"].shape[1] == 50
    assert "X_pca" not in e.obsm
    fresh = ad.read_h5ad(demo.path / "demo_input" / "SIM05.h5ad")
    fresh.obs_names = [f"new{i}" for i in range(fresh.n_obs)]
    rep = ingest_anndata(demo, fresh, dataset_id="MEM05", label_key="response", sample_key="sample_id")
    assert rep.status == "ingested"
    assert 0 < rep.n_cells <= fresh.n_obs
    assert (
        ingest_anndata(demo, fresh, dataset_id="MEM05", label_key="response", sample_key="sample_id").status
        == "unchanged"
    )
    out = predict(fresh, head=_run(demo, "logreg"), store=demo)
    assert "scdrugmap_p_sensitive" not in fresh.obs  # the caller's object is left alone
    assert out.adata.obs["scdrugmap_call"].isin(["sensitive", "resistant", "abstain", "not_scored"]).all()
    assert (out.cells["status"] == "scored").sum() == rep.n_cells  # bone-marrow cells never trained the head
    with pytest.raises(InputError, match=r"needs an anndata\.AnnData"):
        ingest_anndata(demo, "file.h5ad", dataset_id="X")


def test_predict_refuses_changed_revision_and_low_coverage(demo: Store, tmp_path: Path) -> None:
    from synth import toy_adata

    run = _run(demo, "logreg")
    few = toy_adata(n_cells=30, n_genes=50, seed=1)  # genes the head never saw
    src = tmp_path / "few.h5ad"
    few.write_h5ad(src)
    res = CliRunner().invoke(
        main,
        ["--store", str(demo.path), "predict", str(src), "--head", run, "--out", str(tmp_path / "o.h5ad")],
    )
    assert res.exit_code == 1
    assert "no cell passes QC" in res.output  # 50 genes: QC as at ingest refuses first
    res = CliRunner().invoke(
        main,
        ["--store", str(demo.path), "predict", str(src), "--head", run, "--out", str(tmp_path / "o.h5ad"),
         "--min-genes", "0"],
    )  # fmt: skip
    assert res.exit_code == 1
    assert "covers only" in res.output
    assert not (tmp_path / "o.h5ad").exists()
    # the embedder rebuilt from the recorded options no longer gives the head's revision: refused
    import json

    from scdrugmap.classify.predict import predict_file

    rev = demo.query("SELECT revision FROM eval_runs WHERE run_id = ?", [run])["revision"].iloc[0]
    spec = demo.query("SELECT spec FROM embeddings WHERE revision = ?", [rev])["spec"].iloc[0]
    changed = json.loads(spec)
    changed["options"] = {"n_comps": 49}
    try:
        with demo.transaction() as con:
            con.execute("UPDATE embeddings SET spec = ? WHERE revision = ?", [json.dumps(changed), rev])
        with pytest.raises(InputError, match="now give revision"):
            predict_file(demo, run, src, out=tmp_path / "o2.h5ad")
    finally:
        with demo.transaction() as con:
            con.execute("UPDATE embeddings SET spec = ? WHERE revision = ?", [spec, rev])
    res = CliRunner().invoke(main, ["--store", str(demo.path), "predict", str(src), "--head", "run-nope"])
    assert res.exit_code == 1
    assert "no evaluation run" in res.output
