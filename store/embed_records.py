"""The catalog side of an embedding run: coverage rows, cells marked done, run counts.

Only the process that runs :func:`embedder.runner.embed_datasets` (the driver) calls these — the
catalog has a single writer, workers only write their Zarr chunks (:mod:`embedder.executor`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["mark_done", "record_coverage", "refresh_counts"]


def record_coverage(con, revision: str, dataset_id: str, model: str, cov: dict[str, Any]) -> None:
    """Write one ``coverage`` row: matched fractions and, per route, genes and share of counts.

    Parameters
    ----------
    con
        A writable catalog connection (inside the caller's transaction).
    revision, dataset_id, model
        The row's key and model name.
    cov
        :meth:`Embedder.coverage` of the dataset (route columns absent for models without a
        gene vocabulary are stored as NULL).
    """
    from scdrugmap.embedder.vocab import ROUTES

    row = {"revision": revision, "dataset_id": dataset_id, "model": model}
    row |= {"frac_genes": cov["genes"], "frac_counts": cov["counts"]}
    row |= {"gene_matching": cov.get("gene_matching"), "n_genes": cov.get("n_genes")}
    for route in ROUTES:
        row[f"genes_{route}"] = cov.get(f"genes_{route}")
        row[f"counts_{route}"] = cov.get(f"counts_{route}")
    cols = list(row)
    con.execute(
        f"INSERT OR REPLACE INTO coverage ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
        [row[c] for c in cols],
    )


def refresh_counts(con, revision: str) -> tuple[int, int]:
    """Recount a revision's selected and done rows and set its status; returns ``(selected, done)``."""
    spec = json.loads(con.execute("SELECT spec FROM embeddings WHERE revision = ?", [revision]).fetchone()[0])
    n_sel = con.execute(
        "SELECT COUNT(*) FROM cells WHERE list_contains(?, dataset_id)", [spec.get("datasets", [])]
    ).fetchone()[0]
    n_done = con.execute("SELECT COUNT(*) FROM embedded_cells WHERE revision = ?", [revision]).fetchone()[0]
    status = "complete" if n_done >= n_sel else "partial"
    con.execute(
        "UPDATE embeddings SET rows_selected = ?, rows_done = ?, status = ?, updated_at = ? WHERE revision = ?",
        [n_sel, n_done, status, datetime.now(UTC).replace(tzinfo=None), revision],
    )
    return int(n_sel), int(n_done)


def mark_done(con, revision: str, uids: np.ndarray) -> tuple[int, int]:
    """Record embedded cells of a revision (inside the caller's transaction) and recount.

    Parameters
    ----------
    con
        A writable catalog connection.
    revision
        The embedding revision.
    uids
        int64 ``(n,)`` cell_uids whose rows are written.

    Returns
    -------
    tuple
        ``(rows selected, rows done)`` after the insert.
    """
    con.register("_done", pd.DataFrame({"revision": revision, "cell_uid": np.asarray(uids, dtype=np.int64)}))
    con.execute("INSERT OR IGNORE INTO embedded_cells SELECT * FROM _done")
    con.unregister("_done")
    return refresh_counts(con, revision)
