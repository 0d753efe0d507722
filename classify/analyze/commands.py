"""``scdrugmap analyze …`` and ``scdrugmap genesets …``: thin click shells over classify.analyze."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from scdrugmap.classify.analyze.context_commands import ccc, celltypes

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
_LABELS_HELP = "truth, or run:RUN_ID for a run's predicted labels (probability ≥ 0.5 → its positive class)."


def _store(ctx: click.Context):
    from scdrugmap.store import Store

    return Store.open(ctx.obj["store"])


def _echo_table(df, *, max_rows: int = 50, floatfmt: str = "{:.4g}") -> None:
    import pandas as pd

    if df is None or len(df) == 0:
        click.echo("(no rows)")
        return
    with pd.option_context("display.max_rows", max_rows, "display.max_columns", 30, "display.width", 180,
                           "display.float_format", floatfmt.format):  # fmt: skip
        click.echo(df.head(max_rows).to_string(index=False))


def _figures(paths) -> None:
    for p in paths:
        click.echo(f"figure: {p}")


def _selection(st, datasets: tuple[str, ...], where: str | None) -> list[str]:
    from scdrugmap.classify.analyze.data import select_dataset_ids

    if not datasets and not where:
        raise click.UsageError("give --dataset ID (repeatable) or --where EXPR")
    return select_dataset_ids(st, datasets, where)


_dataset_opts = [
    click.option("--dataset", "datasets", multiple=True, help="Dataset id (repeatable: pooled, stratified)."),
    click.option("--where", help="SQL filter on datasets, e.g. \"tissue = 'Cell line'\"."),
]
_out_opt = click.option("--out", "out", type=click.Path(path_type=Path), help="Report folder for figures "
                        "(default <store>/analysis/figures).")  # fmt: skip


def _apply(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


@click.group(context_settings=CONTEXT)
def analyze() -> None:
    """Biology views: DE, enrichment, biomarkers, separation, pseudotime, genes, Harmony, confidence, cell types, CCC."""


analyze.add_command(ccc)
analyze.add_command(celltypes)


@analyze.command(context_settings=CONTEXT)
@_apply(_dataset_opts)
@click.option("--labels", default="truth", show_default=True, help=_LABELS_HELP)
@click.option("--method", type=click.Choice(["both", "wilcoxon", "pseudobulk"]), default="both", show_default=True,
              help="Cell-level Wilcoxon and/or pseudobulk per sample (both: pseudobulk when samples allow).")  # fmt: skip
@click.option("--alpha", default=0.05, show_default=True, help="BH-adjusted p threshold.")
@click.option("--min-log2fc", default=0.25, show_default=True, help="|log2FC| threshold for 'significant'.")
@click.option("--min-cells", default=10, show_default=True, help="Smallest pseudo-sample (cells per sample).")
@click.option("--top", default=15, show_default=True, help="Rows printed per table.")
@click.option("--csv", "csv_dir", type=click.Path(path_type=Path), help="Also write each table as CSV here.")
@_out_opt
@click.pass_context
def de(ctx: click.Context, datasets, where, labels, method, top, csv_dir, out, **kw: Any) -> None:
    """Differential expression, resistant vs sensitive (tables de_runs/de_results; volcano plots)."""
    from scdrugmap.classify.analyze.de_run import run_de

    st = _store(ctx)
    ids = _selection(st, datasets, where)
    methods = None if method == "both" else [method]
    for o in run_de(st, ids, labels=labels, methods=methods, figures_dir=out, **kw):
        sig = o.table[o.table["significant"]]
        up, down = int((sig["log2fc"] > 0).sum()), int((sig["log2fc"] < 0).sum())
        click.echo(f"{o.de_id} [{o.spec.method}; {o.info['test']}]: {len(o.table)} genes, {up} up and {down} down "
                   f"in resistant ({o.spec.labels} labels)")  # fmt: skip
        _echo_table(o.table.head(top))
        if o.overlap is not None:
            ov = o.overlap
            click.echo(f"overlap with DE on true labels ({o.truth_de_id}): Jaccard {ov['jaccard']:.3f}, Spearman log2FC "
                       f"{ov['spearman_log2fc']:.3f}, {ov['n_shared']} shared of {ov['n_significant']} predicted-label / "
                       f"{ov['n_significant_truth']} true-label significant genes; missed: "
                       f"{', '.join(ov['missed_genes'][:10]) or '-'}")  # fmt: skip
        if csv_dir is not None:
            Path(csv_dir).mkdir(parents=True, exist_ok=True)
            o.table.to_csv(Path(csv_dir) / f"{o.de_id}.csv", index=False)
        _figures(o.figures)


@analyze.command(context_settings=CONTEXT)
@click.option(
    "--de", "de_source", required=True, help="DE table: a de_id from `analyze de`, or a CSV/TSV/Parquet file."
)
@click.option("--genesets", required=True, type=click.Path(path_type=Path), help="GMT file of gene sets.")
@click.option("--min-size", default=5, show_default=True, help="Smallest set (genes in the universe).")
@click.option("--max-size", default=500, show_default=True, help="Largest set.")
@click.option("--top", default=10, show_default=True, help="Terms printed per direction.")
@_out_opt
@click.pass_context
def enrich(
    ctx: click.Context, de_source: str, genesets: Path, min_size: int, max_size: int, top: int, out
) -> None:
    """Over-representation (hypergeometric, BH) of up/down genes in gene sets; bubble plot."""
    from scdrugmap.classify.analyze.de_run import load_de_table
    from scdrugmap.classify.analyze.enrich import enrich_de
    from scdrugmap.classify.analyze.tables import analysis_dir

    st = _store(ctx)
    table = load_de_table(st, de_source)
    o = enrich_de(st, table, genesets, de_source=de_source, min_size=min_size, max_size=max_size,
                  figures_dir=out or analysis_dir(st, "figures"))  # fmt: skip
    for d, n in (("up", o.n_up), ("down", o.n_down)):
        click.echo(f"{o.enrich_id} {d} ({n} genes):")
        part = o.results[o.results["direction"] == d]
        _echo_table(
            part[["rank", "term", "description", "set_size", "n_hits", "fold_enrichment", "p", "padj"]].head(
                top
            )
        )
    _figures(o.figures)


@analyze.command(context_settings=CONTEXT)
@_apply(_dataset_opts)
@click.option("--labels", default="truth", show_default=True, help=_LABELS_HELP)
@click.option("--top", default=20, show_default=True, help="Genes kept and shown.")
@click.option("--max-genes", default=5000, show_default=True, help="Most variable genes used as features.")
@_out_opt
@click.pass_context
def biomarkers(ctx: click.Context, datasets, where, labels, top, max_genes, out) -> None:
    """Genes a LightGBM model on expression uses to call resistance (SHAP + gain); violin plot."""
    from scdrugmap.classify.analyze.biomarkers import BiomarkerSpec, run_biomarkers

    st = _store(ctx)
    o = run_biomarkers(st, _selection(st, datasets, where), labels=labels, top=top,
                       spec=BiomarkerSpec(max_genes=max_genes), figures_dir=out)  # fmt: skip
    auc = "n/a" if o.cv_auroc is None else f"{o.cv_auroc:.3f}"
    click.echo(f"{o.bm_id}: {o.cv_folds}-fold grouped CV AUROC {auc}")
    _echo_table(o.table, max_rows=top)
    _figures(o.figures)


@analyze.command(context_settings=CONTEXT)
@click.option("--model", required=True, help="Embedding model.")
@click.option("--revision", help="Embedding revision (default latest).")
@click.option(
    "--category", default="tissue", show_default=True, help="Dataset field scored besides each dataset."
)
@click.option("--k", default=15, show_default=True, help="Neighbours for kNN purity.")
@click.option("--max-cells", default=5000, show_default=True, help="Subsample per scope.")
@click.option("--no-umap", is_flag=True, help="Skip the UMAP figure.")
@_out_opt
@click.pass_context
def separation(ctx: click.Context, model, revision, category, k, max_cells, no_umap, out) -> None:
    """Label separation of an embedding without a head (silhouette, kNN purity) + UMAP."""
    from scdrugmap.classify.analyze.separation import run_separation, separation_with_metrics

    st = _store(ctx)
    o = run_separation(st, model, revision=revision, category=category, k=k, max_cells=max_cells,
                       umap=not no_umap, figures_dir=out)  # fmt: skip
    df = separation_with_metrics(st, model=model)
    _echo_table(df[df["revision"] == o.revision].drop(columns=["model", "revision"]), max_rows=500)
    _figures(o.figures)


@analyze.command(context_settings=CONTEXT)
@click.option("--dataset", "dataset_id", required=True, help="Dataset id.")
@click.option("--run", "run_id", help="Run whose predicted probabilities are correlated with pseudotime.")
@click.option("--root-cell", help="obs name of the root cell (default: a sensitive cell, see README).")
@_out_opt
@click.pass_context
def pseudotime(ctx: click.Context, dataset_id, run_id, root_cell, out) -> None:
    """Diffusion pseudotime rooted in sensitive cells; correlation with label / predictions."""
    from scdrugmap.classify.analyze.pseudotime import run_pseudotime

    o = run_pseudotime(_store(ctx), dataset_id, run_id=run_id, root_cell=root_cell, figures_dir=out)
    click.echo(f"{o.pt_id}: " + ", ".join(f"{k} {v if not isinstance(v, float) else round(v, 4)}"
                                          for k, v in o.summary.items()))  # fmt: skip
    _figures(o.figures)


@analyze.command(context_settings=CONTEXT)
@click.argument("symbol")
@_apply(_dataset_opts)
@click.option("--no-umap", is_flag=True, help="Skip the per-dataset UMAP figure.")
@_out_opt
@click.pass_context
def gene(ctx: click.Context, symbol, datasets, where, no_umap, out) -> None:
    """SYMBOL's expression by label in every dataset (mean, fraction expressing, test) + UMAPs."""
    from scdrugmap.classify.analyze.geneview import gene_view

    o = gene_view(
        _store(ctx), symbol, datasets=datasets or None, where=where, umap=not no_umap, figures_dir=out
    )
    _echo_table(o.table.drop(columns="gene"), max_rows=1000)
    _figures(o.figures)


