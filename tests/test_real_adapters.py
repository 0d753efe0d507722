"""Every adapter on real raw counts: PC9 erlotinib cells (QC on real counts) through the runner,
coverage recorded in the catalog, then `evaluate` on the embeddings (skipped when ../shared is absent)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import model_fixture, shared_path
from synth import toy_adata

from scdrugmap.cli import main
from scdrugmap.store import Store

MODELS = {
    "geneformer": [],
    "tgpt": [],
    "scgpt": [],
    "uce": ["--option", "nhead=4"],
    "cellplm": [],
    "scbert": ["--option", "batch_size=4"],  # every cell is 16,907 tokens: batches of 32 took 3.6 GB
    "celllm": [],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pc9 = ad.read_h5ad(
        shared_path("data", "real", "pc9_erlotinib_d11", "GSE149214_PC9_D11_erlotinib_raw_counts.h5ad")
    )
    rich = np.flatnonzero(np.asarray((pc9.X > 0).sum(axis=1)).ravel() > 600)
    tmp = tmp_path_factory.mktemp("real_adapters")
    small = pc9[rich[:30]].copy()
    small.write_h5ad(tmp / "pc9.h5ad")
    # a labelled sensitive counterpart over real HGNC symbols (PC9 day 11 holds resistant persisters only)
    other = toy_adata(n_cells=30, n_genes=2500, seed=5)
    other.obs["response"] = "sensitive"
    other.write_h5ad(tmp / "sens.h5ad")
    path = tmp / "store"
    runner = CliRunner()
    for args in (
        ["ingest", str(tmp / "pc9.h5ad"), "--dataset-id", "pc9", "--label-key", "scDEAL_scAdaDrug_label",
         "--meta", "tissue=Cell line"],
        ["ingest", str(tmp / "sens.h5ad"), "--dataset-id", "sens", "--label-key", "response", "--min-genes", "300",
         "--meta", "tissue=Cell line"],
    ):  # fmt: skip
        res = runner.invoke(main, ["--store", str(path), *args])
        assert res.exit_code == 0, res.output
    return path


@pytest.mark.parametrize("model", list(MODELS))
def test_adapter_embeds_real_counts_and_evaluates(store: Path, model: str) -> None:
    tiny = model_fixture(model) / "tiny"
    runner = CliRunner()
    base = ["--store", str(store)]
    res = runner.invoke(
        main, [*base, "embed", "--model", model, "--checkpoint", str(tiny), "--no-progress", *MODELS[model]]
    )
    assert res.exit_code == 0, res.output
    st = Store.open(store)
    cov = st.query(
        "SELECT dataset_id, frac_genes, frac_counts FROM coverage WHERE model = ? ORDER BY 1", [model]
    )
    assert cov["dataset_id"].tolist() == ["pc9", "sens"]
    assert (cov["frac_genes"] > 0).all()
    assert cov["frac_counts"].between(0, 1).all()
    emb = st.query("SELECT rows_done, rows_selected, status FROM embeddings WHERE model = ?", [model]).iloc[0]
    assert emb["status"] == "complete"
    res = runner.invoke(main, [*base, "evaluate", "--model", model, "--head", "logreg", "--category", "tissue",
                               "--value", "Cell line", "--group", "cell", "--k", "3"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert model in res.output
