"""The Biology view of the service: /analysis/* endpoints over a demo store analysed with
``classify.analyze`` (DE, enrichment, biomarkers, separation, pseudotime, gene views, Harmony
corrections, label confidence, figures), each compared with the catalog tables / Parquet files;
refusals (unknown ids, path traversal), a never-analysed store, the token, and the page in Chromium."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("fastapi_offline")

from fastapi.testclient import TestClient

from scdrugmap.classify.service import create_app
from scdrugmap.store import Store

N_CELLS = 800
GENE = "ABCB1"  # a gene of the simulator's planted resistance programme


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo store (800 cells) with DE (truth and run labels), enrichment, biomarkers, separation,
    one dataset's confidence set from evidence and one run's metrics per confidence stratum,
    pseudotime of two datasets (one correlated with a pooled run's predictions), gene views of a
    planted gene, and a Harmony correction of ``pca`` by study compared cross-data (logreg)."""
    from test_analyze_demo import planted_programme

    from scdrugmap.classify.analyze.biomarkers import BiomarkerSpec, run_biomarkers
    from scdrugmap.classify.analyze.confidence import confidence_metrics, set_confidence
    from scdrugmap.classify.analyze.correction import correction_table
    from scdrugmap.classify.analyze.de_run import run_de
    from scdrugmap.classify.analyze.enrich import GeneSet, enrich_de, write_gmt
    from scdrugmap.classify.analyze.geneview import gene_view
    from scdrugmap.classify.analyze.harmony import HarmonySpec, correct_embedding
    from scdrugmap.classify.analyze.pseudotime import run_pseudotime
    from scdrugmap.classify.analyze.separation import run_separation
    from scdrugmap.classify.demo import run_demo
    from scdrugmap.classify.evaluate import evaluate

    path = tmp_path_factory.mktemp("service-analysis") / "store"
    run_demo(path, n_cells=N_CELLS, heads=["logreg"], echo=lambda _m: None)
    st = Store.open(path)
    ids = sorted(st.datasets()["dataset_id"])
    pooled = run_de(st, ids, methods=["wilcoxon"])[0]
    run_de(st, ids[:2])
    run_id = str(
        st.query("SELECT run_id FROM eval_runs WHERE protocol = 'pooled' ORDER BY value")["run_id"][0]
    )
    predicted = st.query("SELECT DISTINCT c.dataset_id FROM predictions p JOIN cells c USING (cell_uid) "
                         "WHERE p.run_id = ? ORDER BY 1", [run_id])["dataset_id"].tolist()  # fmt: skip
    run_de(st, predicted, labels=f"run:{run_id}", methods=["wilcoxon"])
    up, down = planted_programme()
    rng = np.random.default_rng(0)
    genes = pooled.table["gene"].to_numpy()
    sets = [GeneSet("PLANTED_UP", "planted up", frozenset(up)), GeneSet("PLANTED_DOWN", "planted down",
            frozenset(down))] + [GeneSet(f"RANDOM_{i}", "random", frozenset(rng.choice(genes, 20, replace=False)))
                                 for i in range(10)]  # fmt: skip
    gmt = path.parent / "sets.gmt"
    write_gmt(sets, gmt)
    enrich_de(st, pooled.table, gmt, de_source=pooled.de_id, figures_dir=path / "analysis" / "figures")
    run_biomarkers(st, ids[:4], spec=BiomarkerSpec(n_estimators=30, max_genes=300))
    run_separation(st, "pca", umap=False)
    set_confidence(st, ids[0], exposure_days=45)
    confidence_metrics(st, run_id)
    run_pseudotime(st, predicted[0], run_id=run_id)
    run_pseudotime(st, next(i for i in ids if i not in predicted))
    gene_view(st, GENE.lower(), umap=False)
    corr = correct_embedding(st, "pca", batch_key="study", spec=HarmonySpec(sigma=0.2))
    runs = {
        tag: [
            o.run_id
            for o in evaluate(st, model=m, revision=r, head="logreg", protocol="cross", category="tissue")
        ]
        for tag, (m, r) in (
            ("u", (corr.source_model, corr.source_revision)),
            ("c", (corr.model, corr.revision)),
        )
    }
    correction_table(st, corr, runs["u"], runs["c"])
    return path


@pytest.fixture(scope="module")
def store(store_path: Path) -> Store:
    return Store.open(store_path)