@analyze.command(context_settings=CONTEXT)
@click.option("--model", required=True, help="Embedding to correct.")
@click.option("--revision", help="Its revision (default latest).")
@click.option(
    "--batch-key", default="study", show_default=True, help="sample_id or a dataset field (study, …)."
)
@click.option("--name", help="Model name of the corrected embedding (default <model>_harmony).")
@click.option(
    "--dataset", "datasets", multiple=True, help="Restrict to these datasets (default all embedded)."
)
@click.option("--theta", default=2.0, show_default=True, help="Harmony diversity penalty.")
@click.option(
    "--sigma", default=0.1, show_default=True, help="Harmony soft-clustering bandwidth (larger = softer)."
)
@click.option("--compare-head", help="Also evaluate uncorrected vs corrected with this head (e.g. logreg).")
@click.option("--protocol", type=click.Choice(["cross", "pooled"]), default="cross", show_default=True)
@click.option("--category", default="tissue", show_default=True)
@click.option("--value", help="Category value (default every value).")
@click.pass_context
def harmony(ctx: click.Context, model, revision, batch_key, name, datasets, theta, sigma, compare_head, protocol,
            category, value) -> None:  # fmt: skip
    """Harmony-correct an embedding into a new model revision (then `evaluate --model M --corrected M_harmony`)."""
    from scdrugmap.classify.analyze.harmony import HarmonySpec, compare_correction, correct_embedding

    st = _store(ctx)
    o = correct_embedding(st, model, revision=revision, batch_key=batch_key, name=name, datasets=list(datasets) or None,
                          spec=HarmonySpec.from_options({"theta": theta, "sigma": sigma}))  # fmt: skip
    _echo_correction(st, o)
    if compare_head:
        _echo_table(
            compare_correction(st, o, head=compare_head, protocol=protocol, category=category, value=value),
            max_rows=1000,
        )


