"""Prompting baseline units: reply parsing, log-probabilities, templates, gene ranking, scoring."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn import metrics as skm

from scdrugmap.classify.prompting.client import (
    ChatClient,
    ClientSettings,
    Estimate,
    Job,
    Reply,
    estimate_body,
)
from scdrugmap.classify.prompting.parse import parse_reply
from scdrugmap.classify.prompting.prompts import (
    STYLES,
    PromptTemplate,
    cell_ids,
    describe_source,
    request_body,
    top_genes,
)
from scdrugmap.classify.prompting.score import NO_LOGPROBS, PROMPT_METRICS, prompt_fold_metrics
from scdrugmap.store.errors import InputError

IDS = cell_ids(3)


def reply(
    content: str | None, *, refusal: str | None = None, finish: str = "stop", logprobs: Any = None
) -> dict:
    choice: dict[str, Any] = {"message": {"role": "assistant", "content": content, "refusal": refusal}}
    choice["finish_reason"] = finish
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"choices": [choice]}


def outcomes(resp: dict | None, ids: tuple[str, ...] = IDS) -> list[tuple[str, str | None]]:
    return [(c.outcome, c.reason) for c in parse_reply(resp, ids)]


S, R = ("sensitive", None), ("resistant", None)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"C1": "sensitive", "C2": "resistant", "C3": "Sensitive"}', [S, R, S]),
        ('```json\n{"C1": "resistant", "C2": 1, "C3": "0"}\n```', [R, S, R]),
        ('Sure! Here it is: {"C1": "sensitive", "C2": "resistant", "C3": "resistant"} Hope it helps.', [S, R, R]),
        ('{"reasoning": "C1: \\"C2\\": efflux", "answers": {"C1": "resistant", "C2": "sensitive", "C3": "sensitive"}}', [R, S, S]),
        ('[{"id": "C1", "answer": "sensitive"}, {"id": "C3", "answer": "resistant"}]', [S, ("abstain", "missing"), R]),
        ('{"cells": [{"id": "C2", "response": "resistant"}]}', [("abstain", "missing"), R, ("abstain", "missing")]),
        ("{res:1,0,1}", [S, R, S]),
        ("Result: {res:1,0}", [("abstain", "unparseable")] * 3),  # wrong length: positions unknown
        ("C1: sensitive\n- C2: **resistant**\nC3 = 1", [S, R, S]),
        ("My answers:\nC2: resistant", [("abstain", "missing"), R, ("abstain", "missing")]),
        ('{"C1": "sensitive", "C2": "resis', [("abstain", "unparseable")] * 3),
        ('```json\n{"C1": "sensitive",\n "C2": "resistant",\n```', [("abstain", "unparseable")] * 3),
        ("The cells look sensitive overall.", [("abstain", "unparseable")] * 3),
        ("", [("abstain", "unparseable")] * 3),
        ('{"C1": "sensitive", "C2": "unclear", "C3": null}', [S, ("abstain", "unparseable"), ("abstain", "unparseable")]),
        ("I'm sorry, but I cannot provide medical predictions.", [("abstain", "refused")] * 3),
        ('{"C1": "unknown", "C2": "unknown", "C3": "unknown", "note": "I cannot determine this"}', [("abstain", "refused")] * 3),
    ],
)  # fmt: skip
def test_answer_formats(content: str, expected: list) -> None:
    assert outcomes(reply(content)) == expected


def test_refusals_and_broken_bodies() -> None:
    assert outcomes(reply(None, refusal="I can't help with that.")) == [("abstain", "refused")] * 3
    assert outcomes(reply('{"C1": "sensitive"}', finish="content_filter")) == [("abstain", "refused")] * 3
    for bad in (None, {}, {"choices": []}, {"choices": [{"no": "message"}]}):
        assert outcomes(bad) == [("abstain", "unparseable")] * 3


def _tokens(content: str, alts: dict[int, list[tuple[str, float]]]) -> list[dict]:
    """Tokens of ``content``: the first alternative at each offset is the chosen token, the rest whole."""
    cuts = sorted({0, len(content), *alts, *(i + len(a[0][0]) for i, a in alts.items())})
    out = []
    for a, b in itertools.pairwise(cuts):
        tops = [{"token": t, "logprob": math.log(p)} for t, p in alts.get(a, [])]
        lp = tops[0]["logprob"] if tops else 0.0
        out.append(
            {
                "token": content[a:b],
                "logprob": lp,
                "top_logprobs": tops or [{"token": content[a:b], "logprob": 0.0}],
            }
        )
    return out


def test_probability_from_logprobs_sums_token_prefixes() -> None:
    content = '{"C1": "sensitive", "C2": "resistant", "C3": "sensitive"}'
    s1, s2, s3 = (content.index(w, i) for w, i in (("sensitive", 0), ("resistant", 0), ("sensitive", 20)))
    alts = {
        s1 - 1: [
            ('"sensitive', 0.5),
            ('"sens', 0.2),
            ('"res', 0.2),
            ('"maybe', 0.1),
        ],  # token covers the quote
        s2: [("resistant", 0.6), ("sens", 0.3)],
        s3: [("sensitive", 0.9)],  # other class not among the top alternatives
    }
    calls = parse_reply(reply(content, logprobs=_tokens(content, alts)), IDS)
    assert [c.outcome for c in calls] == ["sensitive", "resistant", "sensitive"]
    assert calls[0].p_sensitive == pytest.approx(0.7 / 0.9)
    assert calls[1].p_sensitive == pytest.approx(0.3 / 0.9)
    assert calls[2].p_sensitive == pytest.approx(1.0)
    # positional scDrugMap format: probability at each digit
    res = "{res:1,0,1}"
    toks = _tokens(
        res, {5: [("1", 0.8), ("0", 0.2)], 7: [("0", 0.7), ("1", 0.3)], 9: [("1", 0.6), ("0", 0.4)]}
    )
    assert [c.p_sensitive for c in parse_reply(reply(res, logprobs=toks), IDS)] == pytest.approx(
        [0.8, 0.3, 0.6]
    )
    assert all(c.p_sensitive is None for c in parse_reply(reply(content), IDS))


@pytest.mark.parametrize("style", STYLES)
def test_templates_render_and_schema(style: str) -> None:
    t = PromptTemplate.load(style)
    assert t.style == style
    assert len(t.sha256) == 64
    assert t.hash == t.sha256[:16]
    assert PromptTemplate.load(style).sha256 == t.sha256
    genes = [["EGFR", "KRAS"], ["ABCB1"], []]
    body = request_body(
        t, model="m", source="GSE1; tissue: Lung", genes=genes, temperature=0.0, seed=3, max_tokens=None,
        response_format="json_schema", logprobs=True,
    )  # fmt: skip
    user = body["messages"][1]["content"]
    assert "GSE1; tissue: Lung" in user
    assert "C1, C2, C3" in user
    assert "ABCB1" in user
    assert "$" not in user
    assert body["max_completion_tokens"] == t.max_tokens(3)
    assert body["top_logprobs"] == 5
    assert body["seed"] == 3
    schema = body["response_format"]["json_schema"]["schema"]
    answers = schema if t.answer_shape == "flat" else schema["properties"]["answers"]
    assert answers["required"] == ["C1", "C2", "C3"]
    assert not answers["additionalProperties"]
    text = request_body(t, model="m", source="s", genes=genes, temperature=0.0, seed=0, max_tokens=50,
                        response_format="text", logprobs=False)  # fmt: skip
    assert "response_format" not in text
    assert "logprobs" not in text
    assert text["max_completion_tokens"] == 50
    if t.cells_format == "nested":
        assert '["EGFR", "KRAS"]' in user
        assert "nested list" in user
    else:
        assert "C1: EGFR, KRAS" in user
        assert "C3: (no expressed genes)" in user


def test_template_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown prompt style"):
        PromptTemplate.load("top5")
    bad = tmp_path / "bad.toml"
    bad.write_text('style = "x"\nversion = 1\n')
    with pytest.raises(InputError, match="malformed"):
        PromptTemplate.load("x", bad)
    custom = tmp_path / "mine.toml"
    src = PromptTemplate.load("top10")
    text = (Path(__file__).parents[1] / "classify/prompting/templates/top10.toml").read_text()
    custom.write_text(text.replace("n_genes = 10", "n_genes = 5"))
    mine = PromptTemplate.load("mine", custom)
    assert mine.n_genes == 5
    assert mine.sha256 != src.sha256


def test_top_genes_ranking(tmp_path: Path) -> None:
    X = np.array([[5, 0, 9, 9, 1, 7], [0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]], dtype=np.float32)
    var = pd.DataFrame({"symbol": ["A", "B", "", "D", "E", "F"]}, index=[f"g{i}" for i in range(6)])
    path = tmp_path / "d.h5ad"
    ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=["x", "y", "z"]), var=var).write_h5ad(path)
    # unmapped gene (no symbol) and zeros left out; ties keep file order; cells in the order asked
    assert top_genes(path, ["z", "x", "y"], 3) == [["F", "E", "D"], ["D", "F", "A"], []]
    with pytest.raises(Exception, match="missing"):
        top_genes(path, ["nope"], 3)


def test_describe_source() -> None:
    row = {"dataset_id": "d1", "accession": "GSE1", "cancer_type": "AML", "tissue": None, "source": "patients",
           "drug": "venetoclax", "drug_class": "targeted"}  # fmt: skip
    assert (
        describe_source(row) == "GSE1; cancer type: AML; samples: patients; treatment: venetoclax (targeted)"
    )
    assert describe_source({"dataset_id": "d2", "study": float("nan")}) == "d2"


def test_scoring_counts_abstentions_as_wrong() -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    call = np.array([1, np.nan, 0, 1, np.nan, 0])
    prob = np.array([0.9, np.nan, 0.2, 0.6, np.nan, 0.1])
    m = prompt_fold_metrics(y, call, prob, logprobs=True)
    assert set(m) == set(PROMPT_METRICS)
    assert m["coverage"][0] == pytest.approx(4 / 6)
    all_pred = np.array([1, 0, 0, 1, 0, 0])
    assert m["accuracy"][0] == pytest.approx(skm.accuracy_score(y, all_pred))
    assert m["f1"][0] == pytest.approx(skm.f1_score(y, all_pred))
    ans = ~np.isnan(call)
    assert m["accuracy_answered"][0] == pytest.approx(skm.accuracy_score(y[ans], call[ans]))
    assert m["auroc_answered"][0] == pytest.approx(skm.roc_auc_score(y[ans], prob[ans]))
    assert m["auroc"][0] == pytest.approx(skm.roc_auc_score(y, np.where(ans, prob, 1 - y)))
    hard = prompt_fold_metrics(y, call, np.full(6, np.nan), logprobs=False)
    assert hard["auroc"] == (None, NO_LOGPROBS)
    assert hard["auprc_answered"] == (None, NO_LOGPROBS)
    assert hard["accuracy"] == m["accuracy"]
    partial = prompt_fold_metrics(y, call, np.where(np.arange(6) == 0, np.nan, prob), logprobs=True)
    assert partial["auroc"][0] is None
    assert "1 of 4" in partial["auroc"][1]
    none = prompt_fold_metrics(y, np.full(6, np.nan), np.full(6, np.nan), logprobs=True)
    assert none["coverage"][0] == 0
    assert none["accuracy"][0] == 0
    assert none["f1_answered"][0] is None


def test_estimates_and_backoff() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_completion_tokens": 30,
            "response_format": {"type": "json_object"}}  # fmt: skip
    prompt, completion = estimate_body(body, 100)
    assert prompt == 100 + 4 + math.ceil(len(json.dumps(body["response_format"])) / 4)
    assert completion == 30
    e = Estimate(2, 1, 1_000_000, 500_000, 0.15, 0.60)
    assert e.cost_usd == pytest.approx(0.45)
    assert (e + e).total_tokens == 3_000_000
    c = ChatClient(ClientSettings(base_url="http://127.0.0.1:9/v1", backoff_s=1.0, max_backoff_s=5.0), "k")
    assert c._delay(0, "2") == 2.0
    assert c._delay(0, "999") == 5.0
    assert 0.5 <= c._delay(0, None) <= 1.0
    assert 2.0 <= c._delay(2, None) <= 4.0
    assert c._delay(9, None) <= 5.0
    with pytest.raises(InputError, match="base-url"):
        ClientSettings(base_url="localhost:8000").check()
    with pytest.raises(InputError, match="credentials"):
        ClientSettings(base_url="https://user:secret@example.org/v1").check()


def test_token_budget_stops_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    c = ChatClient(ClientSettings(base_url="http://127.0.0.1:9/v1", concurrency=1), "k")
    sent: list[str] = []

    def fake_send(job: Job) -> Reply:
        sent.append(job.key)
        return Reply(job.key, "ok", {"choices": [], "usage": {"total_tokens": 100}}, 1, 0.0)

    monkeypatch.setattr(c, "send", fake_send)
    seen: list[str] = []
    jobs = [Job(f"k{i}", {}, 10) for i in range(5)]
    replies = c.send_all(jobs, budget=150, on_reply=lambda r: seen.append(r.key))
    assert sent == seen == ["k0", "k1"]  # 10 → 100 actual, 110 → 200 actual: the third would exceed 150
    assert [r.status for r in replies] == ["ok", "ok", "budget", "budget", "budget"]
    assert len(c.send_all(jobs, budget=None, on_reply=lambda r: None)) == 5
