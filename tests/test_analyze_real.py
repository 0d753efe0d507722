"""Biology views on real data from ../shared (skipped when absent).

SCAD A375 / PLX4720 (z-scored log expression: analysed as given, never re-logged) through DE,
biomarkers and separation; PC9 erlotinib day-11 raw counts (one class) through ``analyze gene`` and
``analyze pseudotime``.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared_path

from scdrugmap.cli import main
from scdrugmap.store import Store


def _ok(args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    a375 = shared_path("data", "real", "scad_targets", "SCAD_PLX4720_A375_GSE108383_tp4k_z.h5ad")
    pc9 = shared_path("data", "real", "pc9_erlotinib_d11", "GSE149214_PC9_D11_erlotinib_raw_counts.h5ad")
    store = tmp_path_factory.mktemp("real_analyze") / "store"
    base = ["--store", str(store)]
    _ok([*base, "ingest", str(a375), "--dataset-id", "a375", "--label-key", "label_PLX4720", "--meta", "tissue=Cell line",
         "--meta", "cancer_type=Melanoma", "--meta", "drug=PLX4720"])  # fmt: skip
    _ok([*base, "ingest", str(pc9), "--dataset-id", "pc9", "--label-key", "scDEAL_scAdaDrug_label", "--sample-key",
         "batch", "--meta", "tissue=Cell line", "--meta", "cancer_type=Non-small cell lung cancer"])  # fmt: skip
    _ok([*base, "embed", "--model", "pca", "--no-progress"])
    return store


def test_real_scaled_de_biomarkers_separation(real: Path, tmp_path: Path) -> None:
    base = ["--store", str(real)]
    report = tmp_path / "report"
    out = _ok([*base, "analyze", "de", "--dataset", "a375", "--out", str(report), "--csv", str(tmp_path)])
    assert "wilcoxon" in out
    assert "pseudobulk" not in out.split("\n")[0]
    st = Store.open(real)
    run = st.query("SELECT de_id, effect_unit, n_significant, spec FROM de_runs").iloc[0]
    assert run["effect_unit"].startswith("difference of mean values")
    assert '"x_kind": "scaled"' in run["spec"]
    assert run["n_significant"] > 50  # parental vs BRAF-inhibitor-resistant A375 differ a lot
    # z-scores are analysed as given: the reported means are plain means of the file's values
    src = ad.read_h5ad(shared_path("data", "real", "scad_targets", "SCAD_PLX4720_A375_GSE108383_tp4k_z.h5ad"))
    res = st.query("SELECT gene, mean_resistant FROM de_results WHERE de_id = ? LIMIT 5", [run["de_id"]])
    sym = src.var["gene_symbol"].astype(str).to_numpy()
    X = np.asarray(src.X.toarray() if hasattr(src.X, "toarray") else src.X)
    resistant = (src.obs["label_PLX4720"] == "resistant").to_numpy()
    for gene, mean in zip(res["gene"], res["mean_resistant"], strict=True):
        j = int(np.flatnonzero(sym == gene)[0])
        assert mean == pytest.approx(float(X[resistant, j].mean()), rel=1e-4, abs=1e-5)
    out = _ok([*base, "analyze", "biomarkers", "--dataset", "a375", "--out", str(report)])
    auc = float(out.split("CV AUROC ")[1].split()[0])
    assert auc > 0.9
    out = _ok(
        [*base, "analyze", "separation", "--model", "pca", "--category", "cancer_type", "--out", str(report)]
    )
    sep = st.query("SELECT * FROM separation WHERE scope = 'dataset' AND value = 'a375'").iloc[0]
    assert sep["silhouette"] > sep["silhouette_shuffled"] + 0.05
    assert (
        sep["knn_purity"] > sep["knn_purity_expected"] + 0.05
    )  # pca is fitted on pc9 counts + a375 z-scores
    assert len(list(report.glob("*.png"))) == 3
    assert len(list(report.glob("*.svg"))) == 3
    assert (report / "index.md").read_text().count("\n- [") == 3
    assert len(list(tmp_path.glob("de-*.csv"))) == 1


def test_real_pc9_gene_and_pseudotime(real: Path, tmp_path: Path) -> None:
    base = ["--store", str(real)]
    out = _ok([*base, "analyze", "gene", "CD44", "--out", str(tmp_path)])
    st = Store.open(real)
    views = st.query("SELECT * FROM gene_views WHERE gene = 'CD44' ORDER BY dataset_id").set_index(
        "dataset_id"
    )
    assert set(views.index) == {"a375", "pc9"}
    assert "pc9" in out
    assert views.loc["pc9", "value_kind"] == "log1p CP10k"
    assert views.loc["pc9", "n_sensitive"] == 0
    assert np.isnan(views.loc["pc9", "p"])
    assert views.loc["a375", "value_kind"] == "scaled"
    assert views.loc["a375", "p"] < 1
    out = _ok([*base, "analyze", "pseudotime", "--dataset", "pc9", "--out", str(tmp_path)])
    assert "no resistant/sensitive contrast" in out
    pt = st.query("SELECT * FROM pseudotime_runs WHERE dataset_id = 'pc9'").iloc[0]
    n_cells = st.query("SELECT n_cells FROM datasets WHERE dataset_id = 'pc9'")["n_cells"].iloc[0]
    assert pt["n_cells"] == n_cells
    assert np.isnan(pt["spearman_label"])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["gene_CD44.png", "pseudotime_pc9.png"]