def _echo_correction(st, o) -> None:
    from scdrugmap.classify.analyze.harmony import batch_mixing

    click.echo(f"{o.model} revision {o.revision}: Harmony on {o.source_model} revision {o.source_revision}, "
               f"{o.n_cells} cells × {o.dim}, {o.n_batches} {o.batch_key} batches"
               f"{' (already stored)' if o.reused else ''}")  # fmt: skip
    mix = batch_mixing(st, o).set_index("embedding")
    u, c = mix.loc["uncorrected"], mix.loc["corrected"]
    click.echo(f"{o.batch_key} separation (lower = better mixed): silhouette {u['batch_silhouette']:.3f} → "
               f"{c['batch_silhouette']:.3f}, kNN purity {u['batch_knn_purity']:.3f} → {c['batch_knn_purity']:.3f} "
               f"(random {c['batch_knn_purity_expected']:.3f})")  # fmt: skip
    if (
        u["batch_knn_purity"] - c["batch_knn_purity"]
        < 0.02
        < u["batch_knn_purity"] - u["batch_knn_purity_expected"]
    ):
        click.echo(f"note: Harmony hardly mixed the {o.batch_key} batches; when they are far apart, a softer clustering "
                   "helps: --correct-option sigma=0.2 (embed) or --sigma 0.2 (analyze harmony)")  # fmt: skip


