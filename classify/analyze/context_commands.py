"""``scdrugmap analyze ccc`` and ``scdrugmap analyze celltypes …``: thin click shells over
:mod:`classify.analyze.ccc` and :mod:`classify.analyze.celltypes` (added to the ``analyze`` group
by :mod:`classify.analyze.commands`)."""

from __future__ import annotations

from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _store(ctx: click.Context):
    from scdrugmap.store import Store

    return Store.open(ctx.obj["store"])


def _echo_table(df, *, max_rows: int = 50) -> None:
    import pandas as pd

    if df is None or len(df) == 0:
        click.echo("(no rows)")
        return
    with pd.option_context("display.max_rows", max_rows, "display.max_columns", 30, "display.width", 180,
                           "display.float_format", "{:.4g}".format):  # fmt: skip
        click.echo(df.head(max_rows).to_string(index=False))


def _ids(st, datasets: tuple[str, ...], where: str | None) -> list[str]:
    from scdrugmap.classify.analyze.data import select_dataset_ids

    if not datasets and not where:
        raise click.UsageError("give --dataset ID (repeatable) or --where EXPR")
    return select_dataset_ids(st, datasets, where)


@click.command("ccc", context_settings=CONTEXT)
@click.option(
    "--dataset", "datasets", multiple=True, help="Dataset id (repeatable: one run per dataset, never pooled)."
)
@click.option("--where", help="SQL filter on datasets, e.g. \"tissue = 'Cell line'\".")
@click.option("--groupby", type=click.Choice(["label", "cell_type", "label+cell_type"]), default="label",
              show_default=True, help="Groups that send and receive: resistant/sensitive, cell types, or both.")  # fmt: skip
@click.option("--method", type=click.Choice(["cellphonedb", "rank_aggregate"]), default="cellphonedb",
              show_default=True, help="liana method (CellPhoneDB as scDrugAtlas, or liana's consensus ranks).")  # fmt: skip
@click.option(
    "--resource", default="consensus", show_default=True, help="liana ligand–receptor resource (bundled)."
)
@click.option("--n-perms", default=1000, show_default=True, help="Permutations of the specificity test.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--expr-prop", default=0.1, show_default=True, help="Expressed fraction needed per group and gene."
)
@click.option("--min-cells", default=5, show_default=True, help="Smallest group (cells).")
@click.option(
    "--celltype-method", default="markers", show_default=True, help="Cell-type annotation to group by."
)
@click.option("--include-unlabelled", is_flag=True, help="Unlabelled cells form the group 'unlabelled'.")
@click.option("--top", default=15, show_default=True, help="Interactions printed.")
@click.option(
    "--out", type=click.Path(path_type=Path), help="Figure folder (default <store>/analysis/figures)."
)
@click.pass_context
def ccc(ctx: click.Context, datasets, where, top, out, **kw) -> None:
    """Cell–cell communication between resistant/sensitive cells and cell types (liana; ccc_runs/ccc_results)."""
    from scdrugmap.classify.analyze.ccc import CCCSpec, run_ccc
    from scdrugmap.classify.analyze.context_plots import run_figure, top_interactions
    from scdrugmap.classify.analyze.plots import save_figure
    from scdrugmap.classify.analyze.tables import analysis_dir

    st = _store(ctx)
    for d in _ids(st, datasets, where):
        o = run_ccc(st, CCCSpec(dataset_id=d, **kw))
        larger = o.spec.method == "cellphonedb"
        kept = sorted(set(o.table["source"]) | set(o.table["target"]))
        left = [f"{g} ({n})" for g, n in o.groups.items() if g not in kept]
        click.echo(f"{o.ccc_id} {d} by {o.spec.groupby} ({o.spec.method}, {o.spec.resource}): "
                   f"{len(o.table)} interactions among {', '.join(f'{g} ({o.groups[g]})' for g in kept)}"
                   f"{'; left out (< --min-cells): ' + ', '.join(left) if left else ''}")  # fmt: skip
        if o.note:
            click.echo(f"note: {o.note}")
        sig = o.table[o.table["specificity"] <= 0.05]
        per_pair = sig.groupby(["source", "target"]).size().sort_values(ascending=False, kind="stable")
        click.echo(f"specific interactions (specificity ≤ 0.05) per sender → receiver{' (top 12)' if len(per_pair) > 12 else ''}: "
                   + ", ".join(f"{s} → {t} {n}" for (s, t), n in per_pair.head(12).items()))  # fmt: skip
        _echo_table(top_interactions(o.table, larger_is_stronger=larger, n=top).head(top))
        title, stem, fig = run_figure(o.table, ccc_id=o.ccc_id, datasets=[d], groupby=o.spec.groupby,
                                      method=o.spec.method, spec={"larger_magnitude_is_stronger": larger})  # fmt: skip
        for p in save_figure(fig, out or analysis_dir(st, "figures"), stem, title):
            click.echo(f"figure: {p}")


@click.group("celltypes", context_settings=CONTEXT)
def celltypes() -> None:
    """Cell-type context: marker-based annotation and resistant/sensitive cells per type."""


@celltypes.command("annotate", context_settings=CONTEXT)
@click.option("--dataset", "datasets", multiple=True, help="Dataset id (repeatable).")
@click.option("--where", help="SQL filter on datasets.")
@click.option("--markers", "markers_path", type=click.Path(path_type=Path),
              help="CSV cell_type,gene (default: the bundled table, see classify/analyze/data/NOTICE).")  # fmt: skip
@click.option("--method", default="markers", show_default=True, help="Name the labels are stored under.")
@click.option("--min-score", default=0.1, show_default=True, help="Best score below this → 'unassigned'.")
@click.option(
    "--min-genes", default=2, show_default=True, help="Markers a type needs in the data to be scored."
)
@click.option("--seed", default=0, show_default=True, help="Control-gene draw of scanpy's score_genes.")
@click.option(
    "--allow-scaled", is_flag=True, help="Annotate z-scored data too (scores relative to its mean)."
)
@click.pass_context
def annotate_cmd(ctx: click.Context, datasets, where, **kw) -> None:
    """Label every cell with its best-scoring marker type (table cell_types); print resistant/sensitive per type."""
    from scdrugmap.classify.analyze.celltypes import annotate_dataset, cell_type_proportions, describe

    st = _store(ctx)
    ids = _ids(st, datasets, where)
    for d in ids:
        click.echo(f"{d}: {describe(annotate_dataset(st, d, **kw))}")
    _echo_table(cell_type_proportions(st, dataset_ids=ids, method=kw["method"]), max_rows=1000)


@celltypes.command("proportions", context_settings=CONTEXT)
@click.option("--dataset", "datasets", multiple=True, help="Dataset id (repeatable; default all annotated).")
@click.option("--method", default="markers", show_default=True, help="Annotation to use.")
@click.pass_context
def proportions_cmd(ctx: click.Context, datasets, method) -> None:
    """Resistant and sensitive cells per cell type and dataset (scDrugAtlas Fig. 3g)."""
    from scdrugmap.classify.analyze.celltypes import cell_type_proportions

    df = cell_type_proportions(_store(ctx), dataset_ids=list(datasets) or None, method=method)
    if df.empty:
        raise click.ClickException(
            f"no cell types of method {method!r}; run `scdrugmap analyze celltypes annotate`"
        )
    _echo_table(df, max_rows=10_000)