@pytest.fixture(scope="module")
def client(store_path: Path):
    with TestClient(create_app(store_path)) as c:
        yield c


def _close(a: float, b: float) -> bool:
    """Equal up to the 10 decimals the service's JSON keeps (``DataFrame.to_json``'s precision)."""
    return math.isclose(a, b, rel_tol=1e-8, abs_tol=1e-9)


def _ok(client: TestClient, url: str, **params) -> dict:
    res = client.get(url, params=params)
    assert res.status_code == 200, res.text
    return res.json()


# ---- DE ---------------------------------------------------------------------------------------
def test_de_list_matches_catalog(client: TestClient, store: Store) -> None:
    cat = store.query("SELECT de_id, method, labels, n_significant, dataset_ids FROM de_runs")
    res = _ok(client, "/analysis/de")
    assert res["n"] == len(cat) >= 4
    assert {i["de_id"] for i in res["items"]} == set(cat["de_id"])
    for item in res["items"]:
        n_sig = store.query("SELECT COUNT(*) FILTER (significant) AS n FROM de_results WHERE de_id = ?",
                            [item["de_id"]])["n"].iloc[0]  # fmt: skip
        assert item["n_significant"] == n_sig
        assert isinstance(item["dataset_ids"], list)
        assert item["dataset_ids"]
        assert item["test"]
    pred = [i for i in res["items"] if i["labels"].startswith("run:")]
    assert len(pred) == 1
    assert pred[0]["truth_de_id"] in {i["de_id"] for i in res["items"]}
    assert 0 <= pred[0]["jaccard"] <= 1
    assert isinstance(pred[0]["missed_genes"], list)
    only = _ok(client, "/analysis/de", dataset="SIM08", method="wilcoxon")["items"]
    assert only
    assert all("SIM08" in i["dataset_ids"] and i["method"] == "wilcoxon" for i in only)
    assert _ok(client, "/analysis/de", dataset="NOPE")["items"] == []
    assert client.get("/analysis/de", params={"method": "ttest"}).status_code == 422


def test_de_table_rows_and_volcano(client: TestClient, store: Store) -> None:
    de_id = store.query("SELECT de_id FROM de_runs WHERE json_array_length(dataset_ids) = 8")["de_id"].iloc[0]
    cat = store.query("SELECT * FROM de_results WHERE de_id = ? ORDER BY padj NULLS LAST, p, gene", [de_id])
    res = _ok(client, f"/analysis/de/{de_id}", limit=25)
    assert res["run"]["de_id"] == de_id
    assert res["n_rows"] == len(cat)
    assert res["limit"] == 25
    rows = res["rows"]
    assert [r["gene"] for r in rows] == cat["gene"].head(25).tolist()
    assert np.allclose([r["padj"] for r in rows], cat["padj"].head(25))
    assert np.allclose([r["log2fc"] for r in rows], cat["log2fc"].head(25))
    assert [r["significant"] for r in rows] == cat["significant"].head(25).tolist()

    sig = _ok(client, f"/analysis/de/{de_id}", significant_only=True, limit=100_000)
    assert sig["n_rows"] == int(cat["significant"].sum()) == res["run"]["n_significant"] > 0
    assert all(r["significant"] for r in sig["rows"])

    v = res["volcano"]
    finite = cat[np.isfinite(cat["log2fc"]) & np.isfinite(cat["padj"])]
    assert v["n_points"] == v["n_eligible"] == len(finite) == len(v["gene"]) == len(v["log2fc"])
    by_gene = finite.set_index("gene")
    assert np.allclose(v["neg_log10_padj"], -np.log10(np.clip(by_gene.loc[v["gene"], "padj"], 1e-300, 1)))
    assert np.allclose(v["log2fc"], by_gene.loc[v["gene"], "log2fc"])
    expected = ["ns" if not s else ("up" if x > 0 else "down")
                for s, x in zip(by_gene.loc[v["gene"], "significant"], v["log2fc"], strict=True)]  # fmt: skip
    assert v["direction"] == expected
    assert v["direction"].count("up") + v["direction"].count("down") == sig["n_rows"]
    few = _ok(client, f"/analysis/de/{de_id}", max_points=10)["volcano"]
    assert few["n_points"] == 10
    assert few["n_eligible"] == len(finite)
    assert few["gene"] == finite.sort_values(["padj", "gene"])["gene"].head(10).tolist()