def echo_harmony_correction(st, result, *, batch_key: str, datasets: list[str] | None, spec=None) -> None:
    """``embed --correct harmony``: correct the embedding just made, print both revisions and what to run next.

    Raises
    ------
    InputError
        The embedding is not complete, or the correction failed (the message says the uncorrected
        embedding is complete and kept: it is not rolled back).
    """
    from scdrugmap.classify.analyze.harmony import correct_embedding
    from scdrugmap.store.errors import InputError, ScDrugMapError

    kept = f"the {result.model} embedding (revision {result.revision}) is complete and kept"
    if result.status != "complete":
        msg = (f"{result.model} revision {result.revision} is {result.status} ({result.n_done} cells done); "
               "rerun the same `scdrugmap embed` to finish it, then it is corrected")  # fmt: skip
        raise InputError(msg)
    try:
        o = correct_embedding(
            st, result.model, revision=result.revision, batch_key=batch_key, datasets=datasets, spec=spec
        )
    except (ScDrugMapError, ValueError) as exc:
        msg = (f"{kept}, but the Harmony correction failed: {exc}. Fix that and rerun the same `scdrugmap embed "
               f"... --correct harmony` (nothing is re-embedded) or `scdrugmap analyze harmony --model {result.model}`")  # fmt: skip
        raise InputError(msg) from exc
    click.echo(f"uncorrected: {result.model} revision {result.revision}")
    _echo_correction(st, o)
    click.echo(f"evaluate both on the same folds, side by side: scdrugmap evaluate --model {o.source_model} "
               f"--corrected {o.model} --head logreg --protocol cross --category tissue")  # fmt: skip
    click.echo(
        f"or either alone: scdrugmap evaluate --model {o.model} …; SQL: SELECT * FROM correction_metrics"
    )


@analyze.group(context_settings=CONTEXT)
def confidence() -> None:
    """Label confidence stars (3: recurrent/metastatic/PDX/intrinsic/> 6 months; 2: 1–6 months; 1: < 1 month)."""


