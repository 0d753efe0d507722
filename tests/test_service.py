"""The classifier service (FastAPI): every endpoint, limits, refusals, token, errors as JSON."""

from __future__ import annotations

import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("fastapi_offline")

from fastapi.testclient import TestClient

from scdrugmap.classify.service import create_app
from scdrugmap.classify.service.app import STATIC_DIR
from scdrugmap.classify.service.commands import check_bind
from scdrugmap.store import InputError, Store


# ---- shared with test_report.py and test_browser.py -----------------------------------------
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo store (1,200 simulated cells, pca, logreg pooled + cross), built once per session."""
    from scdrugmap.classify.demo import run_demo

    path = tmp_path_factory.getbasetemp() / "service-demo-store"
    if not (path / "catalog.duckdb").exists():
        run_demo(path, n_cells=1200, heads=["logreg"], echo=lambda _: None)
    return path


def upload_file(store_path: Path, out: Path, *, n_cells: int = 150, seed: int = 1) -> Path:
    """An h5ad of ``n_cells`` cells drawn from the demo's simulated inputs (not an ingested file)."""
    import anndata as ad

    parts = [ad.read_h5ad(p) for p in sorted((store_path / "demo_input").glob("SIM*.h5ad"))]
    whole = ad.concat(parts, join="inner")
    whole.obs_names_make_unique()
    keep = np.sort(np.random.default_rng(seed).choice(whole.n_obs, n_cells, replace=False))
    whole[keep].copy().write_h5ad(out)
    return out


def pooled_run(store_path: Path, value: str = "Cell line") -> str:
    """run_id of the demo's pooled logreg run on a tissue value."""
    df = Store.open(store_path).query(
        "SELECT run_id FROM eval_runs WHERE protocol = 'pooled' AND value = ? AND strategy = 'frozen'",
        [value],
    )
    return str(df["run_id"].iloc[0])


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_store(tmp_path_factory)


