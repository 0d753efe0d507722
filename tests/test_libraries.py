"""Library replacements of hand-written code (issue #20) give the results of the code they replaced.

Each test keeps a copy of the replaced implementation as the reference.
"""

from __future__ import annotations

from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdrugmap.classify.analyze import de


def _old_aggregate(X, key: pd.Series, groups: pd.Index, how: Literal["sum", "mean"]) -> np.ndarray:
    """The indicator-matrix aggregation ``classify/analyze/de.py`` had before scanpy.get.aggregate."""
    codes = pd.Categorical(key, categories=groups).codes
    ok = codes >= 0
    ind = sp.csr_matrix((np.ones(ok.sum()), (codes[ok], np.flatnonzero(ok))), shape=(len(groups), len(key)))
    agg = np.asarray((ind @ X).toarray() if sp.issparse(X) else ind @ np.asarray(X))
    if how == "mean":
        agg = agg / np.asarray(ind.sum(axis=1))
    return agg


def _pb_adata(*, counts: bool, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    n, g = 240, 40
    lab = np.repeat(["resistant", "sensitive"], n // 2)
    sample = np.array([f"s{i % 6}" for i in range(n)], dtype=object)
    sample[::17] = None  # cells without a sample are left out
    mu = np.where(np.arange(g) < 5, 6.0, 2.0)[None, :] * np.where(lab == "resistant", 2.0, 1.0)[:, None]
    C = sp.csr_matrix(rng.poisson(mu).astype(np.float32))
    obs = pd.DataFrame(
        {"label": lab, "sample_id": sample, "dataset_id": np.where(np.arange(n) < 180, "d1", "d2")},
        index=[f"c{i}" for i in range(n)],
    )
    a = ad.AnnData(X=C.copy(), obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(g)]))
    if counts:
        a.layers["counts"] = C.copy()
        a.uns["x_kind"] = "counts"
    else:
        a.X = sp.csr_matrix(np.log1p(C.toarray()))
        a.uns["x_kind"] = "lognorm"
    return a


@pytest.mark.parametrize("how", ["sum", "mean"])
@pytest.mark.parametrize("dense", [False, True])
def test_aggregate_equals_indicator_matrix(how: str, dense: bool) -> None:
    rng = np.random.default_rng(7)
    X = sp.random(300, 50, density=0.2, random_state=3, format="csr", dtype=np.float32)
    X.data = rng.poisson(5, X.nnz).astype(np.float32) + 1
    if dense:
        X = X.toarray()
    key = pd.Series(rng.choice(["a|x|r", "b|y|s", "c|z|r", "d|w|s", "rare"], 300))
    key[rng.random(300) < 0.1] = np.nan
    groups = pd.Index(["c|z|r", "a|x|r", "d|w|s", "b|y|s"])  # not sorted; "rare" left out
    got = de._aggregate(X, key, groups, how)
    want = _old_aggregate(X, key, groups, how)
    assert got.shape == (4, 50)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("counts", [True, False])
def test_pseudobulk_de_unchanged(counts: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _pb_adata(counts=counts)
    new, info_new = de.pseudobulk_de(a, min_cells=5)
    monkeypatch.setattr(de, "_aggregate", _old_aggregate)
    old, info_old = de.pseudobulk_de(a, min_cells=5)
    assert info_new == info_old
    pd.testing.assert_frame_equal(new, old)
    assert new["p"].notna().any()