@confidence.command("set", context_settings=CONTEXT)
@click.argument("dataset_id")
@click.option("--stars", type=int, help="Set stars explicitly (1–3).")
@click.option("--exposure-days", type=float, help="Days of drug exposure before sampling.")
@click.option("--sample-origin", help="recurrent, relapsed, metastatic, PDX, mouse, primary, …")
@click.option("--intrinsic-resistance", is_flag=True, default=None, help="Known intrinsic resistance.")
@click.pass_context
def confidence_set(ctx: click.Context, dataset_id: str, **kw: Any) -> None:
    """Record DATASET_ID's stars (explicit, or derived from the evidence given)."""
    from scdrugmap.classify.analyze.confidence import set_confidence

    stars, reason = set_confidence(_store(ctx), dataset_id, **kw)
    click.echo(f"{dataset_id}: {stars} star(s) ({reason})")


@confidence.command("show", context_settings=CONTEXT)
@click.pass_context
def confidence_show(ctx: click.Context) -> None:
    """Effective stars per dataset."""
    from scdrugmap.classify.analyze.confidence import dataset_confidence

    _echo_table(dataset_confidence(_store(ctx)), max_rows=10_000)


@confidence.command("metrics", context_settings=CONTEXT)
@click.option("--run", "run_id", required=True, help="Evaluation run.")
@click.pass_context
def confidence_metrics_cmd(ctx: click.Context, run_id: str) -> None:
    """A run's metrics per confidence stratum (0 = unknown)."""
    from scdrugmap.classify.analyze.confidence import confidence_metrics

    df = confidence_metrics(_store(ctx), run_id)
    _echo_table(
        df.pivot_table(
            index=["stars", "n_cells", "n_datasets"], columns="metric", values="value"
        ).reset_index()
    )


@click.group(context_settings=CONTEXT)
def genesets() -> None:
    """Gene-set files (GMT) for `analyze enrich`."""


@genesets.command("from-orgdb", context_settings=CONTEXT)
@click.argument("sqlite", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="GMT file to write.")
@click.option("--go-db", type=click.Path(path_type=Path), help="GO.db's GO.sqlite for term names (default: found "
              "beside SQLITE when extracted from the Debian packages).")  # fmt: skip
@click.option("--ontology", "ontologies", multiple=True, type=click.Choice(["BP", "MF", "CC"]),
              help="GO ontologies (repeatable; default all three).")  # fmt: skip
@click.option("--no-kegg", is_flag=True, help="Leave out KEGG pathway sets.")
@click.option(
    "--direct", is_flag=True, help="Direct annotations only (default: propagated to ancestor terms)."
)
@click.option("--min-size", default=5, show_default=True)
@click.option("--max-size", default=2000, show_default=True)
def from_orgdb(sqlite: Path, out: Path, go_db, ontologies, no_kegg, direct, min_size, max_size) -> None:
    """Build GO (and KEGG) gene sets from Bioconductor's org.Hs.eg.db SQLITE file (Debian r-bioc-org.hs.eg.db)."""
    from scdrugmap.classify.analyze.genesets import OrgDbSpec, write_orgdb_gmt

    spec = OrgDbSpec(tuple(ontologies) or ("BP", "MF", "CC"), not direct, not no_kegg, min_size, max_size)
    n = write_orgdb_gmt(sqlite, out, go_sqlite=go_db, spec=spec)
    click.echo(f"wrote {n} gene sets to {out}")


@genesets.command("fetch-debian", context_settings=CONTEXT)
@click.argument("dest", type=click.Path(path_type=Path))
def fetch_debian(dest: Path) -> None:
    """apt-get download + dpkg -x r-bioc-org.hs.eg.db and r-bioc-go.db into DEST; print the SQLite paths."""
    from scdrugmap.classify.analyze.genesets import fetch_orgdb_debs

    for pkg, path in fetch_orgdb_debs(dest).items():
        click.echo(f"{pkg}: {path}")