def test_unknown_ids_and_bad_parameters(client: TestClient) -> None:
    for url in ("/analysis/de/de-0000", "/analysis/enrich/enr-0000", "/analysis/biomarkers/bm-0000"):
        res = client.get(url)
        assert res.status_code == 404, url
        assert res.headers["content-type"].startswith("application/json")
        assert "0000" in res.json()["detail"]
        assert "GET /analysis/" in res.json()["detail"]
    for url, params in (("/analysis/de/x", {"limit": 0}), ("/analysis/separation", {"metric": "nope"}),
                        ("/analysis/enrich/x", {"direction": "sideways"})):  # fmt: skip
        res = client.get(url, params=params)
        assert res.status_code == 422
        assert "detail" in res.json()


# ---- enrichment, biomarkers, separation, confidence -------------------------------------------
def test_enrichment_ranks_planted_set_first(client: TestClient, store: Store) -> None:
    runs = _ok(client, "/analysis/enrich")["items"]
    assert len(runs) == 1
    run = runs[0]
    assert run["genesets"] == "sets.gmt"  # the file's name, not the server path
    assert _ok(client, "/analysis/enrich", de_id=run["de_source"])["n"] == 1
    assert _ok(client, "/analysis/enrich", de_id="de-0000")["n"] == 0
    res = _ok(client, f"/analysis/enrich/{run['enrich_id']}", limit=3)
    n_cat = store.query("SELECT direction, COUNT(*) AS n FROM enrich_results WHERE enrich_id = ? GROUP BY 1",
                        [run["enrich_id"]]).set_index("direction")["n"]  # fmt: skip
    for d in ("up", "down"):
        part = [r for r in res["rows"] if r["direction"] == d]
        assert [r["rank"] for r in part] == list(range(1, min(3, n_cat.get(d, 0)) + 1))
    assert next(r["direction"] for r in res["rows"]) == "up"
    up = [r for r in res["rows"] if r["direction"] == "up"]
    assert up[0]["term"] == "PLANTED_UP"
    down = _ok(client, f"/analysis/enrich/{run['enrich_id']}", direction="down")["rows"]
    assert down
    assert {r["direction"] for r in down} == {"down"}
    assert down[0]["term"] == "PLANTED_DOWN"


def test_biomarkers_match_catalog(client: TestClient, store: Store) -> None:
    res = _ok(client, "/analysis/biomarkers", limit=5)
    assert res["n"] == 1
    run = res["items"][0]
    assert run["dataset_ids"] == ["SIM01", "SIM02", "SIM03", "SIM04"]
    cat = store.query("SELECT gene FROM biomarkers WHERE bm_id = ? ORDER BY rank", [run["bm_id"]])["gene"]
    assert [g["gene"] for g in run["genes"]] == cat.head(5).tolist()
    one = _ok(client, f"/analysis/biomarkers/{run['bm_id']}")
    assert [g["gene"] for g in one["genes"]] == cat.tolist()
    assert [g["rank"] for g in one["genes"]][:3] == [1, 2, 3]


def test_separation_per_model_with_head_metrics(client: TestClient, store: Store) -> None:
    res = _ok(client, "/analysis/separation")
    cat = store.query("SELECT * FROM separation ORDER BY scope, value")
    assert len(res["items"]) == len(cat) > 8
    assert {i["scope"] for i in res["items"]} == {"dataset", "tissue"}
    (model,) = res["models"]
    per_dataset = cat[cat["scope"] == "dataset"]
    assert model["model"] == "pca"
    assert model["n_datasets"] == len(per_dataset)
    assert math.isclose(model["knn_purity"], per_dataset["knn_purity"].mean())
    assert math.isclose(model["silhouette"], per_dataset["silhouette"].mean())
    tissue = next(i for i in res["items"] if i["scope"] == "tissue" and i["value"] == "Cell line")
    expected = store.query(
        "SELECT AVG(m.value) AS v FROM eval_runs r JOIN metrics m USING (run_id) WHERE r.protocol = 'pooled' "
        "AND r.category = 'tissue' AND r.value = 'Cell line' AND r.head = 'logreg' AND m.metric = 'auroc'"
    )["v"].iloc[0]
    assert math.isclose(tissue["head_metrics"]["logreg"], expected)
    f1 = _ok(client, "/analysis/separation", metric="f1", model="pca")
    assert f1["metric"] == "f1"
    assert len(f1["items"]) == len(cat)
    assert _ok(client, "/analysis/separation", model="nope")["items"] == []


