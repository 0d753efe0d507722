"""Planning a prompt run: which fold sets, the run spec, and one request per group of cells.

Requests group ``cells_per_request`` cells of one dataset (ordered by ``cell_uid``; the last
request of a dataset may be smaller — nothing is dropped), so they do not depend on the fold set
and pooled and cross-data runs over the same cells share them through the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from scdrugmap.classify.folds import CATEGORIES, FoldSet, Grouping, Protocol, category_values, get_fold_set
from scdrugmap.classify.prompting.cache import cells_hash, request_key
from scdrugmap.classify.prompting.client import estimate_body
from scdrugmap.classify.prompting.prompts import (
    PromptTemplate,
    ResponseFormat,
    describe_source,
    request_body,
    top_genes,
)
from scdrugmap.classify.runs import completed_run
from scdrugmap.embedder.base import spec_hash
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError

__all__ = ["Plan", "PromptOptions", "PromptSpec", "Request", "plan_runs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptOptions:
    """What is asked and how (all of it is in the run spec).

    Attributes
    ----------
    style
        ``top10``, ``top100`` or ``cot`` (a bundled template), or any name with ``template_path``.
    model
        Chat model name as the endpoint knows it.
    cells_per_request
        Cells per request (scDrugMap: 10).
    temperature, seed
        Sampling settings sent with every request (``seed`` is also the fold seed).
    max_tokens
        ``max_completion_tokens`` per request; ``None``: the template's ``64 + per-cell × cells``.
    response_format
        ``json_schema`` (strict schema of the answer object), ``json_object`` or ``text``.
    logprobs
        Ask for token log-probabilities (``top_logprobs = 5``): probabilities, AUROC and AUPRC.
    template_path
        A template file to use instead of the bundled one.
    """

    style: str = "top10"
    model: str = "gpt-4o-mini"
    cells_per_request: int = 10
    temperature: float = 0.0
    max_tokens: int | None = None
    response_format: ResponseFormat = "json_schema"
    logprobs: bool = True
    template_path: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """Everything that determines a prompt run's results (hashed into ``run_id``)."""

    model: str
    endpoint: str
    strategy: Literal["prompt"]
    style: str
    template_version: int
    template_hash: str
    n_genes: int
    cells_per_request: int
    temperature: float
    max_tokens: int | None
    response_format: str
    logprobs: bool
    protocol: Protocol
    category: str
    value: str
    fold_set_id: str
    grouping: str
    k: int
    seed: int
    positive_class: Literal["sensitive", "resistant"]

    @property
    def run_id(self) -> str:
        """``run-`` + 16 hex of the spec hash."""
        return "run-" + spec_hash(asdict(self))


@dataclass
class Request:
    """One chat request: cache key, dataset, its cells (``cell_uid`` order), body, (prompt, completion) estimate."""

    key: str
    dataset_id: str
    cell_uids: np.ndarray
    body: dict[str, Any]
    est: tuple[int, int]


@dataclass
class Plan:
    """A run to make (or reuse) and its requests."""

    spec: PromptSpec
    fs: FoldSet
    requests: list[Request] = field(default_factory=list)
    reused: bool = False


def _values(store: Store, category: str, values: Sequence[str] | None, where: str | None) -> list[str]:
    if category not in CATEGORIES:
        msg = f"unknown category {category!r}; choose one of: {', '.join(CATEGORIES)}"
        raise InputError(msg)
    if values:
        return [str(v) for v in dict.fromkeys(values)]
    values = category_values(store, category)
    if where:
        keep = set(store.datasets(where)[category].dropna().astype(str))
        values = [v for v in values if v in keep]
    if not values:
        msg = f"no labelled datasets selected for {category!r}" + (f" with {where!r}" if where else "")
        raise InputError(msg)
    return values


def _requests(
    store: Store, fs: FoldSet, tmpl: PromptTemplate, spec: PromptSpec, opts: PromptOptions
) -> list[Request]:
    cells = store.query(
        "SELECT cell_uid, dataset_id, obs_name FROM cells WHERE cell_uid IN (SELECT UNNEST(?::BIGINT[])) "
        "ORDER BY dataset_id, cell_uid",
        [fs.cells["cell_uid"].astype(np.int64).tolist()],
    )
    meta = store.datasets().set_index("dataset_id", drop=False)
    out = []
    for ds, group in cells.groupby("dataset_id", sort=True):
        if not bool(meta.loc[ds, "has_expression"]):
            msg = f"dataset {ds!r} has no expression matrix (embeddings only); the prompting baseline needs genes"
            raise InputError(msg)
        source = describe_source(meta.loc[ds].to_dict())
        genes = top_genes(store.dataset_file(str(ds)), group["obs_name"].tolist(), tmpl.n_genes)
        uids = group["cell_uid"].to_numpy(dtype=np.int64)
        for lo in range(0, len(uids), opts.cells_per_request):
            chunk = uids[lo : lo + opts.cells_per_request]
            body = request_body(
                tmpl, model=opts.model, source=source, genes=genes[lo : lo + len(chunk)],
                temperature=opts.temperature, seed=spec.seed, max_tokens=opts.max_tokens,
                response_format=opts.response_format, logprobs=opts.logprobs,
            )  # fmt: skip
            key = request_key(
                endpoint=spec.endpoint,
                model=opts.model,
                template_hash=tmpl.sha256,
                cells=cells_hash(chunk),
                body=body,
            )
            est = estimate_body(body, 10 + tmpl.completion_tokens_per_cell * len(chunk))
            out.append(Request(key, str(ds), chunk, body, est))
    return out


def plan_runs(
    store: Store,
    options: PromptOptions,
    tmpl: PromptTemplate,
    *,
    endpoint: str,
    category: str,
    values: Sequence[str] | None,
    where: str | None,
    protocol: Protocol,
    grouping: Grouping | None,
    k: int,
    seed: int,
    positive_class: Literal["sensitive", "resistant"],
    rerun: bool,
) -> list[Plan]:
    """One :class:`Plan` per category value (values whose folds cannot be made are skipped with a
    warning unless given explicitly); runs already complete in the catalog are marked reused.

    Raises
    ------
    InputError
        Unknown category, nothing selected, or an explicit value whose folds cannot be made.
    """
    plans: list[Plan] = []
    chosen = _values(store, category, values, where)
    for v in chosen:
        try:
            fs = get_fold_set(
                store, protocol=protocol, category=category, value=v, grouping=grouping, k=k, seed=seed
            )
        except InputError as exc:
            if values:
                raise
            log.warning("skipping %s = %r: %s", category, v, exc)
            continue
        spec = PromptSpec(
            options.model, endpoint, "prompt", tmpl.style, tmpl.version, tmpl.sha256, tmpl.n_genes,
            options.cells_per_request, float(options.temperature), options.max_tokens, options.response_format,
            bool(options.logprobs), protocol, category, str(v), fs.fold_set_id, fs.spec.grouping, fs.spec.k, seed,
            positive_class,
        )  # fmt: skip
        plan = Plan(spec, fs)
        plan.reused = completed_run(store, spec.run_id) is not None and not rerun
        if not plan.reused:
            plan.requests = _requests(store, fs, tmpl, spec, options)
        plans.append(plan)
    if not plans:
        msg = f"no value of {category!r} could be split with protocol {protocol!r} (see warnings)"
        raise InputError(msg)
    return plans
