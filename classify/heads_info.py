"""Which trained heads can score a new file, and why not; the default head of the Predict tab.

A head can predict a new file only when its embedding can be computed for new cells:

- ``strategy`` frozen or LoRA (prompt runs and predict records are not heads);
- not an imported embedding (``import-embeddings``: there is no embedder to apply);
- not a transductive correction (Harmony): the corrected space covers only the cells it was
  fitted on;
- its model checkpoint (foundation models) is present on this machine;
- a head kind that is saved without pickle (not ``rf``).

The default head is the predictable one with the highest mean cross-validated AUROC.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scdrugmap.store.catalog import Store

__all__ = ["annotate_heads", "unpredictable_reason"]


def unpredictable_reason(head: dict[str, Any], spec: dict[str, Any] | None) -> str | None:
    """Why a head (a ``/models`` row) cannot score a new file, or None when it can."""
    if head.get("strategy") not in ("frozen", "lora"):
        return f"{head.get('strategy')} runs have no head to apply"
    if spec is None:
        return "its embedding revision is not in the store"
    if "imported_from" in spec:
        return "imported embedding: there is no embedder to compute it for new cells"
    if "corrected_from" in spec:
        return "transductive (Harmony-corrected) embedding: new cells cannot be placed in it; use the uncorrected model"
    ckpt = spec.get("checkpoint")
    if ckpt and not Path(str(ckpt)).exists():
        return f"the model checkpoint {ckpt} is not on this machine"
    if head.get("head") == "rf":
        return "random-forest heads cannot be saved without pickle"
    return None


def annotate_heads(store: Store, heads: list[dict[str, Any]]) -> str | None:
    """Set ``predictable``, ``not_predictable_reason`` and ``default`` on each head; return the default run id."""
    specs = store.query("SELECT revision, spec FROM embeddings")
    by_rev = {
        str(r): json.loads(s) if s else {} for r, s in zip(specs["revision"], specs["spec"], strict=True)
    }
    for h in heads:
        reason = unpredictable_reason(h, by_rev.get(str(h.get("revision"))))
        h["predictable"] = reason is None
        h["not_predictable_reason"] = reason
        h["default"] = False
    ok = [h for h in heads if h["predictable"]]
    if not ok:
        return None

    def auroc(h: dict[str, Any]) -> float:
        v = (h.get("metrics") or {}).get("auroc")
        return float(v) if v is not None else -1.0

    best = max(ok, key=auroc)
    best["default"] = True
    return str(best["run_id"])
