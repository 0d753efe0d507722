"""predict: frozen head on new cells, calibration, abstention, refusals; head save/load round trip."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared_path

from classify.calibrate import expected_calibration_error, fit_calibrator
from classify.demo import run_demo
from classify.heads import HeadSpec, make_head
from classify.persist import load_head, save_head
from cli import main
from store import Store
from store.errors import InputError


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


def test_predict_on_real_pc9_with_a_head_trained_on_simulation(demo: Store, tmp_path: Path) -> None:
    pc9 = shared_path("data", "real", "pc9_erlotinib_d11", "GSE149214_PC9_D11_erlotinib_raw_counts.h5ad")
    small = ad.read_h5ad(pc9)
    small = small[np.asarray(small.X.sum(axis=1)).ravel() > 3000][:150].copy()
    src = tmp_path / "pc9_small.h5ad"
    small.write_h5ad(src)
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
    scored = ad.read_h5ad(out)
    assert scored.n_obs == small.n_obs
    assert list(scored.obs_names) == list(small.obs_names)
    prob = scored.obs["scdrugmap_probability"].to_numpy()
    assert np.isfinite(prob).all()
    assert ((prob >= 0) & (prob <= 1)).all()
    labels = scored.obs["scdrugmap_label"]
    assert set(labels) <= {"sensitive", "resistant", "abstain"}
    inside = (prob >= 0.3) & (prob <= 0.7)
    assert ((labels == "abstain") == inside).all()
    assert f"{int(inside.sum())} abstained" in res.output
    assert (demo.path / "heads" / run / "head.json").exists()


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
    assert "covers only" in res.output
    assert not (tmp_path / "o.h5ad").exists()
    # the embedder rebuilt from the recorded options no longer gives the head's revision: refused
    import json

    from classify.predict import predict_file

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