@pytest.fixture(scope="module")
def client(store_path: Path):
    app = create_app(store_path, max_upload_mb=4)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def upload(store_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return upload_file(store_path, tmp_path_factory.mktemp("up") / "cells.h5ad")


@pytest.fixture(scope="module")
def head(store_path: Path) -> str:
    return pooled_run(store_path)


def _post(client: TestClient, path: Path, head: str, **data: str):
    with open(path, "rb") as fh:
        return client.post("/predict", files={"file": (path.name, fh)}, data={"head": head, **data})


# ---- page, docs, catalog ----------------------------------------------------------------------
def test_health_page_and_offline_docs(client: TestClient) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok"
    assert h["auth_required"] is False
    assert h["store"]["datasets"] == 8
    page = client.get("/")
    assert page.status_code == 200
    assert "<title>scdrugmap</title>" in page.text
    for asset in ("app.js", "api.js", "charts.js", "datasets.js", "results.js", "predict.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    docs = client.get("/docs").text
    assert "/docs-static/swagger-ui-bundle.js" in docs
    assert client.get("/docs-static/swagger-ui-bundle.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/health", "/datasets", "/datasets/{dataset_id}", "/models", "/runs", "/metrics", "/predict",
              "/jobs/{job_id}", "/sql", "/runs/{run_id}/curves"):  # fmt: skip
        assert p in paths
    assert "multipart/form-data" in paths["/predict"]["post"]["requestBody"]["content"]


def test_nothing_is_loaded_from_outside() -> None:
    """No CDN: the page and its scripts reference only same-origin URLs."""
    external = re.compile(
        r"""(src|href)\s*=\s*["']?(https?:)?//|import[^;]*from\s*["']https?:|url\(\s*["']?https?:"""
    )
    for f in STATIC_DIR.iterdir():
        assert not external.search(f.read_text()), f.name


def test_datasets_filters_paging_and_detail(client: TestClient) -> None:
    all_ = client.get("/datasets").json()
    assert all_["total"] == 8
    assert len(all_["items"]) == 8
    cell_lines = client.get("/datasets", params={"tissue": "Cell line"}).json()
    assert cell_lines["total"] == 4
    assert {d["tissue"] for d in cell_lines["items"]} == {"Cell line"}
    two = client.get("/datasets", params=[("drug_class", "chemotherapy"), ("drug_class", "targeted therapy")])
    assert two.json()["total"] == sum(
        client.get("/datasets", params={"drug_class": v}).json()["total"]
        for v in ("chemotherapy", "targeted therapy")
    )
    assert client.get("/datasets", params={"label_confidence": "2"}).json()["total"] >= 1
    page = client.get(
        "/datasets", params={"limit": 3, "offset": 3, "order_by": "n_cells", "descending": True}
    )
    cells = [d["n_cells"] for d in page.json()["items"]]
    assert len(cells) == 3
    assert cells == sorted(cells, reverse=True)
    assert client.get("/datasets", params={"q": "sim-s03"}).json()["items"][0]["dataset_id"] == "SIM03"
    bad = client.get("/datasets", params={"bogus": "x"})
    assert bad.status_code == 400
    assert "unknown filter 'bogus'" in bad.json()["detail"]
    assert client.get("/datasets", params={"order_by": "1; DROP TABLE cells"}).status_code == 400
    assert client.get("/datasets", params={"limit": 0}).status_code == 422
    facets = client.get("/datasets/facets").json()
    assert {f["value"] for f in facets["tissue"]} >= {"Cell line"}
    d = client.get("/datasets/SIM01").json()
    c = d["counts"]
    assert c["n_cells"] == d["dataset"]["n_cells"] == c["n_sensitive"] + c["n_resistant"] + c["n_unlabelled"]
    assert c["n_sensitive"] > 0
    assert c["n_resistant"] > 0
    assert d["coverage"][0]["model"] == "pca"
    assert d["coverage"][0]["frac_genes"] == pytest.approx(1.0)
    assert d["coverage"][0]["genes_exact"] is None  # pca has no gene vocabulary: no routes
    assert d["embeddings"][0]["n_cells_embedded"] == c["n_cells"]
    missing = client.get("/datasets/NOPE")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no dataset 'NOPE' in the store"}


def test_models_runs_metrics_and_curves(client: TestClient, store_path: Path, head: str) -> None:
    models = client.get("/models").json()
    assert [e["model"] for e in models["embeddings"]] == ["pca"]
    assert models["embeddings"][0]["dim"] == 50
    heads = {h["run_id"]: h for h in models["heads"]}
    assert heads[head]["predictable"] is True
    assert 0.0 <= heads[head]["metrics"]["auroc"] <= 1.0
    runs = client.get("/runs", params={"protocol": "pooled", "strategy": "frozen"}).json()
    assert runs["total"] == 3
    assert {r["protocol"] for r in runs["items"]} == {"pooled"}
    assert client.get("/runs", params={"model": "nope"}).json()["total"] == 0
    folds = client.get("/metrics", params={"run_id": head, "metric": "auroc"}).json()["items"]
    assert len(folds) == 10
    assert {f["fold"] for f in folds} == set(range(10))
    summary = client.get("/metrics", params={"run_id": head, "summary": True}).json()["items"]
    auroc = next(s for s in summary if s["metric"] == "auroc")
    assert auroc["mean"] == pytest.approx(np.mean([f["score"] for f in folds]))
    assert auroc["mean"] == pytest.approx(heads[head]["metrics"]["auroc"])
    curves = client.get(f"/runs/{head}/curves").json()
    fpr, tpr = np.array(curves["roc"]["fpr"]), np.array(curves["roc"]["tpr"])
    assert fpr[0] == 0.0
    assert tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0)
    from sklearn.metrics import roc_auc_score

    p = Store.open(store_path).query(
        "SELECT p.probability, c.label FROM predictions p JOIN cells c USING (cell_uid) WHERE run_id = ?",
        [head],
    )
    assert curves["auroc"] == pytest.approx(roc_auc_score(p["label"] == "sensitive", p["probability"]))
    assert curves["n_positive"] + curves["n_negative"] == len(p)
    assert client.get("/runs/nope/curves").status_code == 404


# ---- SQL --------------------------------------------------------------------------------------
def test_sql_reads_with_row_limit(client: TestClient, store_path: Path) -> None:
    r = client.post("/sql", json={"query": "SELECT dataset_id, n_cells FROM datasets ORDER BY 1"}).json()
    assert r["columns"] == ["dataset_id", "n_cells"]
    assert r["n_rows"] == 8
    assert r["truncated"] is False
    r = client.post("/sql", json={"query": "SELECT * FROM cells", "limit": 5}).json()
    assert r["n_rows"] == 5
    assert r["truncated"] is True
    r = client.post(
        "/sql", json={"query": "WITH t AS (SELECT label FROM cells) SELECT COUNT(*) FROM t"}
    ).json()
    assert r["rows"] == [[int(Store.open(store_path).query("SELECT COUNT(*) AS n FROM cells")["n"].iloc[0])]]


@pytest.mark.parametrize(
    "query",
    [
        "INSERT INTO datasets (dataset_id) VALUES ('x')",
        "UPDATE cells SET label = 'sensitive'",
        "DELETE FROM cells",
        "CREATE TABLE t (a INT)",
        "DROP TABLE cells",
        "ATTACH '/tmp/other.duckdb' AS other",
        "COPY cells TO '/tmp/cells.csv'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_csv_auto('/etc/passwd')",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_text('/etc/passwd')",
        "PRAGMA database_list",
        "SET threads = 1",
        "SELECT 1; DROP TABLE cells",
        "EXPORT DATABASE '/tmp/x'",
        "SELECT getenv('HOME')",
        "",
    ],
)
def test_sql_refuses_writes_files_and_extensions(client: TestClient, store_path: Path, query: str) -> None:
    before = Store.open(store_path).snapshot()
    r = client.post("/sql", json={"query": query})
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["detail"], str)
    assert "root:" not in r.text
    assert Store.open(store_path).snapshot() == before


