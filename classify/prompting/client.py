"""OpenAI-compatible chat-completions client: retries, back-off, concurrency, token budget, estimates.

Uses the ``openai`` package against any base URL (OpenAI, Azure-style proxies, a local llama.cpp
or vLLM server). The API key is read from an environment variable (``OPENAI_API_KEY`` unless
``api_key_env`` says otherwise) at send time only; it is never written anywhere. Responses are
kept as the server's raw JSON so they can be cached and re-parsed bit for bit. Retries are the
``openai`` client's own (``max_retries``); only its wait between tries follows
:class:`ClientSettings` (``--backoff``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

from scdrugmap.store.errors import InputError

__all__ = [
    "DEFAULT_BASE_URL",
    "ChatClient",
    "ClientSettings",
    "EndpointError",
    "Estimate",
    "Job",
    "Reply",
    "approx_tokens",
    "read_api_key",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: HTTP statuses the openai client retries with back-off (and every 5xx; besides timeouts and
#: connection errors)
RETRY_STATUS = frozenset({408, 409, 429})
CHARS_PER_TOKEN = 4.0


class EndpointError(InputError):
    """The endpoint refused a request for a reason retrying cannot fix (HTTP 400/401/403/404/422)."""


@dataclass(frozen=True)
class ClientSettings:
    """How to reach the endpoint (none of these change results, so none is in the run spec).

    Attributes
    ----------
    base_url
        OpenAI-compatible API root, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``.
    api_key_env
        Environment variable holding the API key.
    timeout_s
        Seconds per HTTP attempt.
    retries
        Extra attempts after a timeout, connection error, HTTP 408/409/429 or 5xx (the openai
        client's ``max_retries``).
    backoff_s, max_backoff_s
        Back-off before retry ``i`` (0-based) is ``min(max, backoff × 2**i)``, half of it jittered;
        a ``Retry-After`` header on 429/503 is honoured (capped at ``max_backoff_s``).
    concurrency
        Requests in flight at once.
    """

    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    concurrency: int = 4

    @property
    def endpoint(self) -> str:
        """The base URL without a trailing slash (the cache's endpoint key)."""
        return self.base_url.rstrip("/")

    def check(self) -> None:
        """Raise :class:`InputError` on impossible settings."""
        if not self.base_url.startswith(("http://", "https://")):
            msg = f"--base-url must start with http:// or https://, got {self.base_url!r}"
            raise InputError(msg)
        from urllib.parse import urlsplit

        if urlsplit(self.base_url).username is not None:
            msg = "--base-url must not contain credentials (it is stored with the run); put the key in the API key variable"
            raise InputError(msg)
        if self.timeout_s <= 0 or self.retries < 0 or self.concurrency < 1 or self.backoff_s < 0:
            msg = "need --timeout > 0, --retries ≥ 0, --concurrency ≥ 1 and a non-negative back-off"
            raise InputError(msg)


@dataclass(frozen=True)
class Job:
    """One request to send: cache key, JSON body and its estimated total tokens."""

    key: str
    body: dict[str, Any]
    est_tokens: int


@dataclass(frozen=True)
class Reply:
    """What came back for one request.

    ``status``: ``ok`` (HTTP 200 with a JSON body: cacheable), ``timeout`` (every attempt timed
    out), ``error`` (retries exhausted on 429/5xx/connection errors), ``invalid`` (HTTP 200 whose
    body is not a chat completion) or ``budget`` (not sent: the token budget was reached).
    """

    key: str
    status: Literal["ok", "timeout", "error", "invalid", "budget"]
    response: dict[str, Any] | None
    attempts: int
    latency_s: float
    error: str | None = None

    @property
    def total_tokens(self) -> int | None:
        """``usage.total_tokens`` of the response, when reported."""
        usage = (self.response or {}).get("usage") or {}
        tok = usage.get("total_tokens")
        return int(tok) if isinstance(tok, int | float) else None


@dataclass(frozen=True)
class Estimate:
    """Token and cost estimate of the requests a run would send (``~4 characters per token``)."""

    n_requests: int
    n_cached: int
    prompt_tokens: int
    completion_tokens: int
    price_in: float
    price_out: float

    @property
    def total_tokens(self) -> int:
        """Prompt + completion tokens of the requests still to send."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost_usd(self) -> float:
        """Prices are USD per million tokens."""
        return (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out) / 1e6

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(
            self.n_requests + other.n_requests,
            self.n_cached + other.n_cached,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.price_in,
            self.price_out,
        )


def approx_tokens(text: str) -> int:
    """Rough token count of ``text``: ``ceil(len / 4)`` (no tokenizer download needed)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimate_body(body: dict[str, Any], completion_tokens: int) -> tuple[int, int]:
    """``(prompt, completion)`` token estimate of one request body.

    Prompt: messages (+ 4 tokens each) and the response schema; completion: ``completion_tokens``
    capped at the body's ``max_completion_tokens``.
    """
    prompt = sum(approx_tokens(m["content"]) + 4 for m in body["messages"])
    if "response_format" in body:
        prompt += approx_tokens(json.dumps(body["response_format"]))
    return prompt, min(completion_tokens, int(body.get("max_completion_tokens") or completion_tokens))


def read_api_key(settings: ClientSettings) -> str:
    """The API key from ``settings.api_key_env``.

    Raises
    ------
    InputError
        When the variable is unset or empty (a local server without auth accepts any value).
    """
    key = os.environ.get(settings.api_key_env, "")
    if not key:
        msg = (
            f"environment variable {settings.api_key_env} is not set; export your API key there "
            "(any non-empty value for a local server without auth) or name another with --api-key-env"
        )
        raise InputError(msg)
    return key


class ChatClient:
    """Sends chat-completion requests with retries and a concurrency limit.

    Parameters
    ----------
    settings
        Endpoint and robustness settings.
    api_key
        The key (from :func:`read_api_key`); kept in memory only.
    sleep
        Sleep function (tests replace it).
    """

    def __init__(
        self, settings: ClientSettings, api_key: str, *, sleep: Callable[[float], None] = time.sleep
    ):
        import openai

        settings.check()
        self.settings = settings
        self._sleep = sleep
        self._openai = openai
        self._client = _retrying_openai(openai, self)(
            api_key=api_key,
            base_url=settings.endpoint,
            timeout=settings.timeout_s,
            max_retries=settings.retries,
        )

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        s = self.settings
        if retry_after:
            try:
                return min(s.max_backoff_s, max(0.0, float(retry_after)))
            except ValueError:
                pass
        d = min(s.max_backoff_s, s.backoff_s * 2**attempt)
        return d / 2 + random.uniform(0, d / 2)

    def send(self, job: Job) -> Reply:
        """Send one request; the openai client retries timeouts, connection errors, 408/409/429 and 5xx
        (``settings.retries`` times, back-off of :class:`ClientSettings`).

        Raises
        ------
        EndpointError
            On a non-retryable HTTP status (bad request, auth, unknown model, …).
        """
        oa = self._openai
        t0 = time.perf_counter()
        attempts = self.settings.retries + 1
        try:
            raw = self._client.chat.completions.with_raw_response.create(**job.body)
            text = raw.http_response.text
        except oa.APITimeoutError:
            status, error = "timeout", f"timed out after {self.settings.timeout_s} s"
        except oa.APIStatusError as exc:
            if not _retryable(exc.status_code):
                msg = (
                    f"the endpoint {self.settings.endpoint} refused the request (HTTP {exc.status_code}: "
                    f"{str(exc.message)[:300]}); check the API key variable {self.settings.api_key_env}, "
                    "--model, and try --response-format text or --no-logprobs if the server lacks them"
                )
                raise EndpointError(msg) from None
            status, error = "error", f"HTTP {exc.status_code}"
        except oa.APIConnectionError as exc:
            status, error = "error", f"connection error: {exc}"
        else:
            attempts = raw.retries_taken + 1
            try:
                data = json.loads(text)
            except ValueError:
                data = None
            if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
                return Reply(
                    job.key, "invalid", None, attempts, time.perf_counter() - t0, "not a chat completion"
                )
            return Reply(job.key, "ok", data, attempts, time.perf_counter() - t0)
        return Reply(job.key, status, None, attempts, time.perf_counter() - t0, error)

    def send_all(
        self, jobs: Sequence[Job], *, budget: int | None, on_reply: Callable[[Reply], None]
    ) -> list[Reply]:
        """Send ``jobs`` with at most ``concurrency`` in flight, within a token budget.

        Parameters
        ----------
        jobs
            Requests in the order to send them.
        budget
            Maximum total tokens (actual usage of answered requests, the estimate for those
            without usage or still in flight); ``None`` for no limit. Jobs that would exceed it
            are not sent and get a ``budget`` reply.
        on_reply
            Called in the calling thread with each reply as it arrives (e.g. to cache it).

        Returns
        -------
        list of Reply
            One per job, in job order.

        Raises
        ------
        EndpointError
            From :meth:`send`; requests in flight are finished (and passed to ``on_reply``) first.
        """
        replies: dict[str, Reply] = {}
        spent = 0
        pending: dict[Future[Reply], Job] = {}
        queue = list(jobs)
        stop = False
        failure: BaseException | None = None
        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            while queue or pending:
                while queue and not stop and len(pending) < self.settings.concurrency:
                    if budget is not None and spent + queue[0].est_tokens > budget:
                        stop = True
                        log.warning("token budget %d reached: %d requests not sent", budget, len(queue))
                        break
                    job = queue.pop(0)
                    spent += job.est_tokens
                    pending[pool.submit(self.send, job)] = job
                if stop or failure is not None:
                    for job in queue:
                        replies[job.key] = Reply(job.key, "budget", None, 0, 0.0, "token budget reached")
                    queue = []
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = pending.pop(fut)
                    try:
                        reply = fut.result()
                    except EndpointError as exc:
                        failure = failure or exc
                        continue
                    if reply.total_tokens is not None:
                        spent += reply.total_tokens - job.est_tokens
                    replies[job.key] = reply
                    on_reply(reply)
        if failure is not None:
            raise failure
        return [replies[j.key] for j in jobs]


def _retryable(status: int) -> bool:
    return status in RETRY_STATUS or status >= 500


def _retrying_openai(openai: Any, chat: ChatClient) -> type:
    """``openai.OpenAI`` whose built-in retry loop (``max_retries``) waits :meth:`ChatClient._delay`
    through ``chat._sleep``: the ``--backoff`` settings instead of the SDK's fixed 0.5 s × 2**i
    (≤ 8 s), a ``Retry-After`` of 0 honoured, and a sleep that tests can record. What is retried
    and when to stop stay the SDK's (it gives up on a ``Retry-After`` above two minutes).
    """

    class _OpenAI(openai.OpenAI):
        def _sleep_for_retry(self, *, retries_taken: int, response: Any = None, **_: Any) -> None:
            retry_after = response.headers.get("retry-after") if response is not None else None
            delay = chat._delay(retries_taken, retry_after)
            log.info("retry %d in %.2f s", retries_taken + 1, delay)
            chat._sleep(delay)

    return _OpenAI
