"""Library replacements of hand-written code (issue #20) give the results of the code they replaced.

Each test keeps a copy of the replaced implementation as the reference.
"""

from __future__ import annotations

from typing import ClassVar, Literal

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


class _OldScaledHead:
    """``classify/heads.py``'s hand-written standardisation before the StandardScaler pipeline."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def fit(self, X, y, groups=None):
        self.mean = X.mean(axis=0)
        std = X.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)
        Z = ((X - self.mean) / self.std).astype(np.float32)
        if getattr(self.inner, "accepts_groups", False):
            self.inner.fit(Z, y, groups=groups)
        else:
            self.inner.fit(Z, y)
        return self

    def predict_proba(self, X):
        return self.inner.predict_proba(((X - self.mean) / self.std).astype(np.float32))[:, 1]


def _head_data(dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    X = rng.normal(2.0, 3.0, (300, 12)).astype(dtype)
    X[:, 3] = 5.0  # a constant feature: scaled by 1
    y = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(0, 2, 300) > 3).astype(int)
    groups = np.repeat(np.arange(10), 30)
    return X, y, groups


HEAD_PARAMS = {
    "logreg": {},
    "lightgbm": {"n_estimators": 30},
    "rf": {"n_estimators": 20},
    "mlp_paper": {"epochs": 3},
    "mlp": {"max_epochs": 5, "min_steps": 10},
}


@pytest.mark.parametrize("name", list(HEAD_PARAMS))
def test_scaled_head_pipeline_predicts_as_before(name: str) -> None:
    from scdrugmap.classify.heads import HeadSpec, make_head

    X, y, groups = _head_data()
    spec = HeadSpec.create(name, HEAD_PARAMS[name])
    new = make_head(spec, seed=3, threads=1).fit(X, y, groups)
    old = _OldScaledHead(make_head(spec, seed=3).inner).fit(X, y, groups)
    np.testing.assert_allclose(new.mean, old.mean, rtol=1e-6)
    np.testing.assert_allclose(new.std, old.std, rtol=1e-5)
    assert new.std[3] == 1.0
    np.testing.assert_allclose(new.predict_proba(X), old.predict_proba(X), atol=1e-4)
    assert new.predict_proba(X[:7]).shape == (7,)


@pytest.mark.parametrize("name", ["logreg", "lightgbm", "mlp_paper"])
def test_saved_heads_reload_bit_identical_and_old_saves_load(name: str, tmp_path) -> None:
    from scdrugmap.classify.heads import HeadSpec, make_head
    from scdrugmap.classify.persist import load_head, save_head

    X, y, groups = _head_data()
    spec = HeadSpec.create(name, HEAD_PARAMS[name])
    new = make_head(spec, seed=3).fit(X, y, groups)
    save_head(new, spec, tmp_path / "new", extra={})
    loaded, meta = load_head(tmp_path / "new")
    assert meta["n_features"] == X.shape[1]
    np.testing.assert_array_equal(loaded.predict_proba(X), new.predict_proba(X))
    # a head saved before the pipeline (same files: scaler.mean/std in the input's dtype)
    old = _OldScaledHead(make_head(spec, seed=3).inner).fit(X, y, groups)
    save_head(old, spec, tmp_path / "old", extra={})
    loaded_old, _ = load_head(tmp_path / "old")
    assert loaded_old.mean.dtype == np.float32
    np.testing.assert_array_equal(loaded_old.predict_proba(X), old.predict_proba(X))


class _ScriptedServer:
    """OpenAI-style endpoint answering each model name with a fixed sequence of HTTP statuses."""

    SCRIPTS: ClassVar[dict[str, list]] = {
        "rate": [(429, {"Retry-After": "0"}), 200],
        "busy": [(503, {"Retry-After": "2"}), 500, 200],
        "down": [502, 502, 502, 502],
        "bad": [400],
        "auth": [401],
        "gone": [404],
    }

    def __init__(self) -> None:
        import threading
        from collections import Counter
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.tries: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                import json

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model = body["model"]
                server.tries[model] += 1
                script = server.SCRIPTS[model]
                step = script[min(server.tries[model], len(script)) - 1]
                status, headers = step if isinstance(step, tuple) else (step, {})
                if status == 200:
                    out = {"id": "x", "object": "chat.completion", "created": 0, "model": model,
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "ok"}}]}  # fmt: skip
                else:
                    out = {"error": {"message": f"status {status}"}}
                data = json.dumps(out).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_openai_client_retries_429_and_5xx_and_fails_4xx_at_once() -> None:
    from scdrugmap.classify.prompting.client import ChatClient, ClientSettings, EndpointError, Job

    srv = _ScriptedServer()
    try:
        sleeps: list[float] = []
        settings = ClientSettings(base_url=srv.url, timeout_s=5, retries=3, backoff_s=0.5, max_backoff_s=30)
        chat = ChatClient(settings, "k", sleep=sleeps.append)

        def send(model: str):
            return chat.send(Job(model, {"model": model, "messages": [{"role": "user", "content": "hi"}]}, 1))

        r = send("rate")
        assert (r.status, r.attempts, srv.tries["rate"]) == ("ok", 2, 2)
        assert sleeps == [0.0]  # Retry-After: 0 honoured
        r = send("busy")
        assert (r.status, r.attempts, srv.tries["busy"]) == ("ok", 3, 3)
        assert sleeps[1] == 2.0  # Retry-After: 2
        assert 0.5 <= sleeps[2] <= 1.0  # second retry: backoff 0.5 × 2, half jittered
        sleeps.clear()
        r = send("down")
        assert (r.status, r.attempts, r.error, srv.tries["down"]) == ("error", 4, "HTTP 502", 4)
        assert len(sleeps) == 3
        assert 0.25 <= sleeps[0] <= 0.5  # 0.5 × 2**i, half jittered
        assert 1.0 <= sleeps[2] <= 2.0
        sleeps.clear()
        for model, status in (("bad", 400), ("auth", 401), ("gone", 404)):
            with pytest.raises(EndpointError, match=f"HTTP {status}"):
                send(model)
            assert srv.tries[model] == 1, model  # no retry
        assert sleeps == []
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


def _old_analysis_counts(X) -> sp.csr_matrix:
    """``classify/analyze/data.py:_analysis_view``'s hand-written CP10k + log1p."""
    counts = sp.csr_matrix(X, dtype=np.float32)
    lib = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    norm = sp.diags(scale.astype(np.float32)) @ counts
    norm.data = np.log1p(norm.data)
    return sp.csr_matrix(norm, dtype=np.float32)


