"""``scdrugmap prompt``: zero-shot drug-response calls from a chat model (thin click shell)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from scdrugmap.classify.prompting.client import DEFAULT_BASE_URL
from scdrugmap.classify.prompting.prompts import STYLES

__all__ = ["prompt"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
SHOWN = ("coverage", "accuracy", "accuracy_answered", "f1", "f1_answered", "auroc", "auroc_answered")


def _summary(store: Any, run_ids: list[str]) -> None:
    import pandas as pd

    df = store.query(
        "SELECT r.run_id, r.head AS style, r.protocol, r.category, r.value, m.metric, AVG(m.value) AS mean "
        "FROM eval_runs r JOIN metrics m USING (run_id) WHERE list_contains(?, r.run_id) GROUP BY ALL",
        [run_ids],
    )
    if df.empty:
        return
    df["mean"] = ["NULL" if v != v else f"{v:.3f}" for v in df["mean"]]
    wide = df.pivot_table(
        index=["style", "protocol", "category", "value"], columns="metric", values="mean", aggfunc="first"
    ).reset_index()
    cols = ["style", "protocol", "category", "value", *[m for m in SHOWN if m in wide.columns]]
    with pd.option_context("display.max_columns", 30, "display.width", 160):
        click.echo(wide[cols].to_string(index=False))


@click.command("prompt", context_settings=CONTEXT)
@click.option(
    "--dataset", "datasets", multiple=True, help="Dataset id (repeatable): --category dataset_id --value ID."
)
@click.option("--where", help="SQL filter on datasets: run every category value of the matching datasets.")
@click.option(
    "--category", default="dataset_id", show_default=True, help="Fold-set category (tissue, drug_class, …)."
)
@click.option("--value", "values", multiple=True, help="Category value (repeatable; default every value).")
@click.option(
    "--style", type=click.Choice(STYLES), default="top10", show_default=True, help="Prompt template."
)
@click.option(
    "--template", type=click.Path(path_type=Path), help="A template file (TOML) instead of the bundled one."
)
@click.option("--show-template", is_flag=True, help="Print the template's messages and hash, then exit.")
@click.option("--cells-per-request", default=10, show_default=True, help="Cells asked per request.")
@click.option("--model", default="gpt-4o-mini", show_default=True, help="Chat model name at the endpoint.")
@click.option("--base-url", envvar="OPENAI_BASE_URL", default=DEFAULT_BASE_URL, show_default=True,
              help="OpenAI-compatible API root (env OPENAI_BASE_URL), e.g. http://localhost:8000/v1.")  # fmt: skip
@click.option(
    "--api-key-env", default="OPENAI_API_KEY", show_default=True, help="Env variable with the API key."
)
@click.option("--protocol", type=click.Choice(["pooled", "cross"]), default="pooled", show_default=True)
@click.option(
    "--group", "grouping", type=click.Choice(["sample", "cell"]), help="Pooled fold unit (as evaluate)."
)
@click.option("--k", default=10, show_default=True, help="Pooled folds.")
@click.option("--seed", default=0, show_default=True, help="Fold seed; also sent to the model.")
@click.option(
    "--positive", type=click.Choice(["sensitive", "resistant"]), default="sensitive", show_default=True
)
@click.option("--temperature", default=0.0, show_default=True)
@click.option(
    "--max-tokens", type=int, help="max_completion_tokens per request (default: from the template)."
)
@click.option("--response-format", type=click.Choice(["json_schema", "json_object", "text"]), default="json_schema",
              show_default=True, help="Structured JSON output where the endpoint supports it, else text.")  # fmt: skip
@click.option("--logprobs/--no-logprobs", default=True, show_default=True,
              help="Ask for log-probabilities (needed for probabilities, AUROC, AUPRC).")  # fmt: skip
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, help="Seconds per HTTP attempt.")
@click.option("--retries", default=4, show_default=True, help="Retries on timeouts, 429 and 5xx.")
@click.option(
    "--backoff", "backoff_s", default=1.0, show_default=True, help="First back-off in seconds (doubles)."
)
@click.option("--concurrency", default=4, show_default=True, help="Requests in flight at once.")
@click.option(
    "--token-budget", default=1_000_000, show_default=True, help="Max tokens for this command (0: none)."
)
@click.option("--price-in", default=0.15, show_default=True, help="USD per 1M prompt tokens (estimate).")
@click.option("--price-out", default=0.60, show_default=True, help="USD per 1M completion tokens (estimate).")
@click.option("--dry-run", is_flag=True, help="Print estimated tokens and cost; send nothing.")
@click.option("--rerun", is_flag=True, help="Ignore stored runs and cached replies; ask again.")
@click.pass_context
def prompt(ctx: click.Context, datasets: tuple[str, ...], values: tuple[str, ...], category: str,
           template: Path | None, show_template: bool, **kw: Any) -> None:  # fmt: skip
    """Zero-shot sensitive/resistant calls from a chat model over an OpenAI-compatible API.

    Each cell is shown as its most highly expressed genes plus its data source, --cells-per-request
    cells per request; cells come from the persisted folds (every cell in its test fold) and the run
    is stored like a head run (strategy 'prompt'). Replies are cached in the store: a rerun sends nothing.
    """
    from scdrugmap.classify.prompting.client import ClientSettings
    from scdrugmap.classify.prompting.prompts import PromptTemplate
    from scdrugmap.classify.prompting.run import PromptOptions, run_prompt
    from scdrugmap.store import Store

    if show_template:
        t = PromptTemplate.load(kw["style"], template)
        click.echo(
            f"# {t.style} v{t.version} sha256 {t.sha256}\n# --- system\n{t.system}\n# --- user\n{t.user}"
        )
        return
    if datasets:
        if category != "dataset_id" or values:
            raise click.UsageError("--dataset cannot be combined with --category/--value")
        values = datasets
    options = PromptOptions(
        style=kw.pop("style"), model=kw.pop("model"), cells_per_request=kw.pop("cells_per_request"),
        temperature=kw.pop("temperature"), max_tokens=kw.pop("max_tokens"),
        response_format=kw.pop("response_format"), logprobs=kw.pop("logprobs"),
        template_path=str(template) if template else None,
    )  # fmt: skip
    client = ClientSettings(
        base_url=kw.pop("base_url"), api_key_env=kw.pop("api_key_env"), timeout_s=kw.pop("timeout_s"),
        retries=kw.pop("retries"), backoff_s=kw.pop("backoff_s"), concurrency=kw.pop("concurrency"),
    )  # fmt: skip
    st = Store.open(ctx.obj["store"])
    report = run_prompt(st, options, client, category=category, values=list(values) or None,
                        positive_class=kw.pop("positive"), **kw)  # fmt: skip
    e = report.estimate
    line = (
        f"{e.n_requests} requests ({e.n_cached} cached), {e.n_requests - e.n_cached} to send: ~{e.prompt_tokens:,} "
        f"prompt + ~{e.completion_tokens:,} completion tokens = ~{e.total_tokens:,} tokens, "
        f"~${e.cost_usd:.4f} at ${e.price_in}/${e.price_out} per 1M tokens ({options.model})"
    )
    if report.dry_run:
        click.echo(f"dry run: {line}; token budget {kw['token_budget'] or 'none'}. Nothing was sent.")
        return
    click.echo(f"estimate: {line}")
    for r in report.runs:
        abst = ", ".join(f"{k} {v}" for k, v in sorted(r.abstained.items())) or "none"
        click.echo(
            f"{r.run_id} {r.spec.category}={r.spec.value!r}: {r.n_cells} cells, {r.n_answered} answered "
            f"(abstained: {abst}); {r.n_requests} requests, {r.n_sent} sent; {r.status}"
            f"{' (from catalog)' if r.reused else ''}"
        )
    _summary(st, [r.run_id for r in report.runs])
