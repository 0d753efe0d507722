"""Issue 17 acceptance 2 and 3 on real data: the SCAD cell-line selection, predicting A375 (slow)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared_path

from scdrugmap.cli import main
from scdrugmap.store import Store
from scdrugmap.store.ingest import ingest_h5ad

SCAD = {
    "scad_plx4720": ("SCAD_PLX4720_A375_GSE108383_tp4k_z.h5ad", "label_PLX4720", "Melanoma"),
    "scad_gefitinib": ("SCAD_2celllines_66cells_Gefitinib_AR42_Vorinostat_tp4k_z.h5ad", "label_Gefitinib", "HNSCC"),
    "scad_sorafenib": ("SCAD_2celllines_120cells_Sorafenib_Afatinib_Cetuximab_NVP-TAE684_tp4k_z.h5ad", "label_Sorafenib", "HNSCC"),
}  # fmt: skip


def _ok(args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.slow
@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_a375_default_calibration_agrees_with_raw_unless_validated(tmp_path: Path, head: str) -> None:
    from sklearn.metrics import brier_score_loss

    from scdrugmap.classify.calibration_check import calibration_checks
    from scdrugmap.classify.fold_heads import oof_predictions

    scad = shared_path("data", "real", "scad_targets")
    st = Store.open(tmp_path / "store", create=True)
    for ds, (fname, key, cancer) in SCAD.items():
        ingest_h5ad(st, scad / fname, dataset_id=ds, label_key=key,
                    meta={"tissue": "Cell line", "study": ds, "cancer_type": cancer})  # fmt: skip
    base = ["--store", str(st.path)]
    _ok([*base, "embed", "--model", "pca", "--no-progress"])
    _ok([*base, "evaluate", "--model", "pca", "--head", head, "--protocol", "pooled", "--value", "Cell line"])
    run = st.query("SELECT run_id FROM eval_runs WHERE head = ?", [head])["run_id"].iloc[0]

    # the A375 file trained the head: out-of-fold predictions only, no in-sample accuracy (acceptance 3)
    a375 = scad / SCAD["scad_plx4720"][0]
    out = _ok([*base, "predict", str(a375), "--head", run, "--out", str(tmp_path / "a375.h5ad")])
    assert "accuracy on" not in out
    obs = ad.read_h5ad(tmp_path / "a375.h5ad").obs
    assert (obs["scdrugmap_status"] == "out_of_fold").all()

    # the same cells as new cells (values nudged, so not recognised): fold-head ensemble + default calibration
    new = ad.read_h5ad(a375)
    new.X = np.asarray(new.X) + 1e-4
    new.obs_names = [f"new_{n}" for n in new.obs_names]
    src = tmp_path / "a375_new.h5ad"
    new.write_h5ad(src)
    out = _ok([*base, "predict", str(src), "--head", run, "--out", str(tmp_path / "default.h5ad")])
    pred = ad.read_h5ad(tmp_path / "default.h5ad")
    assert (pred.obs["scdrugmap_status"] == "scored").all()
    cal = pred.uns["scdrugmap"]["calibration"]
    checks = calibration_checks(st, run)
    pooled = checks[checks["study"] == "*"].set_index("method")
    raw_calls = np.where(pred.obs["scdrugmap_p_sensitive_raw"] >= 0.5, "sensitive", "resistant")
    calls = pred.obs["scdrugmap_call"].astype(str).to_numpy()
    if cal["method"] == "none":
        np.testing.assert_array_equal(calls, raw_calls)
    else:  # calibration only where the out-of-study check showed it lowers Brier
        assert pooled.loc[cal["method"], "brier_calibrated"] < pooled.loc[cal["method"], "brier_raw"]
    assert f"calibration {cal['method']}" in out
    truth = new.obs["label_PLX4720"].astype(str).to_numpy()
    acc_default, acc_raw = (calls == truth).mean(), (raw_calls == truth).mean()
    print(
        f"{head}: A375 as new cells, accuracy default ({cal['method']}) {acc_default:.3f}, raw {acc_raw:.3f}"
    )
    print(pooled[["n", "brier_raw", "brier_calibrated", "ece_raw", "ece_calibrated"]])
    # the stored out-of-study figures are recomputable with sklearn: raw Brier of the pooled held-out cells
    oof = oof_predictions(st, run)
    y = (oof["label"] == "sensitive").to_numpy().astype(int)
    assert pooled.loc["platt", "brier_raw"] == pytest.approx(
        brier_score_loss(y, oof["probability"]), abs=1e-9
    )
    assert int(pooled.loc["platt", "n"]) == len(oof) == 294
