"""``scdrugmap recommend`` (loaded lazily by ``cli``; logic in :mod:`classify.recommend`)."""

from __future__ import annotations

import click

__all__ = ["recommend_command"]


@click.command(
    "recommend", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.option("--category", help="Only this category (tissue, drug, cancer_type, …); default all.")
@click.option(
    "--scenario",
    type=click.Choice(["pooled", "cross", "external", "few-shot"]),
    help="Only this scenario (protocol); default all.",
)
@click.option(
    "--metric", default="auroc", show_default=True, help="Metric to rank by (auroc, auprc, f1, mcc, …)."
)
@click.option("--min-seeds", default=3, show_default=True, help="Fewest seeds the best model needs.")
@click.option("--candidates", "show_all", is_flag=True, help="Also list every candidate with its interval.")
@click.pass_context
def recommend_command(
    ctx: click.Context,
    category: str | None,
    scenario: str | None,
    metric: str,
    min_seeds: int,
    show_all: bool,
) -> None:
    """Recommend a model/head per category value and scenario from the stored runs, with the evidence."""
    import pandas as pd

    from scdrugmap.classify.recommend import candidates, format_recommendation, recommend
    from scdrugmap.store.shell import open_store

    st = open_store(ctx)
    click.echo(format_recommendation(recommend(st, category=category, scenario=scenario, metric=metric,
                                               min_seeds=min_seeds)))  # fmt: skip
    if show_all:
        cand = candidates(st, category=category, scenario=scenario, metric=metric)
        if not cand.empty:
            cols = ["value", "scenario", "rank", "model", "head", "strategy", "mean", "ci_low", "ci_high",
                    "interval_over", "n_seeds", "baseline", "degenerate"]  # fmt: skip
            with pd.option_context("display.max_rows", 1000, "display.width", 250, "display.precision", 3):
                click.echo("\nCandidates:\n" + cand[cols].to_string(index=False))