def test_sql_time_limit(store_path: Path) -> None:
    app = create_app(store_path, sql_time_limit_s=0.5)
    with TestClient(app) as c:
        t0 = time.perf_counter()
        r = c.post(
            "/sql", json={"query": "SELECT SUM(a.range * b.range) FROM range(200000) a, range(200000) b"}
        )
        assert r.status_code == 400
        assert "time limit" in r.json()["detail"]
        assert time.perf_counter() - t0 < 10
        assert c.post("/sql", json={"query": "SELECT 1 AS one"}).json()["rows"] == [[1]]


# ---- predict ----------------------------------------------------------------------------------
def test_predict_json_and_csv_match_predict_file(
    client: TestClient, store_path: Path, upload: Path, head: str, tmp_path: Path
) -> None:
    from scdrugmap.classify.predict import predict_file

    r = _post(client, upload, head)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "done"
    cells = pd.DataFrame(body["cells"])
    assert len(cells) == body["summary"]["n_cells"] == 150
    assert set(cells["call"]) <= {"sensitive", "resistant", "abstain", "not_scored"}
    assert set(cells["status"]) <= {"scored", "out_of_fold", "not_scored"}
    scored = cells["status"] != "not_scored"
    assert cells.loc[scored, "p_sensitive"].between(0, 1).all()
    expected = predict_file(Store.open(store_path), head, upload, out=tmp_path / "direct.h5ad")
    import anndata as ad

    obs = ad.read_h5ad(expected.out).obs
    np.testing.assert_allclose(cells["p_sensitive"], obs["scdrugmap_p_sensitive"].to_numpy(), rtol=1e-12)
    assert (cells["call"].to_numpy() == obs["scdrugmap_call"].astype(str).to_numpy()).all()
    csv = _post(client, upload, head, format="csv")
    assert csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in csv.headers["content-disposition"]
    from_csv = pd.read_csv(io.StringIO(csv.text))
    assert list(from_csv.columns) == [
        "obs_name",
        "p_sensitive",
        "p_sensitive_raw",
        "call",
        "status",
        "reason",
    ]
    np.testing.assert_allclose(from_csv["p_sensitive"], cells["p_sensitive"])
    band = _post(client, upload, head, abstain="0.0,1.0", calibration="isotonic").json()
    s = band["summary"]
    assert s["calibration"] == "isotonic"
    assert s["n_abstained"] == s["n_scored"] + s["n_out_of_fold"] > 0


