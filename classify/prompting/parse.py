"""Turn one chat-completion response into exactly one outcome per cell of the request.

Outcomes: ``sensitive``, ``resistant`` or ``abstain`` with a reason:

- ``refused``: the message has a ``refusal``, ``finish_reason`` is ``content_filter``, or no cell
  could be read and the text reads as a refusal ("I'm sorry, I can't …");
- ``unparseable``: the reply cannot be read (malformed or truncated JSON, prose, a body that is
  not a chat completion), or the cell's answer is neither sensitive nor resistant;
- ``missing``: the reply was read but has no answer for this cell id;
- ``timeout`` / ``error`` / ``budget``: the request timed out on every attempt, failed with
  429/5xx/connection errors after every retry, or was not sent because the token budget ran out.

Accepted answer formats, tried in this order: scDrugMap's ``{res:1,0,…}`` (positional, 1 =
sensitive); a JSON object (optionally inside a Markdown code fence or after prose) mapping cell
ids to answers, at the top level or under ``"answers"``, or a list of ``{"id": …, "answer": …}``
objects; and, for replies that are not JSON, the documented text format of one line per cell,
``C1: sensitive``. Answers may be ``sensitive``/``resistant`` or ``1``/``0`` (any case).

When the response carries token log-probabilities, ``p_sensitive`` is read at the first token of
each cell's answer: the probability mass of the top alternatives that spell the start of a
sensitive answer, over that of sensitive + resistant answers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["REASONS", "CellCall", "failed", "parse_reply"]

Outcome = Literal["sensitive", "resistant", "abstain"]
Reason = Literal["unparseable", "missing", "refused", "timeout", "error", "budget"]
REASONS: tuple[str, ...] = ("unparseable", "missing", "refused", "timeout", "error", "budget")

_WORDS = {"sensitive": ("sensitive", "1"), "resistant": ("resistant", "0")}
_REFUSAL = re.compile(
    r"\b(I'?m sorry|I am sorry|I can(?:no|')t|I'?m (?:not able|unable)|I am (?:not able|unable)|I (?:won'?t|will not)"
    r"|unable to (?:help|assist|provide|comply|determine)|as an AI)\b",
    re.IGNORECASE,
)
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_RES = re.compile(r"\{\s*res\s*:\s*\[?\s*([01](?:\s*,\s*[01])*)\s*\]?\s*\}")
_LINE = re.compile(r"^[\s\-*•>]*[\"'*]*(C\d+)[\"'*]*\s*[:=\-–]\s*[\"'*]*([A-Za-z01]+)", re.MULTILINE)
_STRIP = " \t\n\"'`*,.:;{}[]"


@dataclass(frozen=True)
class CellCall:
    """The outcome for one cell.

    Attributes
    ----------
    outcome
        ``sensitive``, ``resistant`` or ``abstain``.
    reason
        Why the cell abstained (``None`` when answered).
    answer
        The cell's answer as written in the reply (``None`` when absent).
    p_sensitive
        Probability of ``sensitive`` from log-probabilities, ``None`` when unavailable.
    """

    outcome: Outcome
    reason: Reason | None = None
    answer: str | None = None
    p_sensitive: float | None = None


def failed(n: int, reason: Reason) -> list[CellCall]:
    """``n`` abstentions with ``reason`` (a request that produced no usable reply)."""
    return [CellCall("abstain", reason) for _ in range(n)]


def _label(value: Any) -> Literal["sensitive", "resistant"] | None:
    v = str(value).strip(_STRIP).lower()
    for cls, words in _WORDS.items():
        if v in words:
            return cls  # type: ignore[return-value]
    return None


def _value_offsets(text: str, ids: Sequence[str], base: int) -> dict[str, int]:
    """Character offset of each id's value (``"C1": "<here>``) at or after ``base``."""
    out = {}
    for i in ids:
        m = re.compile(rf'"{re.escape(i)}"\s*:\s*"?').search(text, base)
        if m:
            out[i] = m.end()
    return out


