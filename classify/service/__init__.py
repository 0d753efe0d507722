"""The classifier service: a FastAPI app over a store, with an offline web page (``scdrugmap serve``).

``create_app`` is imported lazily so that :mod:`scdrugmap.classify.queries` (shared with the
report) does not pull in the web stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from scdrugmap.classify.service.app import create_app

        return create_app
    raise AttributeError(name)
