"""Prompting baseline against a local fake OpenAI-compatible server (no internet).

The server (``http.server`` on 127.0.0.1, started per module) answers ``POST /v1/chat/completions``
deterministically from the prompt: a cell is called resistant when at least half of its listed
genes are in the toy resistance programme (the first 20 genes of ``synth.toy_adata``), else
sensitive, with a log-probability that grows with that fraction. What it does beyond that depends
on the dataset named in the prompt's data source: ``good`` (answers), ``garbage`` (malformed
JSON), ``missing`` (C2 left out, C3 answered "maybe"), ``refuse`` (a refusal), ``ratelimit``
(HTTP 429 with Retry-After: 0 on the first try), ``flaky`` (HTTP 500 twice, then answers),
``down`` (always 500) and ``slow`` (answers after longer than the client timeout).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn import metrics as skm
from synth import hgnc_symbols, toy_adata

from scdrugmap.classify.prompting import ClientSettings, PromptOptions, run_prompt
from scdrugmap.cli import main
from scdrugmap.store import Store
from scdrugmap.store.errors import InputError
from scdrugmap.store.ingest import ingest_h5ad

API_KEY = "sk-test-0123456789-secret"
MARKERS = set(hgnc_symbols()[:20])
SIZES = {
    "good": 25,
    "garbage": 10,
    "missing": 10,
    "refuse": 10,
    "ratelimit": 10,
    "flaky": 10,
    "down": 10,
    "slow": 10,
}
SLOW_S = 1.5


def _cells(user: str) -> dict[str, list[str]]:
    lines = dict(re.findall(r"^(C\d+): (.*)$", user, re.MULTILINE))
    if lines:
        return {k: [g for g in v.split(", ") if not g.startswith("(")] for k, v in lines.items()}
    nested = json.loads(re.search(r"^\[\n.*?\n\]$", user, re.MULTILINE | re.DOTALL).group(0))
    return {f"C{i + 1}": g for i, g in enumerate(nested)}


def _p_resistant(genes: list[str]) -> float:
    frac = sum(g in MARKERS for g in genes) / max(len(genes), 1)
    return min(0.95, max(0.05, 0.2 + frac))


def _completion(body: dict[str, Any], content: str, answers: dict[str, str], probs: dict[str, float]) -> dict:
    out: dict[str, Any] = {
        "index": 0,
        "finish_reason": "stop",
        "message": {"role": "assistant", "content": content},
    }
    if body.get("logprobs"):
        toks, pos = [], 0
        for tok in re.findall(r'sensitive|resistant|\w+|"|[^\w"]+', content):
            entry: dict[str, Any] = {
                "token": tok,
                "logprob": 0.0,
                "top_logprobs": [{"token": tok, "logprob": 0.0}],
            }
            if tok in ("sensitive", "resistant"):
                cid = re.findall(r'"(C\d+)"\s*:\s*"$', content[:pos])[-1]
                p_res = probs[cid]
                other = "resistant" if tok == "sensitive" else "sensitive"
                p_tok = p_res if tok == "resistant" else 1 - p_res
                entry = {"token": tok, "logprob": math.log(p_tok),
                         "top_logprobs": [{"token": tok, "logprob": math.log(p_tok)},
                                          {"token": other, "logprob": math.log(1 - p_tok)}]}  # fmt: skip
            toks.append(entry)
            pos += len(tok)
        out["logprobs"] = {"content": toks}
    user = body["messages"][-1]["content"]
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [out],
        "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": len(content) // 4,
                  "total_tokens": len(user) // 4 + len(content) // 4},
    }  # fmt: skip


class FakeServer:
    """A bounded fake chat-completions endpoint with a request log."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.tries: Counter[str] = Counter()
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, payload, headers = fake.answer(body, self.headers.get("Authorization", ""))
                self._send(code, payload, headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    @property
    def n(self) -> int:
        return len(self.requests)

    def answer(self, body: dict[str, Any], auth: str) -> tuple[int, Any, dict[str, str] | None]:
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return self._answer(body, auth)
        finally:
            with self.lock:
                self.inflight -= 1

    def _answer(self, body: dict[str, Any], auth: str) -> tuple[int, Any, dict[str, str] | None]:
        user = body["messages"][-1]["content"]
        kind = re.search(r"Data source: (\w+)", user).group(1)
        with self.lock:
            self.requests.append(body)
            self.auth.append(auth)
            key = json.dumps(body, sort_keys=True)
            self.tries[key] += 1
            tries = self.tries[key]
        if body["model"] == "no-such-model":
            return 404, {"error": {"message": "model not found", "type": "invalid_request_error"}}, None
        if kind == "ratelimit" and tries == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
        if (kind == "flaky" and tries <= 2) or kind == "down":
            return 500, {"error": {"message": "boom"}}, None
        if kind == "slow":
            time.sleep(SLOW_S)
        cells = _cells(user)
        probs = {c: _p_resistant(g) for c, g in cells.items()}
        answers = {c: "resistant" if p >= 0.5 else "sensitive" for c, p in probs.items()}
        if kind == "missing":
            answers.pop("C2")
            answers["C3"] = "maybe"
        if kind == "refuse":
            content = "I'm sorry, but I can't help with predicting drug responses."
        elif kind == "garbage":
            content = '{"C1": "sensitive", "C2": "resis'
        elif "response_format" not in body:
            content = "Here are my calls:\n" + "\n".join(f"{c}: {a}" for c, a in answers.items())
        elif '"answers"' in user:
            content = json.dumps(
                {"reasoning": "C1 shows efflux genes; C2 looks proliferative.", "answers": answers}
            )
        else:
            content = json.dumps(answers)
        return 200, _completion(body, content, answers, probs), None

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server() -> Any:
    srv = FakeServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """One toy dataset per server behaviour, all with tissue 'Cell line'."""
    tmp = tmp_path_factory.mktemp("prompt")
    st = Store.open(tmp / "store", create=True)
    for i, (name, n) in enumerate(SIZES.items()):
        path = tmp / f"{name}.h5ad"
        toy_adata(n_cells=n, seed=40 + i, n_samples=4, prefix=f"{name}_").write_h5ad(path)
        ingest_h5ad(
            st, path, dataset_id=name, label_key="response", sample_key="sample", min_genes=50,
            meta={"tissue": "Cell line", "cancer_type": "Lung cancer", "drug": "erlotinib", "drug_class": "targeted"},
        )  # fmt: skip
    return st


@pytest.fixture(scope="module", autouse=True)
def api_key() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEST_LLM_KEY", API_KEY)
        yield


def _client(server: FakeServer, **kw: Any) -> ClientSettings:
    base = {"base_url": server.url, "api_key_env": "TEST_LLM_KEY", "timeout_s": 0.4, "retries": 2,
            "backoff_s": 0.01, "concurrency": 4}  # fmt: skip
    return ClientSettings(**{**base, **kw})


def _outcomes(st: Store, run_id: str):
    return st.query(
        "SELECT o.*, c.dataset_id, c.label FROM prompt_outcomes o JOIN cells c USING (cell_uid) "
        "WHERE run_id = ? ORDER BY cell_uid",
        [run_id],
    )


@pytest.fixture(scope="module")
def mixed(store: Store, server: FakeServer) -> Any:
    """One pooled run over every behaviour (tissue 'Cell line', grouped 4-fold), with sleeps recorded."""
    sleeps: list[float] = []
    n0 = server.n
    report = run_prompt(
        store, PromptOptions(style="top10"), _client(server), category="tissue", values=["Cell line"],
        grouping="cell", k=4, sleep=sleeps.append,
    )  # fmt: skip
    return report, sleeps, server.n - n0


def test_every_cell_gets_exactly_one_outcome(store: Store, mixed: Any) -> None:
    report, _, _ = mixed
    run = report.runs[0]
    out = _outcomes(store, run.run_id)
    n_labelled = store.query("SELECT COUNT(*) AS n FROM cells")["n"].iloc[0]
    assert len(out) == run.n_cells == n_labelled  # nothing dropped, the partial last request included
    assert out["cell_uid"].is_unique
    by = {ds: g for ds, g in out.groupby("dataset_id")}
    for ds in ("good", "ratelimit", "flaky"):
        assert set(by[ds]["outcome"]) <= {"sensitive", "resistant"}, ds
        assert by[ds]["p_sensitive"].notna().all()
    assert (by["garbage"]["reason"] == "unparseable").all()
    assert (by["refuse"]["reason"] == "refused").all()
    assert (by["slow"]["reason"] == "timeout").all()
    assert (by["down"]["reason"] == "error").all()
    miss = by["missing"].set_index("cell_id")
    assert miss.loc["C2", "reason"] == "missing"
    assert miss.loc["C3", "reason"] == "unparseable"
    assert miss.loc["C3", "answer"] == "maybe"
    assert miss.drop(["C2", "C3"])["outcome"].isin(["sensitive", "resistant"]).all()
    assert run.status == "incomplete"
    assert run.abstained == {"unparseable": 11, "refused": 10, "timeout": 10, "error": 10, "missing": 1}
    good = by["good"]
    calls = np.where(good["outcome"] == "resistant", "resistant", "sensitive")
    assert (calls == good["label"]).mean() > 0.7  # the toy resistance programme is visible in the top genes


def test_retries_and_backoff(store: Store, server: FakeServer, mixed: Any) -> None:
    _, sleeps, n_sent = mixed
    tries: dict[str, list[int]] = {}
    for body, count in server.tries.items():
        kind = re.search(r"Data source: (\w+)", json.loads(body)["messages"][-1]["content"]).group(1)
        tries.setdefault(kind, []).append(count)
    assert tries["ratelimit"] == [2]  # 429, then success
    assert tries["flaky"] == [3]  # 500, 500, success
    assert tries["down"] == [3]
    assert tries["slow"] == [3]
    assert tries["good"] == [1, 1, 1]  # 25 cells: 10 + 10 + 5
    assert n_sent == sum(sum(v) for v in tries.values())
    assert 1 <= server.max_inflight <= 4  # the concurrency limit
    assert sleeps.count(0.0) == 1  # Retry-After: 0 honoured
    assert all(0 < s <= 0.04 for s in sleeps if s)  # exponential: 0.01 × 2**i, half jittered
    cache = store.query(
        "SELECT attempts, n_cells FROM prompt_cache WHERE request_key IN "
        "(SELECT request_key FROM prompt_outcomes WHERE run_id = ?)",
        [mixed[0].runs[0].run_id],
    )
    assert sorted(cache["attempts"].tolist()) == [1] * 6 + [2, 3]  # ok replies only; slow/down not cached
    assert sorted(cache["n_cells"].tolist()) == [5] + [10] * 7


def test_metrics_match_sklearn_on_stored_outcomes(store: Store, mixed: Any) -> None:
    run = mixed[0].runs[0]
    out = _outcomes(store, run.run_id)
    m = store.query("SELECT fold, metric, value, reason FROM metrics WHERE run_id = ?", [run.run_id])
    m = m.set_index(["fold", "metric"])
    assert (
        store.query("SELECT strategy FROM eval_runs WHERE run_id = ?", [run.run_id])["strategy"][0]
        == "prompt"
    )
    for f, g in out.groupby("fold"):
        y = (g["label"] == "sensitive").to_numpy().astype(int)
        answered = (g["outcome"] != "abstain").to_numpy()
        call = (g["outcome"] == "sensitive").to_numpy().astype(int)
        wrong_all = np.where(answered, call, 1 - y)
        assert m.loc[(f, "coverage"), "value"] == pytest.approx(answered.mean())
        assert m.loc[(f, "accuracy"), "value"] == pytest.approx(skm.accuracy_score(y, wrong_all))
        assert m.loc[(f, "f1"), "value"] == pytest.approx(skm.f1_score(y, wrong_all))
        assert m.loc[(f, "accuracy_answered"), "value"] == pytest.approx(
            skm.accuracy_score(y[answered], call[answered])
        )
        assert m.loc[(f, "mcc_answered"), "value"] == pytest.approx(
            skm.matthews_corrcoef(y[answered], call[answered])
        )
        p = g["p_sensitive"].to_numpy()
        assert m.loc[(f, "auroc_answered"), "value"] == pytest.approx(
            skm.roc_auc_score(y[answered], p[answered])
        )
        p_all = np.where(answered, p, 1 - y)
        assert m.loc[(f, "auroc"), "value"] == pytest.approx(skm.roc_auc_score(y, p_all))
        assert m.loc[(f, "auprc"), "value"] == pytest.approx(skm.average_precision_score(y, p_all))
    preds = store.query(
        "SELECT cell_uid, probability FROM predictions WHERE run_id = ? ORDER BY cell_uid", [run.run_id]
    )
    assert len(preds) == len(out)
    np.testing.assert_allclose(preds["probability"], out["p_sensitive"])  # NaN where abstained


def test_incomplete_run_resends_only_failed_requests(store: Store, server: FakeServer, mixed: Any) -> None:
    n0 = server.n
    report = run_prompt(
        store, PromptOptions(style="top10"), _client(server, retries=0), category="tissue", values=["Cell line"],
        grouping="cell", k=4, sleep=lambda s: None,
    )  # fmt: skip
    assert server.n - n0 == 2  # slow and down only; everything else from the cache
    assert report.runs[0].run_id == mixed[0].runs[0].run_id
    assert report.runs[0].n_sent == 2


def test_cache_second_run_sends_nothing(store: Store, server: FakeServer) -> None:
    opts = PromptOptions(style="cot", cells_per_request=7)
    first = run_prompt(store, opts, _client(server), values=["good"], grouping="sample", k=2).runs[0]
    assert first.status == "complete"
    assert first.n_sent == 4
    n0 = server.n
    again = run_prompt(store, opts, _client(server), values=["good"], grouping="sample", k=2).runs[0]
    assert server.n == n0
    assert again.reused
    assert again.run_id == first.run_id
    # other folds over the same cells (a different run): every request comes from the cache
    other = run_prompt(store, opts, _client(server), values=["good"], grouping="cell", k=3).runs[0]
    assert server.n == n0
    assert not other.reused
    assert other.run_id != first.run_id
    assert other.n_sent == 0
    a, b = _outcomes(store, first.run_id), _outcomes(store, other.run_id)
    cols = ["cell_uid", "outcome", "reason", "answer", "p_sensitive", "request_key"]
    assert a[cols].equals(b[cols])
    # --rerun asks again
    rerun = run_prompt(store, opts, _client(server), values=["good"], grouping="cell", k=3, rerun=True).runs[
        0
    ]
    assert server.n == n0 + 4
    assert rerun.n_sent == 4
    assert _outcomes(store, rerun.run_id)[cols].equals(b[cols])


def test_dry_run_estimates_and_sends_nothing(store: Store, server: FakeServer) -> None:
    n0, runs0 = server.n, store.query("SELECT COUNT(*) AS n FROM eval_runs")["n"][0]
    rep = run_prompt(store, PromptOptions(style="top100"), _client(server), values=["good", "missing"], grouping="cell",
                     k=2, dry_run=True)  # fmt: skip
    assert rep.dry_run
    assert not rep.runs
    assert rep.estimate.n_requests == 4
    assert rep.estimate.n_cached == 0
    assert rep.estimate.prompt_tokens > 4 * 100
    assert rep.estimate.completion_tokens > 0
    assert rep.estimate.cost_usd == pytest.approx(
        (rep.estimate.prompt_tokens * 0.15 + rep.estimate.completion_tokens * 0.60) / 1e6
    )
    where = run_prompt(store, PromptOptions(style="top100", cells_per_request=5), _client(server), grouping="cell",
                       k=2, where="dataset_id IN ('good', 'refuse')", dry_run=True)  # fmt: skip
    assert where.estimate.n_requests == 5 + 2
    cached = run_prompt(store, PromptOptions(style="top10"), _client(server), values=["good"], grouping="cell",
                        k=3, dry_run=True, rerun=False)  # fmt: skip
    assert cached.estimate.n_cached == cached.estimate.n_requests == 3
    assert cached.estimate.total_tokens == 0
    with pytest.raises(InputError, match="token budget"):
        run_prompt(store, PromptOptions(style="top100"), _client(server), values=["good"], grouping="cell", k=2,
                   token_budget=100)  # fmt: skip
    assert server.n == n0
    assert store.query("SELECT COUNT(*) AS n FROM eval_runs")["n"][0] == runs0


def test_no_logprobs_gives_null_auroc_and_text_format(store: Store, server: FakeServer) -> None:
    opts = PromptOptions(style="top10", logprobs=False, response_format="text")
    run = run_prompt(store, opts, _client(server), values=["good"], grouping="cell", k=2).runs[0]
    assert run.n_answered == run.n_cells == 25  # text replies ("C1: sensitive" lines) parsed
    m = store.query("SELECT metric, value, reason FROM metrics WHERE run_id = ?", [run.run_id])
    ranked = m[m["metric"].isin(["auroc", "auprc", "auroc_answered", "auprc_answered"])]
    assert ranked["value"].isna().all()
    assert ranked["reason"].str.startswith("no probabilities").all()
    assert m.loc[m["metric"] == "accuracy", "value"].notna().all()
    p = store.query("SELECT probability FROM predictions WHERE run_id = ?", [run.run_id])
    assert len(p) == 25
    assert p["probability"].isna().all()


def test_api_key_from_env_and_never_stored(
    store: Store, server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.auth
    assert set(server.auth) == {f"Bearer {API_KEY}"}
    for table in store.query("SELECT table_name FROM duckdb_tables()")["table_name"]:
        hits = store.query(
            f"SELECT COUNT(*) AS n FROM {table} t WHERE CAST(t AS VARCHAR) LIKE ?", [f"%{API_KEY}%"]
        )
        assert hits["n"][0] == 0, table
    for path in Path(store.path).rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path
    monkeypatch.delenv("TEST_LLM_KEY")
    n0 = server.n
    with pytest.raises(InputError, match="TEST_LLM_KEY"):
        run_prompt(
            store, PromptOptions(style="top100"), _client(server), values=["good"], grouping="cell", k=2
        )
    assert server.n == n0


def test_endpoint_refusal_is_one_clear_error(store: Store, server: FakeServer) -> None:
    with pytest.raises(InputError, match="HTTP 404"):
        run_prompt(
            store,
            PromptOptions(model="no-such-model"),
            _client(server),
            values=["good"],
            grouping="cell",
            k=2,
        )
    assert store.query("SELECT COUNT(*) AS n FROM eval_runs WHERE model = 'no-such-model'")["n"][0] == 0


def test_cli(store: Store, server: FakeServer) -> None:
    runner = CliRunner()
    base = ["--store", str(store.path), "prompt", "--dataset", "refuse", "--group", "cell", "--k", "2",
            "--base-url", server.url, "--api-key-env", "TEST_LLM_KEY", "--style", "top100"]  # fmt: skip
    n0 = server.n
    res = runner.invoke(main, [*base, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "dry run" in res.output
    assert "tokens" in res.output
    assert "$" in res.output
    assert server.n == n0
    res = runner.invoke(main, base)
    assert res.exit_code == 0, res.output
    assert "abstained: refused 10" in res.output
    assert "coverage" in res.output
    assert server.n == n0 + 1
    res = runner.invoke(main, ["prompt", "--style", "cot", "--show-template"])
    assert res.exit_code == 0
    assert "nested list" in res.output
    assert "sha256" in res.output
    res = runner.invoke(
        main, ["--store", str(store.path), "prompt", "--dataset", "nope", "--base-url", server.url]
    )
    assert res.exit_code == 1
    assert "Error:" in res.output
