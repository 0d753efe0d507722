"""LLM prompting baseline: zero-shot drug-response calls from a chat model (OpenAI-compatible API).

Modules: ``prompts`` (versioned templates in ``templates/``, gene ranking, request bodies),
``client`` (endpoint, retries, back-off, concurrency, token budget, estimates), ``parse`` (one
outcome per cell), ``cache`` (request/response cache table ``prompt_cache``), ``score``
(coverage, all-cell and answered-cell metrics), ``run`` (orchestration into ``eval_runs``,
``metrics``, ``predictions`` and ``prompt_outcomes``) and ``commands`` (``scdrugmap prompt``).
"""

from __future__ import annotations

from classify.prompting.client import ClientSettings
from classify.prompting.run import PromptOptions, PromptReport, PromptRun, PromptSpec, run_prompt

__all__ = ["ClientSettings", "PromptOptions", "PromptReport", "PromptRun", "PromptSpec", "run_prompt"]
