"""Issue 21, acceptance 4: the recommendation names, per tissue, the best model/head with its evidence
(mean, interval over seeds, runs, margin over the baseline and the next model) and says "not enough
evidence" where the intervals overlap.

Two tissues of toy data with a strong, sample-level label signal, embedded with ``pca``; two more
embeddings are planted next to it: ``pca_twin`` (pca plus 1e-4 noise: a near-identical model) and
``noise`` (Gaussian noise: no signal). Tissue A holds pca and pca_twin (intervals overlap → not enough
evidence), tissue B pca and noise (pca clearly wins). Runs: logreg, pooled, 3 folds, seeds 0, 1, 2.
The full CLI path on the simulated demo (pca and hvg, logreg and mlp, pooled and cross-data) is the
slow test at the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from synth import toy_adata

from scdrugmap.classify.analyze.harmony import write_embedding
from scdrugmap.classify.evaluate import evaluate
from scdrugmap.classify.recommend import NOT_ENOUGH, candidates, recommend
from scdrugmap.cli import main
from scdrugmap.embedder.runner import embed_datasets
from scdrugmap.store import Store
from scdrugmap.store.embeddings import open_array, read_rows, resolve_revision
from scdrugmap.store.errors import InputError
from scdrugmap.store.manifest import ingest_manifest

SEEDS = [0, 1, 2]


def _ok(store: Path, *args: str) -> str:
    res = CliRunner().invoke(main, ["--store", str(store), *args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    tmp = tmp_path_factory.mktemp("recommend")
    rows = ["path,dataset_id,label_key,sample_key,study,tissue,min_genes"]
    for i, tissue in enumerate(("Tissue A", "Tissue B")):
        toy_adata(n_cells=240, seed=40 + i, n_samples=12, prefix=f"r{i}_").write_h5ad(tmp / f"r{i}.h5ad")
        rows.append(f"r{i}.h5ad,r{i},response,sample,st{i},{tissue},100")
    (tmp / "manifest.csv").write_text("\n".join(rows) + "\n")
    st = Store.open(tmp / "store", create=True)
    ingest_manifest(st, tmp / "manifest.csv")
    embed_datasets(st, "pca", progress=False, options={"n_comps": 10})
    rev = resolve_revision(st, "pca")
    uids = st.query("SELECT cell_uid FROM embedded_cells WHERE revision = ? ORDER BY 1", [rev])["cell_uid"]
    uids = uids.to_numpy(dtype=np.int64)
    X = read_rows(open_array(st, "pca", rev), uids)
    rng = np.random.default_rng(0)
    for name, values in (("pca_twin", X + rng.normal(0, 1e-4, X.shape)), ("noise", rng.normal(size=X.shape))):
        write_embedding(st, name, f"{name}-rev", uids, values.astype(np.float32), spec={"planted": name})
    for model, tissue in (
        ("pca", "Tissue A"),
        ("pca_twin", "Tissue A"),
        ("pca", "Tissue B"),
        ("noise", "Tissue B"),
    ):
        evaluate(st, model=model, head="logreg", category="tissue", value=tissue, k=3, seeds=SEEDS)
    return st


@pytest.mark.slow
def test_recommendation_names_the_clear_winner_and_refuses_on_overlap(store: Store) -> None:
    out = _ok(store.path, "recommend", "--category", "tissue")
    lines = {
        line.split("Tissue ")[1][0]: line for line in out.splitlines() if line.lstrip().startswith("tissue")
    }
    assert "pca/logreg" in lines["B"]  # the clear winner, with its evidence on the line
    assert NOT_ENOUGH not in lines["B"]
    assert NOT_ENOUGH in lines["A"]  # pca vs its near-identical twin
    assert "Tissue A · pooled:" in out
    assert "intervals overlap with" in out

    rec = recommend(store, category="tissue").set_index("value")
    b = rec.loc["Tissue B"]
    assert b["recommendation"] == "pca/logreg"
    assert b["next"] == "noise/logreg"
    assert b["n_seeds"] == 3
    assert b["n_runs"] == 3
    assert b["ci_low"] > b["next_ci_high"]  # the intervals are apart
    assert b["mean"] > 0.9
    assert b["over_baseline"] == pytest.approx(b["mean"] - 0.5)
    assert b["over_next"] > 0.3
    assert f"{b['mean']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]" in lines["B"]
    a = rec.loc["Tissue A"]
    assert a["recommendation"] == NOT_ENOUGH
    assert {a["best"], a["next"]} == {"pca/logreg", "pca_twin/logreg"}
    assert abs(a["over_next"]) < 0.01

    # the interval is the one `results --seeds` prints (classify.summary.seed_summary)
    from scdrugmap.classify.summary import seed_summary, summarise

    s = seed_summary(summarise(store, where="model = 'pca' AND value = 'Tissue B'"))
    s = s[s["metric"] == "auroc"].iloc[0]
    assert (s["mean"], s["ci_low"], s["ci_high"]) == pytest.approx((b["mean"], b["ci_low"], b["ci_high"]))


@pytest.mark.slow
def test_thin_evidence_options_and_bad_input(store: Store) -> None:
    strict = recommend(store, category="tissue", min_seeds=4)
    assert (strict["recommendation"] == NOT_ENOUGH).all()
    assert strict["reason"].str.contains("3 seed").all()
    cand = candidates(store, category="tissue", scenario="pooled", metric="auroc")
    assert set(cand.loc[cand["value"] == "Tissue B", "model"]) == {"pca", "noise"}
    assert (cand["rank"].groupby(cand["value"]).min() == 1).all()
    by_f1 = recommend(store, metric="f1", scenario="pooled")
    assert set(by_f1["metric"]) == {"f1"}
    assert recommend(store, scenario="cross").empty
    res = CliRunner().invoke(main, ["--store", str(store.path), "recommend", "--metric", "f2"])
    assert res.exit_code == 1
    assert "unknown metric 'f2'" in res.output


@pytest.mark.slow
def test_demo_recommendation_through_the_cli(tmp_path: Path) -> None:
    """simulate → ingest → embed pca and hvg → evaluate (logreg pooled + cross-data, a short mlp pooled;
    3 seeds) → recommend, all through the CLI."""
    sim, st = tmp_path / "sim", tmp_path / "store"
    _ok(tmp_path / "unused", "simulate", "--out", str(sim), "--n-cells", "600", "--n-genes", "1000")
    _ok(st, "-q", "ingest", "--manifest", str(sim / "manifest.csv"))
    for model in ("pca", "hvg"):
        _ok(st, "-q", "embed", "--model", model)
    common = ("--model", "pca,hvg", "--category", "tissue", "--k", "3", "--seeds", "0,1,2")
    _ok(st, "-q", "evaluate", *common, "--head", "logreg", "--protocol", "pooled,cross")
    _ok(st, "-q", "evaluate", *common, "--head", "mlp", "--protocol", "pooled",
        "--param", "min_steps=60", "--param", "max_epochs=20")  # fmt: skip
    out = _ok(st, "recommend", "--category", "tissue", "--candidates")
    rec = recommend(Store.open(st), category="tissue")
    tissues = set(Store.open(st).datasets()["tissue"])
    assert set(rec["value"]) == tissues
    assert set(rec["scenario"]) == {"pooled", "cross-data"}
    assert (rec.loc[rec["scenario"] == "pooled", "n_candidates"] == 4).all()
    assert (rec.loc[rec["scenario"] == "cross-data", "n_candidates"] == 2).all()
    for _, r in rec.iterrows():
        assert r["value"] in out
        assert r["best"].split("/")[0] in ("pca", "hvg")
        assert r["n_seeds"] == 3
        assert (r["recommendation"] == NOT_ENOUGH) == bool(r["reason"])
        if r["recommendation"] != NOT_ENOUGH:
            assert r["ci_low"] > max(r["baseline"], r["next_ci_high"])
    assert "Candidates:" in out


@pytest.mark.slow
def test_service_recommendation(store: Store) -> None:
    from fastapi.testclient import TestClient

    from scdrugmap.classify.service import create_app

    with TestClient(create_app(store.path)) as client:
        res = client.get("/recommend", params={"category": "tissue", "scenario": "pooled"}).json()
        by_value = {r["value"]: r for r in res["items"]}
        assert by_value["Tissue B"]["recommendation"] == "pca/logreg"
        assert by_value["Tissue A"]["recommendation"] == NOT_ENOUGH
        assert by_value["Tissue A"]["reason"].startswith("intervals overlap")
        bad = client.get("/recommend", params={"metric": "f2"})
        assert bad.status_code == 422
        assert "f2" in bad.json()["detail"]


def _cand(model: str, mean: float, lo: float, hi: float, **kw) -> pd.Series:
    base = {"model": model, "head": "logreg", "strategy": "frozen", "mean": mean, "ci_low": lo, "ci_high": hi,
            "n_seeds": 3, "baseline": 0.5, "degenerate": False}  # fmt: skip
    return pd.Series({**base, **kw})


def test_evidence_rules() -> None:
    from scdrugmap.classify.recommend import _verdict

    best = _cand("a", 0.80, 0.75, 0.85)
    assert _verdict(best, _cand("b", 0.70, 0.65, 0.74), 3) == ""  # apart: recommended
    assert _verdict(best, _cand("b", 0.78, 0.70, 0.80), 3) == "intervals overlap with b/logreg"
    assert _verdict(best, _cand("b", 0.76, np.nan, np.nan, n_seeds=1), 3) == "intervals overlap with b/logreg"
    assert _verdict(best, _cand("b", 0.70, np.nan, np.nan, n_seeds=1), 3) == ""  # its single value is below
    assert _verdict(best, None, 3) == "only one model/head evaluated"
    assert _verdict(_cand("a", 0.8, 0.75, 0.85, n_seeds=2), None, 3).startswith("2 seed(s); need ≥ 3")
    assert _verdict(_cand("a", 0.6, 0.45, 0.75), None, 3) == "interval reaches the baseline 0.500"
    assert "degenerate" in _verdict(_cand("a", 0.9, 0.85, 0.95, degenerate=True), None, 3)
    with pytest.raises(InputError, match="min_seeds=1"):
        recommend(None, min_seeds=1)  # type: ignore[arg-type]


def test_report_has_the_recommendation_section(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The demo store (one seed per run): every group is reported, none is recommended on one seed."""
    from test_service import demo_store

    _ok(demo_store(tmp_path_factory), "report", "--out", str(tmp_path), "--no-umap")
    index = (tmp_path / "index.html").read_text()
    assert "Which model to pick" in index
    table = pd.read_csv(tmp_path / "recommendation.csv")
    assert set(table["scenario"]) == {"pooled", "cross-data"}
    assert (table["recommendation"] == NOT_ENOUGH).all()
    assert table["why not"].str.startswith("1 seed(s)").all()
    assert "AUROC [95% CI]" in table.columns