def test_confidence_stars(client: TestClient, store: Store) -> None:
    res = _ok(client, "/analysis/confidence")
    assert res["n"] == 8
    assert sum(res["counts"].values()) == 8
    first = res["items"][0]
    assert first["dataset_id"] == "SIM01"
    assert first["stars"] == 2
    assert first["source"] == "derived"
    assert first["set_at"] == "analyze"
    assert "45 days" in first["reason"]
    ingest = store.query("SELECT dataset_id, label_confidence FROM datasets").set_index("dataset_id")
    for item in res["items"][1:]:
        assert item["stars"] == ingest.loc[item["dataset_id"], "label_confidence"]
    run_id = store.query("SELECT DISTINCT run_id FROM confidence_metrics")["run_id"].iloc[0]
    with_run = _ok(client, "/analysis/confidence", run_id=run_id)
    n = store.query("SELECT COUNT(*) AS n FROM confidence_metrics WHERE run_id = ?", [run_id])["n"].iloc[0]
    assert len(with_run["metrics"]) == n > 0


def test_separation_endpoint_and_cli_share_one_query(client: TestClient, store: Store) -> None:
    """``separation_with_metrics`` (the CLI's table) and the endpoint agree; runs that are not
    complete do not count for either."""
    from scdrugmap.classify.analyze.separation import separation_with_metrics

    def both() -> tuple[dict, dict]:
        res = _ok(client, "/analysis/separation")
        api = {(i["revision"], i["scope"], i["value"]): i["head_metrics"].get("logreg") for i in res["items"]}
        df = separation_with_metrics(store)
        cli = {(r.revision, r.scope, r.value): None if math.isnan(r.auroc_logreg) else r.auroc_logreg
               for r in df.itertuples()}  # fmt: skip
        return api, cli

    api, cli = both()
    assert api.keys() == cli.keys()
    assert sum(v is not None for v in api.values()) >= 3
    for key, v in api.items():
        assert (v is None and cli[key] is None) or _close(v, cli[key]), key
    run = store.query("SELECT run_id FROM eval_runs WHERE protocol = 'pooled' AND value = 'Cell line'")[
        "run_id"
    ][0]
    with store.transaction() as con:  # a failed copy of the run with metrics of 0: must be ignored
        con.execute("INSERT INTO eval_runs SELECT * REPLACE ('run-failed' AS run_id, 'failed' AS status) "
                    "FROM eval_runs WHERE run_id = ?", [run])  # fmt: skip
        con.execute("INSERT INTO metrics SELECT * REPLACE ('run-failed' AS run_id, 0.0 AS value) FROM metrics "
                    "WHERE run_id = ?", [run])  # fmt: skip
    try:
        assert both() == (api, cli)
    finally:
        with store.transaction() as con:
            con.execute("DELETE FROM metrics WHERE run_id = 'run-failed'")
            con.execute("DELETE FROM eval_runs WHERE run_id = 'run-failed'")


# ---- pseudotime, gene views, Harmony corrections ----------------------------------------------
def test_pseudotime_runs_match_catalog(client: TestClient, store: Store) -> None:
    cat = store.query("SELECT * FROM pseudotime_runs ORDER BY created_at DESC, pt_id")
    res = _ok(client, "/analysis/pseudotime")
    assert res["n"] == len(cat) == 2
    assert [i["pt_id"] for i in res["items"]] == cat["pt_id"].tolist()
    for item, row in zip(res["items"], cat.itertuples(), strict=True):
        assert item["dataset_id"] == row.dataset_id
        assert item["root_obs_name"] == row.root_obs_name
        assert item["n_cells"] == row.n_cells
        assert _close(item["spearman_label"], row.spearman_label)
        assert _close(item["auroc_label"], row.auroc_label)
        assert "cells_path" not in item  # server paths stay on the server
    with_run = [i for i in res["items"] if i["run_id"]]
    assert len(with_run) == 1
    assert -1 <= with_run[0]["spearman_probability"] <= 1
    one = _ok(client, "/analysis/pseudotime", dataset=with_run[0]["dataset_id"])
    assert [i["pt_id"] for i in one["items"]] == [with_run[0]["pt_id"]]
    assert _ok(client, "/analysis/pseudotime", dataset="NOPE")["items"] == []


