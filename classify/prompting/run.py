"""Zero-shot prompting runs: send or reuse the planned requests, score, store like a head run.

Cells come from the same persisted fold sets as every other strategy
(:func:`classify.folds.get_fold_set`); zero-shot uses no training side, so every cell is asked
once (see :mod:`classify.prompting.plan`) and scored in the fold where it is on the test side.
A run writes, in one transaction, its ``eval_runs`` row (strategy ``prompt``), ``metrics`` rows
(see :mod:`classify.prompting.score`), one ``predictions`` row per cell (probability of the
positive class from log-probabilities, NULL without) and one ``prompt_outcomes`` row per cell::

    prompt_outcomes(run_id, fold, cell_uid, request_key, cell_id, outcome, reason, answer,
                    p_sensitive, PRIMARY KEY (run_id, cell_uid))

A run is ``complete`` when every request got an answer (cached); otherwise it is stored as
``incomplete`` and running it again asks only the requests that timed out or failed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any, Literal

import numpy as np
import pandas as pd

from scdrugmap.classify.folds import Grouping, Protocol
from scdrugmap.classify.prompting.cache import CacheWriter, cells_hash, lookup
from scdrugmap.classify.prompting.client import ChatClient, ClientSettings, Estimate, Job, Reply, read_api_key
from scdrugmap.classify.prompting.parse import CellCall, failed, parse_reply
from scdrugmap.classify.prompting.plan import Plan, PromptOptions, PromptSpec, Request, plan_runs
from scdrugmap.classify.prompting.prompts import PromptTemplate, cell_ids
from scdrugmap.classify.prompting.score import prompt_fold_metrics
from scdrugmap.classify.runs import write_run
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError

__all__ = ["OUTCOMES_DDL", "PromptOptions", "PromptReport", "PromptRun", "PromptSpec", "run_prompt"]

log = logging.getLogger(__name__)

OUTCOMES_DDL = """
CREATE TABLE IF NOT EXISTS prompt_outcomes (
    run_id VARCHAR, fold INTEGER, cell_uid BIGINT, request_key VARCHAR, cell_id VARCHAR, outcome VARCHAR,
    reason VARCHAR, answer VARCHAR, p_sensitive DOUBLE, PRIMARY KEY (run_id, cell_uid)
)
"""
_FAILED = {"timeout": "timeout", "error": "error", "budget": "budget", "invalid": "unparseable"}


@dataclass(frozen=True)
class PromptRun:
    """A finished (or reused) prompt run: cell counts per outcome and request counts."""

    run_id: str
    spec: PromptSpec
    reused: bool
    status: str
    n_cells: int
    n_answered: int
    abstained: dict[str, int]
    n_requests: int
    n_sent: int


@dataclass(frozen=True)
class PromptReport:
    """Result of :func:`run_prompt`: the runs (empty for a dry run) and the pre-send estimate."""

    runs: list[PromptRun]
    estimate: Estimate
    dry_run: bool


def _calls(req: Request, cached: dict[str, dict[str, Any]], replies: dict[str, Reply]) -> list[CellCall]:
    ids = cell_ids(len(req.cell_uids))
    if req.key in cached:
        return parse_reply(cached[req.key], ids)
    reply = replies[req.key]
    if reply.status == "ok":
        return parse_reply(reply.response, ids)
    return failed(len(ids), _FAILED[reply.status])  # type: ignore[arg-type]


def _write(store: Store, plan: Plan, calls: pd.DataFrame, complete: bool, t0: float) -> None:
    spec, run_id = plan.spec, plan.spec.run_id
    positive = spec.positive_class
    y = (calls["label"] == positive).to_numpy().astype(int)
    call = np.where(calls["outcome"] == "abstain", np.nan, (calls["outcome"] == positive).astype(float))
    p_sens = calls["p_sensitive"].to_numpy(dtype=float)
    prob = p_sens if positive == "sensitive" else 1.0 - p_sens
    rows = []
    for f in range(len(plan.fs.fold_names)):
        sel = (calls["fold"] == f).to_numpy()
        for metric, (v, reason) in prompt_fold_metrics(
            y[sel], call[sel], prob[sel], logprobs=spec.logprobs
        ).items():
            rows.append((run_id, f, metric, v, reason, 0, int(sel.sum())))
    metrics = pd.DataFrame(rows, columns=["run_id", "fold", "metric", "value", "reason", "n_train", "n_test"])
    preds = pd.DataFrame(
        {"run_id": run_id, "fold": calls["fold"], "cell_uid": calls["cell_uid"], "probability": prob}
    )
    outcomes = calls[
        ["fold", "cell_uid", "request_key", "cell_id", "outcome", "reason", "answer", "p_sensitive"]
    ]
    outcomes = outcomes.assign(run_id=run_id)
    params = {k: v for k, v in asdict(spec).items() if k in (
        "endpoint", "style", "template_version", "template_hash", "n_genes", "cells_per_request", "temperature",
        "max_tokens", "response_format", "logprobs")}  # fmt: skip
    row = {
        "run_id": run_id, "model": spec.model, "revision": spec.template_hash[:16], "strategy": spec.strategy,
        "head": spec.style, "head_params": json.dumps(params), "protocol": spec.protocol, "category": spec.category,
        "value": spec.value, "fold_set_id": spec.fold_set_id, "grouping": spec.grouping, "k": spec.k, "seed": spec.seed,
        "positive_class": positive, "spec": json.dumps(asdict(spec)),
        "versions": json.dumps({p: version(p) for p in ("openai", "scikit-learn", "numpy")}),
        "n_cells": len(calls), "n_excluded": 0, "status": "complete" if complete else "incomplete",
        "created_at": datetime.now(UTC).replace(tzinfo=None), "duration_s": time.perf_counter() - t0,
    }  # fmt: skip
    outcome_cols = ["run_id", *outcomes.columns[:-1]]
    write_run(store, row, metrics, preds, extra={"prompt_outcomes": (OUTCOMES_DDL, outcomes[outcome_cols])})


def _execute(
    store: Store, plan: Plan, cached: dict[str, dict[str, Any]], replies: dict[str, Reply], t0: float
) -> PromptRun:
    spec = plan.spec
    folds = plan.fs.cells.set_index("cell_uid")
    parts = []
    for req in plan.requests:
        calls = _calls(req, cached, replies)
        parts.append(pd.DataFrame({
            "cell_uid": req.cell_uids, "request_key": req.key, "cell_id": list(cell_ids(len(calls))),
            "outcome": [c.outcome for c in calls], "reason": [c.reason for c in calls],
            "answer": [c.answer for c in calls],
            "p_sensitive": np.array([np.nan if c.p_sensitive is None else c.p_sensitive for c in calls], dtype=float),
        }))  # fmt: skip
    calls = pd.concat(parts, ignore_index=True)
    calls["fold"] = folds.loc[calls["cell_uid"], "fold"].to_numpy(dtype=np.int64)
    calls["label"] = folds.loc[calls["cell_uid"], "label"].to_numpy()
    complete = all(r.key in cached or replies[r.key].status == "ok" for r in plan.requests)
    _write(store, plan, calls, complete, t0)
    abst = calls.loc[calls["outcome"] == "abstain", "reason"].value_counts().to_dict()
    sent = sum(1 for r in plan.requests if r.key in replies and replies[r.key].attempts > 0)
    return PromptRun(
        spec.run_id, spec, False, "complete" if complete else "incomplete", len(calls),
        int((calls["outcome"] != "abstain").sum()), {str(k): int(v) for k, v in abst.items()}, len(plan.requests), sent,
    )  # fmt: skip


def _reused(store: Store, spec: PromptSpec) -> PromptRun:
    df = store.query(
        "SELECT outcome, reason, COUNT(*) AS n FROM prompt_outcomes WHERE run_id = ? GROUP BY ALL",
        [spec.run_id],
    )
    abst = {str(r): int(n) for o, r, n in df.itertuples(index=False) if o == "abstain"}
    n = int(df["n"].sum())
    return PromptRun(spec.run_id, spec, True, "complete", n, n - sum(abst.values()), abst, 0, 0)


def run_prompt(
    store: Store,
    options: PromptOptions,
    client: ClientSettings,
    *,
    category: str = "dataset_id",
    values: Sequence[str] | None = None,
    where: str | None = None,
    protocol: Protocol = "pooled",
    grouping: Grouping | None = None,
    k: int = 10,
    seed: int = 0,
    positive_class: Literal["sensitive", "resistant"] = "sensitive",
    token_budget: int | None = 1_000_000,
    price_in: float = 0.15,
    price_out: float = 0.60,
    dry_run: bool = False,
    rerun: bool = False,
    sleep: Any = time.sleep,
) -> PromptReport:
    """Ask a chat model for every cell of one or all values of a category; store runs like heads.

    Parameters
    ----------
    store
        The store.
    options
        Prompt style, model and request settings (:class:`PromptOptions`).
    client
        Endpoint, API-key variable, timeout, retries, concurrency (:class:`ClientSettings`).
    category, values, where
        Which fold sets: these ``values`` of ``category`` (default ``dataset_id``), or every value
        with labelled cells, optionally only values of datasets matching the SQL filter ``where``.
    protocol, grouping, k, seed
        Fold-set key as in ``evaluate`` (same persisted folds); ``seed`` is also sent to the model.
    positive_class
        Class scored as positive.
    token_budget
        Maximum tokens this call may use (estimated before sending; actual usage while sending);
        ``None`` or 0 for no limit.
    price_in, price_out
        USD per million prompt / completion tokens for the cost estimate.
    dry_run
        Only estimate tokens and cost of the requests not yet cached; send and store nothing.
    rerun
        Ignore stored runs and cached replies: ask everything again (the cache is overwritten).
    sleep
        Back-off sleep function (tests).

    Returns
    -------
    PromptReport

    Raises
    ------
    InputError
        Bad options, an unset API key when something must be sent, an estimate over the budget,
        or a request the endpoint refuses (:class:`~classify.prompting.client.EndpointError`).
    """
    if positive_class not in ("sensitive", "resistant"):
        msg = f"positive class must be sensitive or resistant, got {positive_class!r}"
        raise InputError(msg)
    if options.cells_per_request < 1:
        msg = f"--cells-per-request must be ≥ 1, got {options.cells_per_request}"
        raise InputError(msg)
    client.check()
    t0 = time.perf_counter()
    tmpl = PromptTemplate.load(options.style, options.template_path)
    plans = plan_runs(
        store, options, tmpl, endpoint=client.endpoint, category=category, values=values, where=where,
        protocol=protocol, grouping=grouping, k=k, seed=seed, positive_class=positive_class, rerun=rerun,
    )  # fmt: skip
    all_keys = list(dict.fromkeys(r.key for p in plans for r in p.requests))
    cached = {} if rerun else lookup(store, all_keys)
    todo = {r.key: r for p in plans for r in p.requests if r.key not in cached}
    est = Estimate(
        len(all_keys), len(all_keys) - len(todo), sum(r.est[0] for r in todo.values()),
        sum(r.est[1] for r in todo.values()), price_in, price_out,
    )  # fmt: skip
    if dry_run:
        return PromptReport([], est, True)
    budget = token_budget or None
    if budget is not None and est.total_tokens > budget:
        msg = (
            f"estimated {est.total_tokens:,} tokens (~${est.cost_usd:.2f}) for {len(todo)} requests exceeds the token "
            f"budget {budget:,}; raise --token-budget or select fewer cells (see --dry-run)"
        )
        raise InputError(msg)
    replies: dict[str, Reply] = {}
    if todo:
        chat = ChatClient(client, read_api_key(client), sleep=sleep)
        meta = {
            r.key: {"endpoint": client.endpoint, "model": options.model, "template_hash": tmpl.sha256,
                    "cells_hash": cells_hash(r.cell_uids), "n_cells": len(r.cell_uids), "request": r.body}
            for r in todo.values()
        }  # fmt: skip
        writer = CacheWriter(store, meta)
        jobs = [Job(r.key, r.body, sum(r.est)) for r in todo.values()]
        try:
            for reply in chat.send_all(jobs, budget=budget, on_reply=writer.add):
                replies[reply.key] = reply
        finally:
            writer.flush()
    runs = []
    for plan in plans:
        runs.append(_reused(store, plan.spec) if plan.reused else _execute(store, plan, cached, replies, t0))
    return PromptReport(runs, est, False)