def test_predict_job_status_result_and_umap(client: TestClient, upload: Path, head: str) -> None:
    r = _post(client, upload, head, wait="0")
    assert r.status_code in (200, 202)
    job = r.json()["job_id"]
    for _ in range(600):
        status = client.get(f"/jobs/{job}").json()
        if status["status"] in ("done", "failed"):
            break
        assert status["status"] in ("queued", "running")
        time.sleep(0.1)
    assert status["status"] == "done", status
    assert status["progress"] == 1.0
    assert status["summary"]["n_cells"] == 150
    res = client.get(f"/jobs/{job}/result").json()
    assert len(res["cells"]["obs_name"]) == 150
    umap = client.get(f"/jobs/{job}/umap").json()
    xy = np.column_stack([umap["x"], umap["y"]])
    assert xy.shape == (150, 2)
    assert np.isfinite(xy).all()
    assert xy.std(axis=0).min() > 0
    assert umap["p_sensitive"] == res["cells"]["p_sensitive"]
    assert umap["subsampled"] is False
    assert client.get("/jobs/nope").status_code == 404


def test_predict_refusals(client: TestClient, upload: Path, head: str, tmp_path: Path) -> None:
    text = tmp_path / "notes.h5ad"
    text.write_text("this is a text file, not HDF5\n" * 20)
    r = _post(client, text, head)
    assert r.status_code == 415
    assert "no HDF5 signature" in r.json()["detail"]
    txt = tmp_path / "cells.txt"
    txt.write_bytes(upload.read_bytes())
    assert _post(client, txt, head).status_code == 415
    fake = tmp_path / "fake.h5ad"
    fake.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 4096)
    r = _post(client, fake, head)
    assert r.status_code == 422
    assert "fake.h5ad" in r.json()["detail"]
    assert "Traceback" not in r.text
    assert "scdrugmap-serve" not in r.text  # no server paths
    assert _post(client, upload, "run-unknown").status_code == 404
    assert _post(client, upload, head, calibration="magic").status_code == 422
    assert _post(client, upload, head, abstain="0.9,0.1").status_code == 422
    assert client.post("/predict", data={"head": head}).status_code == 422
    with open(upload, "rb") as fh:
        assert client.post("/predict", files={"file": ("cells.h5ad", fh)}).status_code == 422


def test_predict_oversize_upload_is_413(store_path: Path, upload: Path, head: str, tmp_path: Path) -> None:
    big = tmp_path / "big.h5ad"
    big.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * (300 * 1024))
    app = create_app(store_path, max_upload_mb=0.1)
    with TestClient(app) as c:
        r = _post(c, big, head)
        assert r.status_code == 413
        assert "0.1 MiB" in r.json()["detail"]
        raw = c.post(
            "/predict",
            content=b"x",
            headers={"content-length": str(10**9), "content-type": "multipart/form-data; boundary=x"},
        )
        assert raw.status_code == 413
        assert not any(app.state.jobs.workdir.iterdir())  # nothing left behind


def test_concurrent_predictions_and_reads(client: TestClient, upload: Path, head: str) -> None:
    def predict() -> int:
        return _post(client, upload, head).status_code

    def read() -> int:
        return client.get("/datasets/SIM02").status_code

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(predict) for _ in range(4)] + [pool.submit(read) for _ in range(12)]
        codes = [f.result() for f in futures]
    assert codes == [200] * 16


def test_ingested_file_is_recorded(client: TestClient, store_path: Path, head: str) -> None:
    """A file that is an ingested dataset gets its predictions recorded (a catalog write through the service)."""
    r = _post(client, store_path / "demo_input" / "SIM02.h5ad", head)
    assert r.status_code == 200, r.text
    assert r.json()["summary"]["recorded_for_dataset"] == "SIM02"
    rec = Store.open(store_path).query("SELECT * FROM predict_runs WHERE dataset_id = 'SIM02'")
    assert len(rec) >= 1  # in its own table, never in eval_runs / metrics
    assert client.get("/runs", params={"strategy": "predict"}).json()["total"] == 0