def test_pseudotime_points_match_parquet(client: TestClient, store: Store, store_path: Path) -> None:
    import pandas as pd

    runs = store.query("SELECT pt_id, run_id, cells_path FROM pseudotime_runs")
    for row in runs.itertuples():
        cells = pd.read_parquet(store_path / row.cells_path)
        cells["label"] = cells["label"].fillna("unlabelled")
        finite = cells[np.isfinite(cells["pseudotime"])]
        res = _ok(client, f"/analysis/pseudotime/{row.pt_id}", max_points=100_000)
        assert res["run"]["pt_id"] == row.pt_id
        assert res["n_cells"] == len(cells) == res["run"]["n_cells"]
        assert res["n_unreachable"] == len(cells) - len(finite)
        pts = res["points"]
        assert res["n_points"] == len(finite) == len(pts["pseudotime"]) == len(pts["label"])
        assert pts["pseudotime"] == sorted(pts["pseudotime"])
        got = sorted(zip(pts["pseudotime"], pts["label"], strict=True))
        assert got == sorted(zip(finite["pseudotime"].tolist(), finite["label"].tolist(), strict=True))
        if row.run_id:  # P(resistant) of the correlated run, per cell
            want = sorted(zip(finite["pseudotime"], finite["p_resistant"].where(finite["p_resistant"].notna()),
                              strict=True))  # fmt: skip
            got_p = sorted(zip(pts["pseudotime"], pts["probability"], strict=True))
            assert len(got_p) == len(want)
            for (a, pa), (b, pb) in zip(got_p, want, strict=True):
                assert a == b
                assert (pa is None and math.isnan(pb)) or _close(pa, pb)
        else:
            assert "probability" not in pts
        by_label = finite.groupby("label")["pseudotime"]
        assert {x["label"] for x in res["labels"]} == set(cells["label"])
        for x in res["labels"]:
            assert x["n_cells"] == int((cells["label"] == x["label"]).sum())
            assert _close(x["median"], by_label.median()[x["label"]])
            assert _close(x["mean"], by_label.mean()[x["label"]])
        few = _ok(client, f"/analysis/pseudotime/{row.pt_id}", max_points=10)
        assert few["n_points"] == 10
        assert few["points"]["pseudotime"][0] == finite["pseudotime"].min()  # the extremes are kept
        assert few["points"]["pseudotime"][-1] == finite["pseudotime"].max()
        assert set(few["points"]["pseudotime"]) <= set(finite["pseudotime"])
        assert few["labels"] == res["labels"]  # summaries are over every cell


def test_pseudotime_refusals(client: TestClient, store: Store, store_path: Path) -> None:
    res = client.get("/analysis/pseudotime/pt-0000")
    assert res.status_code == 404
    assert "GET /analysis/pseudotime" in res.json()["detail"]
    assert client.get("/analysis/pseudotime/x", params={"max_points": 0}).status_code == 422
    row = store.query("SELECT pt_id, dataset_id, cells_path FROM pseudotime_runs ORDER BY pt_id").iloc[0]
    parquet = store_path / row["cells_path"]
    moved = parquet.with_suffix(".moved")
    parquet.rename(moved)
    try:
        res = client.get(f"/analysis/pseudotime/{row['pt_id']}")
    finally:
        moved.rename(parquet)
    assert res.status_code == 404
    assert f"scdrugmap analyze pseudotime --dataset {row['dataset_id']}" in res.json()["detail"]
    # a catalog row whose file lies outside <store>/analysis/pseudotime is never read
    for bad in (
        "catalog.duckdb",
        "analysis/pseudotime/../../catalog.duckdb",
        str(store_path / "catalog.duckdb"),
    ):
        with store.transaction() as con:
            con.execute("INSERT INTO pseudotime_runs (pt_id, dataset_id, cells_path) VALUES ('pt-evil', 'SIM01', ?)",
                        [bad])  # fmt: skip
        try:
            res = client.get("/analysis/pseudotime/pt-evil")
        finally:
            with store.transaction() as con:
                con.execute("DELETE FROM pseudotime_runs WHERE pt_id = 'pt-evil'")
        assert res.status_code == 404, bad
        assert b"DUCK" not in res.content