def _from_json(
    data: Any, text: str, start: int, ids: Sequence[str]
) -> dict[str, tuple[Any, int | None]] | None:
    if isinstance(data, dict) and isinstance(data.get("answers"), dict | list):
        base = text.rfind('"answers"')
        return _from_json(data["answers"], text, max(base, start), ids)
    if isinstance(data, dict) and set(data) & set(ids):
        offsets = _value_offsets(text, ids, start)
        return {k: (v, offsets.get(k)) for k, v in data.items() if k in ids}
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        out: dict[str, tuple[Any, int | None]] = {}
        for obj in data:
            cid = obj.get("id", obj.get("cell", obj.get("cell_id")))
            val = next(
                (obj[k] for k in ("answer", "response", "label", "prediction", "call") if k in obj), None
            )
            if cid is not None and str(cid) in ids and val is not None:
                out[str(cid)] = (val, None)
        return out or None
    return None


def _extract(content: str, ids: Sequence[str]) -> dict[str, tuple[Any, int | None]] | None:
    """``{id: (raw answer, char offset of the answer or None)}``; ``None`` if unreadable."""
    fence = _FENCE.search(content)
    start, end = (fence.start(1), fence.end(1)) if fence else (0, len(content))
    body = content[start:end]
    res = _RES.search(body)
    if res:
        digits = [(m.group(), start + res.start(1) + m.start()) for m in re.finditer(r"[01]", res.group(1))]
        if len(digits) != len(ids):
            return None
        return {i: d for i, d in zip(ids, digits, strict=True)}
    lo, hi = body.find("{"), body.rfind("}")
    list_lo = body.find("[")
    if 0 <= list_lo < lo or lo < 0 <= list_lo:
        lo, hi = list_lo, body.rfind("]")
    if lo >= 0 and hi > lo:
        try:
            data = json.loads(body[lo : hi + 1])
        except ValueError:
            data = None
        if data is not None:
            return _from_json(data, content, start + lo, ids)
    if fence or body.lstrip().startswith(("{", "[")):
        return None
    found = {m.group(1): (m.group(2), start + m.start(2)) for m in _LINE.finditer(body) if m.group(1) in ids}
    return found or None


def _token_p_sensitive(logprobs: Any, content: str, offset: int) -> float | None:
    """P(sensitive) at the token that covers character ``offset`` of the reply."""
    tokens = (logprobs or {}).get("content") if isinstance(logprobs, dict) else None
    if not tokens:
        return None
    pos = 0
    for tok in tokens:
        text = str(tok.get("token", ""))
        if pos <= offset < pos + len(text):
            alts = list(tok.get("top_logprobs") or [])
            if not any(a.get("token") == text for a in alts):
                alts.append({"token": text, "logprob": tok.get("logprob")})
            mass = {"sensitive": 0.0, "resistant": 0.0}
            for a in alts:
                t = str(a.get("token", "")).strip(_STRIP).lower()
                lp = a.get("logprob")
                if not t or not isinstance(lp, int | float):
                    continue
                for cls, words in _WORDS.items():
                    if any(w.startswith(t) or t.startswith(w) for w in words):
                        mass[cls] += math.exp(lp)
            total = mass["sensitive"] + mass["resistant"]
            return mass["sensitive"] / total if total > 0 else None
        pos += len(text)
    return None


def parse_reply(response: dict[str, Any] | None, ids: Sequence[str]) -> list[CellCall]:
    """One :class:`CellCall` per id, in ``ids`` order.

    Parameters
    ----------
    response
        The chat-completion JSON (``choices[0].message``, optional ``logprobs``); ``None`` or a
        body without choices makes every cell ``unparseable``.
    ids
        The cell ids of the request (``C1 … Cn``).
    """
    try:
        choice = response["choices"][0]  # type: ignore[index]
        message = choice["message"]
    except (TypeError, KeyError, IndexError):
        return failed(len(ids), "unparseable")
    content = message.get("content") or ""
    if not isinstance(content, str):
        content = json.dumps(content)
    if message.get("refusal") or choice.get("finish_reason") == "content_filter":
        return failed(len(ids), "refused")
    found = _extract(content, ids)
    if not found or all(_label(v) is None for v, _ in found.values()):
        if _REFUSAL.search(content):
            return failed(len(ids), "refused")
        if not found:
            return failed(len(ids), "unparseable")
    calls = []
    for i in ids:
        if i not in found:
            calls.append(CellCall("abstain", "missing"))
            continue
        value, offset = found[i]
        label = _label(value)
        if label is None:
            calls.append(CellCall("abstain", "unparseable", str(value)))
            continue
        p = _token_p_sensitive(choice.get("logprobs"), content, offset) if offset is not None else None
        calls.append(CellCall(label, None, str(value), p))
    return calls