def _counts(n: int = 200, g: int = 300, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    X = sp.random(n, g, density=0.15, random_state=seed, format="csr", dtype=np.float32)
    X.data = rng.poisson(3, X.nnz).astype(np.float32) + 1
    return X


def test_analysis_view_cp10k_log1p_is_scanpys() -> None:
    from scdrugmap.classify.analyze.data import _analysis_view

    X = _counts()
    a = _analysis_view(ad.AnnData(X=X.copy()), "counts")
    old = _old_analysis_counts(X)
    assert a.X.dtype == np.float32
    assert sp.issparse(a.X)
    np.testing.assert_array_equal(a.layers["counts"].toarray(), X.toarray())
    np.testing.assert_allclose(a.X.toarray(), old.toarray(), rtol=2e-7, atol=0)  # float32: ≤ 1 ulp apart
    assert a.X.nnz == old.nnz


def _old_expression_pcs(X, n_comps: int = 30) -> np.ndarray:
    import scanpy as sc

    data = X.data if sp.issparse(X) else np.asarray(X)
    a = ad.AnnData(X=X.astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32))
    if data.size and np.nanmin(data) >= 0 and np.allclose(data, np.round(data)):
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    k = max(1, min(n_comps, min(a.shape) - 1))
    sc.pp.pca(a, n_comps=k, random_state=0)
    return a.obsm["X_pca"].astype(np.float32)


@pytest.mark.parametrize("kind", ["sparse counts", "dense counts", "lognorm"])
def test_service_projection_unchanged(kind: str) -> None:
    from scdrugmap.classify.projection import expression_pcs

    X = _counts()
    X = X.toarray() if kind == "dense counts" else X
    X = X.log1p() if kind == "lognorm" else X
    np.testing.assert_array_equal(expression_pcs(X), _old_expression_pcs(X))


@pytest.mark.parametrize("x_kind", ["counts", "scaled"])
def test_pseudotime_embedding_unchanged(x_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import scanpy as sc

    from scdrugmap.classify.analyze.data import _analysis_view
    from scdrugmap.classify.analyze.pseudotime import PseudotimeSpec, _embed

    spec = PseudotimeSpec(n_top_genes=100, n_pcs=10, n_dcs=5)
    X = _counts(n=120, g=300, seed=2)
    if x_kind == "scaled":
        X = (X.toarray() - X.toarray().mean(axis=0)) / (X.toarray().std(axis=0) + 1)
    new = _analysis_view(ad.AnnData(X=X.copy()), x_kind)
    old = new.copy()
    # the steps after the PCA are unchanged (and their numba compilation takes 15 s): recorded only
    calls: list[tuple] = []
    monkeypatch.setattr(sc.pp, "neighbors", lambda a, **kw: calls.append(("neighbors", kw)))
    monkeypatch.setattr(sc.tl, "diffmap", lambda a, **kw: calls.append(("diffmap", kw)))
    _embed(new, spec)
    assert calls == [
        ("neighbors", {"n_neighbors": spec.n_neighbors, "n_pcs": spec.n_pcs, "random_state": spec.seed}),
        ("diffmap", {"n_comps": spec.n_dcs + 1}),
    ]
    # the pipeline as pseudotime.py wrote it before projection.pca_pipeline
    if x_kind == "counts":
        old.uns["log1p"] = {"base": None}
        sc.pp.highly_variable_genes(old, n_top_genes=spec.n_top_genes, flavor="seurat", subset=True)
    if x_kind != "scaled":
        sc.pp.scale(old, max_value=10)
    sc.pp.pca(old, n_comps=spec.n_pcs, random_state=spec.seed)
    assert new.n_vars == (100 if x_kind == "counts" else 300)
    np.testing.assert_array_equal(new.X, old.X)
    np.testing.assert_array_equal(new.obsm["X_pca"], old.obsm["X_pca"])