def test_gene_views_match_catalog(client: TestClient, store: Store) -> None:
    cat = store.query("SELECT * FROM gene_views WHERE gene = ? ORDER BY dataset_id", [GENE])
    assert len(cat) == 8
    res = _ok(client, "/analysis/genes", gene=f" {GENE.lower()} ")  # symbols are case-insensitive
    assert res["gene"] == GENE
    assert res["genes"] == [{"gene": GENE, "n_datasets": 8, "created_at": res["genes"][0]["created_at"]}]
    assert res["n"] == len(res["items"]) == 8
    assert [i["dataset_id"] for i in res["items"]] == cat["dataset_id"].tolist()
    for item, row in zip(res["items"], cat.to_dict("records"), strict=True):
        for col in ("n_resistant", "n_sensitive", "n_unlabelled", "value_kind"):
            assert item[col] == row[col], col
        for col in (
            "mean_resistant",
            "mean_sensitive",
            "mean_all",
            "frac_resistant",
            "frac_sensitive",
            "log2fc",
            "p",
        ):
            assert _close(item[col], row[col]), col
    # the planted resistance gene is higher in resistant cells in most datasets
    assert sum(i["log2fc"] > 0 for i in res["items"]) >= 6
    none = _ok(client, "/analysis/genes", gene="TP53")
    assert none["items"] == []
    assert "scdrugmap analyze gene TP53" in none["hint"]
    listing = _ok(client, "/analysis/genes")
    assert listing["gene"] is None
    assert listing["items"] == []
    assert [g["gene"] for g in listing["genes"]] == [GENE]


def test_corrections_side_by_side(client: TestClient, store: Store) -> None:
    cat = store.query("SELECT * FROM corrections")
    res = _ok(client, "/analysis/corrections")
    assert res["n"] == len(cat) == 1
    corr = res["items"][0]
    row = cat.iloc[0]
    assert (corr["revision"], corr["model"], corr["source_model"]) == (row["revision"], "pca_harmony", "pca")
    assert corr["source_revision"] == row["source_revision"]
    assert (corr["batch_key"], corr["n_batches"], corr["n_cells"]) == ("study", 8, row["n_cells"])
    assert corr["params"]["sigma"] == 0.2
    assert corr["n_comparisons"] == 3  # one pair of cross-data runs per tissue
    for metric in ("auroc", "f1"):
        out = _ok(client, f"/analysis/corrections/{corr['revision']}/metrics", metric=metric)
        assert out["metric"] == metric
        assert out["correction"] == corr
        want = store.query("SELECT * FROM correction_metrics WHERE revision = ? AND metric = ?",
                           [corr["revision"], metric])  # fmt: skip
        assert out["n"] == len(out["items"]) == len(want) == 8 + 3  # 8 held-out studies + a mean per tissue
        for item in out["items"]:
            w = want[(want["run_corrected"] == item["run_corrected"]) & (want["fold"] == item["fold"])].iloc[
                0
            ]
            assert _close(item["uncorrected"], w["uncorrected"])
            assert _close(item["corrected"], w["corrected"])
            assert _close(item["difference"], item["corrected"] - item["uncorrected"])
        for pair in {(i["run_uncorrected"], i["run_corrected"]) for i in out["items"]}:
            part = [i for i in out["items"] if (i["run_uncorrected"], i["run_corrected"]) == pair]
            assert part[-1]["fold"] == "mean"
            folds = part[:-1]
            assert all(f["fold"].startswith("SIM-S") for f in folds)  # named by the held-out study
            for side, run in (("uncorrected", pair[0]), ("corrected", pair[1])):
                # each fold's value is the run's metric on that fold (metrics table, fold index → name)
                m = store.query(
                    "SELECT m.fold, m.value, f.fold_names FROM metrics m JOIN eval_runs r USING (run_id) "
                    "JOIN fold_sets f USING (fold_set_id) WHERE m.run_id = ? AND m.metric = ? ORDER BY m.fold",
                    [run, metric],
                )
                names = json.loads(m["fold_names"].iloc[0])
                by_name = {names[int(k)]: v for k, v in zip(m["fold"], m["value"], strict=True)}
                for f in folds:
                    assert _close(f[side], by_name[f["fold"]])
                assert _close(part[-1][side], np.mean([f[side] for f in folds]))
    res = client.get("/analysis/corrections/nope/metrics")
    assert res.status_code == 404
    assert "GET /analysis/corrections" in res.json()["detail"]
    assert (
        client.get(f"/analysis/corrections/{corr['revision']}/metrics", params={"metric": "x"}).status_code
        == 422
    )