# ---- token, bind, errors ----------------------------------------------------------------------
def test_token_required_when_configured(store_path: Path, upload: Path, head: str) -> None:
    app = create_app(store_path, token="s3cret")
    with TestClient(app) as c:
        assert c.get("/health").json()["auth_required"] is True
        assert c.get("/").status_code == 200
        assert c.get("/static/app.js").status_code == 200
        for path in ("/datasets", "/models", "/runs", "/metrics", "/datasets/SIM01", "/jobs/x"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert "token" in r.json()["detail"]
        assert c.post("/sql", json={"query": "SELECT 1"}).status_code == 401
        assert _post(c, upload, head).status_code == 401
        assert c.get("/datasets", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/datasets", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/datasets", headers={"X-Token": "s3cret"}).status_code == 200


def test_bind_rules() -> None:
    for host in ("127.0.0.1", "127.0.0.5", "::1", "[::1]", "localhost"):
        check_bind(host, None)
    for host in ("0.0.0.0", "192.168.1.10", "::", "example.org"):
        with pytest.raises(InputError, match="needs a token"):
            check_bind(host, None)
        check_bind(host, "tok")


def test_serve_command(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from scdrugmap import cli

    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.append((app, kw)))
    runner = CliRunner()
    refused = runner.invoke(cli.main, ["--store", str(store_path), "serve", "--host", "0.0.0.0"])
    assert refused.exit_code == 1
    assert "needs a token" in refused.output
    assert not calls
    ok = runner.invoke(
        cli.main, ["--store", str(store_path), "serve", "--host", "0.0.0.0", "--port", "8123"],
        env={"SCDRUGMAP_TOKEN": "tok"},
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    app, kw = calls[0]
    assert kw["host"] == "0.0.0.0"
    assert kw["port"] == 8123
    assert app.state.config.token == "tok"
    missing = runner.invoke(cli.main, ["--store", str(store_path / "nope"), "serve"])
    assert missing.exit_code == 1
    assert "no store" in missing.output


def test_internal_errors_are_json_without_trace(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scdrugmap.classify import queries

    def boom(*_a, **_k):
        raise RuntimeError("secret internals /very/private/path")

    monkeypatch.setattr(queries, "models_overview", boom)
    app = create_app(store_path)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/models")
        assert r.status_code == 500
        assert r.json() == {"detail": "internal server error (details are in the server log)"}
        r = c.get("/datasets", params={"limit": "many"})
        assert r.status_code == 422
        assert isinstance(r.json()["detail"], str)
        assert c.get("/no/such/route").json() == {"detail": "Not Found"}


def test_job_folders_removed_at_shutdown(store_path: Path, upload: Path, head: str) -> None:
    app = create_app(store_path)
    with TestClient(app) as c:
        assert _post(c, upload, head).status_code == 200
        workdir = app.state.jobs.workdir
        assert any(workdir.iterdir())
    assert not workdir.exists()


def test_jobs_expire(store_path: Path, upload: Path, head: str) -> None:
    app = create_app(store_path, max_jobs=2)
    with TestClient(app) as c:
        ids = [_post(c, upload, head).json()["job_id"] for _ in range(3)]
        assert c.get(f"/jobs/{ids[0]}").status_code == 404
        assert c.get(f"/jobs/{ids[-1]}").status_code == 200
        assert len(list(app.state.jobs.workdir.iterdir())) <= 2
    assert threading.active_count() < 50


def test_heads_that_cannot_embed_new_files_say_why(tmp_path: Path) -> None:
    """Imported and transductive (Harmony) embeddings, missing checkpoints and rf heads are not predictable."""
    from scdrugmap.classify.heads_info import unpredictable_reason

    frozen = {"strategy": "frozen", "head": "logreg"}
    assert unpredictable_reason(frozen, {"options": {}}) is None
    assert "imported" in unpredictable_reason(frozen, {"imported_from": "/x.h5ad"})
    assert "Harmony" in unpredictable_reason(frozen, {"corrected_from": {"model": "pca"}})
    assert "not on this machine" in unpredictable_reason(frozen, {"checkpoint": str(tmp_path / "gone")})
    assert "pickle" in unpredictable_reason({"strategy": "frozen", "head": "rf"}, {})
    assert "prompt" in unpredictable_reason({"strategy": "prompt", "head": "llm"}, {})
    assert "not in the store" in unpredictable_reason(frozen, None)


def test_models_offer_a_default_predictable_head(client: TestClient, head: str) -> None:
    models = client.get("/models").json()
    defaults = [h for h in models["heads"] if h["default"]]
    assert len(defaults) == 1
    assert defaults[0]["run_id"] == models["default_head"]
    assert defaults[0]["predictable"] is True
    best = max(
        (h for h in models["heads"] if h["predictable"]), key=lambda h: h["metrics"].get("auroc") or -1
    )
    assert models["default_head"] == best["run_id"]
