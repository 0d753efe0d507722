"""LLM prompting baseline: zero-shot drug-response calls from a chat model (OpenAI-compatible API).

Modules: ``prompts`` (versioned templates in ``templates/``, gene ranking, request bodies),
``client`` (endpoint, retries, back-off, concurrency, token budget, estimates), ``parse`` (one
outcome per cell), ``cache`` (request/response cache table ``prompt_cache``), ``score``
(coverage, all-cell and answered-cell metrics), ``run`` (orchestration into ``eval_runs``,
``metrics``, ``predictions`` and ``prompt_outcomes``) and ``commands`` (``scdrugmap prompt``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["ClientSettings", "PromptOptions", "PromptReport", "PromptRun", "PromptSpec", "run_prompt"]


def __getattr__(name: str) -> Any:  # lazy: `scdrugmap --help` must not import the prompting stack
    if name in __all__:
        module = "client" if name == "ClientSettings" else "run"
        return getattr(import_module(f"scdrugmap.classify.prompting.{module}"), name)
    msg = f"module 'scdrugmap.classify.prompting' has no attribute {name!r}"
    raise AttributeError(msg)