# ---- figures ----------------------------------------------------------------------------------
def test_figure_listing_matches_index(client: TestClient, store_path: Path) -> None:
    folder = store_path / "analysis" / "figures"
    lines = [ln for ln in (folder / "index.md").read_text().splitlines() if ln.startswith("- [")]
    stems = [re.match(r"- \[([^\]]+)\]", ln)[1] for ln in lines]
    res = _ok(client, "/analysis/figures")
    assert [f["stem"] for f in res["items"]] == stems
    assert res["n"] >= 5
    assert any(s.startswith("volcano") for s in stems)
    assert any(s.startswith("enrich") for s in stems)
    for f, line in zip(res["items"], lines, strict=True):
        assert line.endswith(f["caption"])
        assert f["caption"]
        png = client.get(f["png"])
        assert png.status_code == 200
        assert png.headers["content-type"] == "image/png"
        assert png.content == (folder / f"{f['stem']}.png").read_bytes()
        svg = client.get(f["svg"])
        assert svg.status_code == 200
        assert svg.headers["content-type"].startswith("image/svg+xml")
        assert b"<svg" in svg.content[:2000]
        assert "default-src 'none'" in svg.headers["content-security-policy"]


@pytest.mark.parametrize(
    "name",
    ["../catalog.duckdb", "..%2Fcatalog.duckdb", "%2e%2e%2fcatalog.duckdb", "%2e%2e", "..", "%2Fetc%2Fpasswd",
     "/etc/passwd", "index.md", ".hidden.png", "nope.png", "x.png%00.svg", "a%5C..%5Ccatalog.png", "outside.png"],
)  # fmt: skip
def test_figure_names_cannot_leave_the_folder(client: TestClient, store_path: Path, name: str) -> None:
    folder = store_path / "analysis" / "figures"
    link = folder / "outside.png"  # a link inside the folder to a file outside it
    link.symlink_to(store_path / "catalog.duckdb")
    try:
        res = client.get(f"/analysis/figures/{name}")
    finally:
        link.unlink()
    assert res.status_code in (404, 422), (name, res.status_code)
    assert res.headers["content-type"].startswith("application/json")
    assert b"DUCK" not in res.content


# ---- a store never analysed, token, page ------------------------------------------------------
def test_never_analysed_store_gives_empty_lists(tmp_path: Path) -> None:
    st = Store.open(tmp_path / "empty", create=True)
    before = set(st.query("SELECT table_name FROM information_schema.tables")["table_name"])
    with TestClient(create_app(st.path)) as c:
        for url in ("/analysis/de", "/analysis/enrich", "/analysis/biomarkers", "/analysis/figures"):
            assert _ok(c, url)["items"] == [], url
        sep = _ok(c, "/analysis/separation")
        assert sep["items"] == []
        assert sep["models"] == []
        conf = _ok(c, "/analysis/confidence", run_id="r")
        assert conf["items"] == []
        assert conf["metrics"] == []
        assert conf["counts"]["none"] == 0
        for url in ("/analysis/pseudotime", "/analysis/corrections"):
            assert _ok(c, url)["items"] == [], url
        genes = _ok(c, "/analysis/genes", gene="abcb1")
        assert (genes["gene"], genes["genes"], genes["items"]) == ("ABCB1", [], [])
        for url in (
            "/analysis/de/x",
            "/analysis/enrich/x",
            "/analysis/biomarkers/x",
            "/analysis/figures/a.png",
            "/analysis/pseudotime/x",
            "/analysis/corrections/x/metrics",
        ):
            assert c.get(url).status_code == 404, url
    from scdrugmap.classify.analyze.separation import separation_with_metrics

    assert separation_with_metrics(st).empty  # the CLI's query reads only, too
    after = set(st.query("SELECT table_name FROM information_schema.tables")["table_name"])
    assert after == before  # the service created no analysis table
    assert not (st.path / "analysis").exists()


def test_token_protects_analysis(store_path: Path) -> None:
    with TestClient(create_app(store_path, token="tok")) as c:
        assert c.get("/analysis/de").status_code == 401
        assert c.get("/analysis/figures").status_code == 401
        items = c.get("/analysis/figures", headers={"X-Token": "tok"}).json()["items"]
        assert c.get(items[0]["png"]).status_code == 401
        assert c.get(items[0]["png"], headers={"Authorization": "Bearer tok"}).status_code == 200


