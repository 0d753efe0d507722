"""The spine on real data from ../shared/data/real (skipped when ../shared is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared_path
from sklearn import metrics as skm

from scdrugmap.cli import main
from scdrugmap.store import Store

SCAD = {
    "scad_plx4720": ("SCAD_PLX4720_A375_GSE108383_tp4k_z.h5ad", "label_PLX4720", "PLX4720", "Melanoma"),
    "scad_gefitinib": ("SCAD_2celllines_66cells_Gefitinib_AR42_Vorinostat_tp4k_z.h5ad", "label_Gefitinib", "Gefitinib", "Head and neck cancer"),
    "scad_sorafenib": ("SCAD_2celllines_120cells_Sorafenib_Afatinib_Cetuximab_NVP-TAE684_tp4k_z.h5ad", "label_Sorafenib", "Sorafenib", "Head and neck cancer"),
}  # fmt: skip


def _ok(args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def real_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scad_dir = shared_path("data", "real", "scad_targets")
    emb_file = shared_path(
        "data", "real", "scfoundation_embeddings", "scFoundation50M_Target_120cells_Sorafenib_NVP.h5ad"
    )
    pc9 = shared_path("data", "real", "pc9_erlotinib_d11", "GSE149214_PC9_D11_erlotinib_raw_counts.h5ad")
    tmp = tmp_path_factory.mktemp("real")
    manifest = tmp / "scad.csv"
    lines = ["path,dataset_id,label_key,collection,study,tissue,cancer_type,drug,drug_class,source"]
    for ds, (fname, key, drug, cancer) in SCAD.items():
        lines.append(
            f"{scad_dir / fname},{ds},{key},scad,{ds},Cell line,{cancer},{drug},targeted therapy,cell line"
        )
    manifest.write_text("\n".join(lines) + "\n")
    store = tmp / "store"
    base = ["--store", str(store)]
    _ok([*base, "ingest", "--manifest", str(manifest)])
    out = _ok([
        *base, "import-embeddings", str(emb_file), "--dataset-id", "scad_sorafenib", "--obsm", "X_scFoundation",
        "--model", "scfoundation_published",
    ])  # fmt: skip
    assert "120 × 3072" in out
    out = _ok([
        *base, "ingest", str(pc9), "--dataset-id", "pc9_erlotinib_d11", "--label-key", "scDEAL_scAdaDrug_label",
        "--sample-key", "batch", "--meta", "collection=validation", "--meta", "drug=erlotinib",
        "--meta", "cancer_type=Non-small cell lung cancer", "--meta", "source=cell line",
    ])  # fmt: skip
    assert "/14600 cells after QC" in out
    _ok([*base, "embed", "--model", "pca", "--no-progress"])
    return store


def test_real_ingest_qc_and_gene_mapping(real_store: Path) -> None:
    st = Store.open(real_store)
    ds = st.datasets().set_index("dataset_id")
    assert (ds.loc[list(SCAD), "x_kind"] == "scaled").all()
    assert not ds.loc[list(SCAD), "qc_applied"].any()
    pc9 = ds.loc["pc9_erlotinib_d11"]
    assert pc9["x_kind"] == "counts"
    assert pc9["qc_applied"]
    assert 0 < pc9["n_cells"] < 2121  # most barcodes are empty droplets; > 500 genes is stricter than 200
    assert pc9["n_genes_mapped"] > 0.6 * pc9["n_genes"]
    # SCAD var_names are Entrez ids: the gene_symbol column is picked up automatically
    assert (ds.loc[list(SCAD), "n_genes_mapped"] > 0.95 * ds.loc[list(SCAD), "n_genes"]).all()
    labels = st.query("SELECT label, COUNT(*) AS n FROM cells WHERE dataset_id = 'scad_plx4720' GROUP BY 1")
    assert dict(zip(labels["label"], labels["n"], strict=True)) == {"sensitive": 62, "resistant": 46}
    emb = st.query("SELECT * FROM embeddings WHERE model = 'scfoundation_published'").iloc[0]
    assert emb["dim"] == 3072
    assert emb["rows_done"] == 120


@pytest.mark.slow  # every head on the real cell lines (~1 min on a free machine); .ci/run runs it
def test_real_evaluate_pooled_and_cross(real_store: Path) -> None:
    base = ["--store", str(real_store)]
    for head in ("logreg", "mlp"):
        for protocol in ("pooled", "cross"):
            out = _ok([*base, "evaluate", "--model", "pca", "--head", head, "--protocol", protocol,
                       "--category", "drug_class", "--value", "targeted therapy"])  # fmt: skip
            assert "targeted therapy" in out
    _ok([*base, "evaluate", "--model", "scfoundation_published", "--head", "logreg", "--category", "study",
         "--value", "scad_sorafenib", "--k", "5"])  # fmt: skip
    out = _ok([*base, "sql", "--csv", "SELECT r.protocol, r.head, m.fold, m.metric, m.value FROM metrics m "
               "JOIN eval_runs r USING (run_id) WHERE r.model = 'pca' AND m.metric = 'auroc' ORDER BY 1, 2, 3"])  # fmt: skip
    rows = out.strip().splitlines()
    assert rows[0] == "protocol,head,fold,metric,value"
    assert len(rows) == 1 + 2 * (10 + 3)  # two heads × (10 pooled folds + 3 held-out studies)

    st = Store.open(real_store)
    runs = st.query("SELECT run_id FROM eval_runs")["run_id"]
    assert len(runs) == 5
    for run_id in runs:
        preds = st.query(
            "SELECT p.fold, p.probability, c.label FROM predictions p JOIN cells c USING (cell_uid) WHERE run_id = ?",
            [run_id],
        )
        stored = st.query("SELECT fold, metric, value, reason FROM metrics WHERE run_id = ?", [run_id])
        for fold, part in preds.groupby("fold"):
            y = (part["label"] == "sensitive").to_numpy().astype(int)
            p = part["probability"].to_numpy()
            got = stored[stored["fold"] == fold].set_index("metric")
            assert got.loc["accuracy", "value"] == pytest.approx(skm.accuracy_score(y, p >= 0.5))
            if np.unique(y).size == 2:
                assert got.loc["auroc", "value"] == pytest.approx(skm.roc_auc_score(y, p))
                assert got.loc["auprc", "value"] == pytest.approx(skm.average_precision_score(y, p))
                assert got.loc["f1", "value"] == pytest.approx(skm.f1_score(y, p >= 0.5))
            else:
                assert np.isnan(got.loc["auroc", "value"])
                assert got.loc["auroc", "reason"].startswith("test fold has only")
