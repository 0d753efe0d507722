"""Request/response cache in the catalog (table ``prompt_cache``).

Every answered request (HTTP 200 with a chat-completion body) is stored with its full request
body and the server's raw JSON response, keyed by (endpoint, model, template hash, cell set,
request body). A later run that asks the same cells the same way reads the reply from here and
sends nothing. Timeouts and errors are not cached, so the next run asks those requests again.
The API key is never part of a request body and is never stored.

Table (created on first write with ``CREATE TABLE IF NOT EXISTS``)::

    prompt_cache(request_key VARCHAR PRIMARY KEY, endpoint, model, template_hash, cells_hash,
                 n_cells INTEGER, request JSON, response JSON, prompt_tokens INTEGER,
                 completion_tokens INTEGER, attempts INTEGER, latency_s DOUBLE, created_at TIMESTAMP)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from scdrugmap.classify.prompting.client import Reply
from scdrugmap.store.catalog import Store

__all__ = ["CACHE_DDL", "CacheWriter", "cells_hash", "lookup", "request_key", "table_exists"]

CACHE_DDL = """
CREATE TABLE IF NOT EXISTS prompt_cache (
    request_key VARCHAR PRIMARY KEY, endpoint VARCHAR, model VARCHAR, template_hash VARCHAR,
    cells_hash VARCHAR, n_cells INTEGER, request JSON, response JSON, prompt_tokens INTEGER,
    completion_tokens INTEGER, attempts INTEGER, latency_s DOUBLE, created_at TIMESTAMP
)
"""
_COLUMNS = (
    "request_key", "endpoint", "model", "template_hash", "cells_hash", "n_cells", "request", "response",
    "prompt_tokens", "completion_tokens", "attempts", "latency_s", "created_at",
)  # fmt: skip


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def cells_hash(cell_uids: Sequence[int] | np.ndarray) -> str:
    """16 hex of the SHA-256 of the cells' ``cell_uid``s (int64, in request order)."""
    return hashlib.sha256(np.asarray(cell_uids, dtype=np.int64).tobytes()).hexdigest()[:16]


def request_key(*, endpoint: str, model: str, template_hash: str, cells: str, body: dict[str, Any]) -> str:
    """Cache key: SHA-256 over endpoint, model, template hash, cell set and the request body."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return _sha(json.dumps([endpoint, model, template_hash, cells, _sha(canon)]))


def table_exists(store: Store, table: str) -> bool:
    """Whether the catalog has ``table`` (the prompting tables appear on first write)."""
    df = store.query("SELECT COUNT(*) AS n FROM duckdb_tables() WHERE table_name = ?", [table])
    return bool(df["n"].iloc[0])


def lookup(store: Store, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Cached responses of these request keys: ``{key: response JSON}`` (absent keys left out)."""
    if not keys or not table_exists(store, "prompt_cache"):
        return {}
    df = store.query(
        "SELECT request_key, response FROM prompt_cache WHERE request_key IN (SELECT UNNEST(?::VARCHAR[]))",
        [list(keys)],
    )
    return {k: json.loads(r) for k, r in zip(df["request_key"], df["response"], strict=True)}


@dataclass
class CacheWriter:
    """Buffers answered replies and writes them in batches (call :meth:`flush` at the end).

    Parameters
    ----------
    store
        The store.
    meta
        ``{request_key: dict(endpoint, model, template_hash, cells_hash, n_cells, request)}``.
    batch
        Replies per write transaction.
    """

    store: Store
    meta: dict[str, dict[str, Any]]
    batch: int = 32
    _rows: list[list[Any]] = field(default_factory=list)
    n_written: int = 0

    def add(self, reply: Reply) -> None:
        """Queue ``reply`` if it is cacheable (``status == 'ok'``)."""
        if reply.status != "ok" or reply.response is None:
            return
        m = self.meta[reply.key]
        usage = reply.response.get("usage") or {}
        row = {
            "request_key": reply.key,
            **m,
            "request": json.dumps(m["request"], sort_keys=True),
            "response": json.dumps(reply.response, sort_keys=True),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "attempts": reply.attempts,
            "latency_s": reply.latency_s,
            "created_at": datetime.now(UTC).replace(tzinfo=None),
        }
        self._rows.append([row[c] for c in _COLUMNS])
        if len(self._rows) >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Write queued rows (replacing older entries with the same key)."""
        if not self._rows:
            return
        with self.store.transaction() as con:
            con.execute(CACHE_DDL)
            con.executemany(
                f"INSERT OR REPLACE INTO prompt_cache ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})",
                self._rows,
            )
        self.n_written += len(self._rows)
        self._rows = []