def test_page_has_biology_tab(client: TestClient) -> None:
    page = client.get("/").text
    assert 'data-tab="biology"' in page
    assert 'id="volcano-chart"' in page
    assert 'id="bio-gallery"' in page
    for ident in ("pt-chart", "gene-form", "corr-table"):
        assert f'id="{ident}"' in page
    js = client.get("/static/biology.js")
    assert js.status_code == 200
    assert "export function initBiology" in js.text
    assert 'from "./biology.js"' in client.get("/static/app.js").text
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/analysis/de", "/analysis/de/{de_id}", "/analysis/enrich", "/analysis/enrich/{enrich_id}",
              "/analysis/biomarkers", "/analysis/separation", "/analysis/confidence", "/analysis/figures",
              "/analysis/figures/{name}", "/analysis/pseudotime", "/analysis/pseudotime/{pt_id}", "/analysis/genes",
              "/analysis/corrections", "/analysis/corrections/{revision}/metrics"):  # fmt: skip
        assert p in paths, p


def test_biology_tab_in_chromium(store_path: Path, client: TestClient) -> None:
    """The Biology tab in headless Chromium: volcano and pseudotime circles = API points, gene lookup,
    corrections and other tables, gallery images load."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    import uvicorn
    from test_browser import ARGS, CHROMIUM, _free_port, _start

    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set SCDRUGMAP_CHROMIUM)")
    runs = _ok(client, "/analysis/de")["items"]
    first = _ok(client, f"/analysis/de/{runs[0]['de_id']}")
    n_figures = _ok(client, "/analysis/figures")["n"]
    pt_runs = _ok(client, "/analysis/pseudotime")["items"]
    corr = _ok(client, "/analysis/corrections")["items"][0]
    n_corr = _ok(client, f"/analysis/corrections/{corr['revision']}/metrics")["n"]
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(store_path), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = _start(srv)
    url = f"http://127.0.0.1:{port}"
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
            page.on(
                "request", lambda r: None if r.url.startswith(url) else problems.append(f"outside: {r.url}")
            )
            page.goto(url)
            page.locator("#ds-table tbody tr").first.wait_for()
            page.click("button[data-tab=biology]")
            page.wait_for_selector("#volcano-chart svg circle.volcano-point")
            assert (
                page.locator("#volcano-chart svg circle.volcano-point").count()
                == first["volcano"]["n_points"]
            )
            n_up = first["volcano"]["direction"].count("up")
            assert page.locator("#volcano-chart svg circle.up").count() == n_up
            assert page.locator("#bio-de option").count() == len(runs)
            assert page.locator("#bio-genes tbody tr").count() == min(50, first["n_rows"])
            page.wait_for_selector("#sep-chart svg .fold-point")
            assert page.locator("#conf-table tbody tr").count() == 8
            page.wait_for_function(
                f"[...document.querySelectorAll('#bio-gallery img')].filter(i => i.complete && i.naturalWidth > 0)"
                f".length === {n_figures}"
            )
            pt_first = _ok(client, f"/analysis/pseudotime/{pt_runs[0]['pt_id']}", max_points=5000)
            page.wait_for_selector("#pt-chart svg circle.pt-point")
            assert page.locator("#pt-chart svg circle.pt-point").count() == pt_first["n_points"] > 0
            for lab in ("resistant", "sensitive"):
                want = pt_first["points"]["label"].count(lab)
                assert page.locator(f"#pt-chart svg circle.pt-point.{lab}").count() == want > 0
            assert page.locator("#pt-chart svg line.pt-median").count() == len(pt_first["labels"])
            page.wait_for_function("document.querySelectorAll('#gene-table tbody tr').length === 8")
            assert page.locator("#gene-table tbody tr td").first.text_content() == "SIM01"
            page.fill("#gene-input", "tp53")
            page.click("#gene-form button[type=submit]")
            page.wait_for_function("document.getElementById('gene-caption').textContent.includes('TP53')")
            page.wait_for_selector("#corr-table tbody tr.mean-row")
            assert page.locator("#corr-table tbody tr").count() == n_corr
            assert page.locator("#corr-table tbody tr.mean-row").count() == 3
            pred = next(r for r in runs if r["labels"].startswith("run:"))
            page.select_option("#bio-de", pred["de_id"])
            page.wait_for_function("document.getElementById('bio-de-info').textContent.includes('Jaccard')")
            if os.environ.get("SCDRUGMAP_BIOLOGY_SCREENSHOT"):
                page.screenshot(path=os.environ["SCDRUGMAP_BIOLOGY_SCREENSHOT"], full_page=True)
            assert not page.is_visible("#error")
            assert not problems, problems
            browser.close()
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
