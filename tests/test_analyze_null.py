"""Pseudobulk vs cell-level DE on a simulated null: sample-level labels, no planted effect.

Every sample gets its own gene-wise expression shift (biological replicate variation) and the
label is a property of the sample, so no gene truly differs between labels. The cell-level test
treats cells as independent and calls many of the sample shifts significant; the pseudobulk test
(one unit per sample) keeps its false-positive rate near the nominal level.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from synth import hgnc_symbols

from scdrugmap.classify.analyze.de_run import run_de
from scdrugmap.store import Store
from scdrugmap.store.errors import InputError
from scdrugmap.store.ingest import ingest_h5ad


def _null_counts(
    path: Path, *, n_samples: int = 10, cells_per_sample: int = 60, n_genes: int = 600, seed: int = 1
) -> Path:
    rng = np.random.default_rng(seed)
    genes = list(hgnc_symbols()[:n_genes])
    base = rng.gamma(1.5, 1.0, n_genes) + 0.05
    sample = np.repeat(np.arange(n_samples), cells_per_sample)
    shift = rng.normal(0.0, 0.35, (n_samples, n_genes))  # sample-to-sample variation, unrelated to the label
    lib = rng.lognormal(np.log(2.0), 0.3, sample.size)
    mu = lib[:, None] * base[None, :] * np.exp(shift[sample])
    X = rng.poisson(rng.gamma(5.0, mu / 5.0)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "sample": [f"P{s}" for s in sample],
            "response": np.where(sample % 2 == 1, "resistant", "sensitive"),
        },
        index=[f"cell{i}" for i in range(sample.size)],
    )
    ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def null_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    tmp = tmp_path_factory.mktemp("null")
    st = Store.open(tmp / "store", create=True)
    ingest_h5ad(st, _null_counts(tmp / "null.h5ad"), dataset_id="NULL", label_key="response", sample_key="sample",
                min_genes=0)  # fmt: skip
    return st


def test_pseudobulk_has_fewer_false_positives_than_cell_level(null_store: Store) -> None:
    out = {o.spec.method: o for o in run_de(null_store, ["NULL"], min_log2fc=0.0)}
    assert set(out) == {"wilcoxon", "pseudobulk"}
    fpr = {m: float((o.table["p"] < 0.05).mean()) for m, o in out.items()}
    called = {m: int(o.table["significant"].sum()) for m, o in out.items()}
    print(f"nominal false-positive rate (p < 0.05): {fpr}; BH-significant genes: {called}")
    assert fpr["wilcoxon"] > 0.3  # cells are not independent replicates
    assert fpr["pseudobulk"] < 0.12
    assert called["pseudobulk"] < called["wilcoxon"] / 5
    info = out["pseudobulk"].info
    assert info["n_samples_resistant"] == 5
    assert info["n_samples_sensitive"] == 5
    assert "PyDESeq2" in info["test"]
    runs = null_store.query("SELECT method, n_genes, n_significant, effect_unit FROM de_runs ORDER BY method")
    assert list(runs["method"]) == ["pseudobulk", "wilcoxon"]
    assert (runs["effect_unit"] == "log2 fold change").all()


def test_pseudobulk_needs_samples(null_store: Store) -> None:
    with pytest.raises(InputError, match="≥ 2 samples per label"):
        run_de(null_store, ["NULL"], methods=["pseudobulk"], min_cells=100)
