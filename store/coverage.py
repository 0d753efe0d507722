"""Gene coverage of each (dataset, model revision): how the dataset's genes met the model's vocabulary.

The embed runner records one ``coverage`` row per dataset and revision (:func:`embedder.runner.
record_coverage`): the matched fractions of genes and of counts and, per route of
:data:`embedder.vocab.ROUTES`, the number of genes and their share of the dataset's counts —
``exact`` (the file's own spelling, as the original implementation reads it), ``alias`` (recovered
through a current, previous or alias HGNC symbol), ``crossmap`` (recovered through the Ensembl ↔
symbol map) and ``none`` (not in the vocabulary).
"""

from __future__ import annotations

from typing import Any

import click
import pandas as pd

from scdrugmap.store.catalog import Store

__all__ = ["coverage_command", "coverage_table"]

ROUTE_COLUMNS = ("exact", "alias", "crossmap", "none")


def coverage_table(store: Store, *, model: str | None = None, dataset: str | None = None) -> pd.DataFrame:
    """The catalog's coverage rows, newest revisions first.

    Parameters
    ----------
    store
        An open store.
    model, dataset
        Keep only this model / dataset id (bound parameters, never pasted into SQL).

    Returns
    -------
    pandas.DataFrame
        One row per (dataset, revision): ``dataset_id``, ``model``, ``revision``,
        ``gene_matching``, ``n_genes``, ``frac_genes``, ``frac_counts`` and, per route,
        ``genes_<route>`` (count) and ``counts_<route>`` (fraction of the dataset's counts).
        Route columns are NULL for embedders without a gene vocabulary (pca, hvg, llm) and for
        rows written before version 3 of the catalog.
    """
    routes = ", ".join(f"c.genes_{r}, c.counts_{r}" for r in ROUTE_COLUMNS)
    return store.query(
        "SELECT c.dataset_id, c.model, c.revision, c.gene_matching, c.n_genes, c.frac_genes, c.frac_counts, "
        f"{routes} FROM coverage c LEFT JOIN embeddings e USING (revision) "
        "WHERE (CAST(? AS VARCHAR) IS NULL OR c.model = ?) AND (CAST(? AS VARCHAR) IS NULL OR c.dataset_id = ?) "
        "ORDER BY c.dataset_id, c.model, e.created_at DESC NULLS LAST, c.revision",
        [model, model, dataset, dataset],
    )


def _cell(genes: Any, counts: Any) -> str:
    if pd.isna(genes):
        return "-"
    return f"{int(genes)} ({100 * float(counts):.1f}%)"


def format_coverage(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`coverage_table` as printable text columns ("genes (% of counts)" per route)."""
    out = pd.DataFrame(
        {
            "dataset": df["dataset_id"],
            "model": df["model"],
            "revision": df["revision"].str[:10],
            "matching": df["gene_matching"].fillna("-"),
            "genes": [
                f"{g:.1%}" if pd.isna(n) else f"{round(g * n)}/{int(n)}"
                for g, n in zip(df["frac_genes"], df["n_genes"], strict=True)
            ],
            "counts": [f"{c:.1%}" for c in df["frac_counts"]],
        }
    )
    for route in ROUTE_COLUMNS:
        out[route] = [_cell(g, c) for g, c in zip(df[f"genes_{route}"], df[f"counts_{route}"], strict=True)]
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", help="Only this model.")
@click.option("--dataset", help="Only this dataset id.")
@click.pass_context
def coverage_command(ctx: click.Context, model: str | None, dataset: str | None) -> None:
    """Gene coverage per dataset and model revision, by how genes matched the vocabulary.

    exact: the file's own spelling, as the original model reads it; alias: recovered through a
    current/previous/alias HGNC symbol; crossmap: through the Ensembl <-> symbol map; none: not in
    the vocabulary. Each cell: genes (share of the dataset's counts).
    """
    store = Store.open(ctx.obj["store"])
    df = coverage_table(store, model=model, dataset=dataset)
    if df.empty:
        click.echo("no coverage recorded yet: run `scdrugmap embed --model MODEL` first")
        return
    click.echo(format_coverage(df).to_string(index=False))
