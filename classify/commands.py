"""``scdrugmap evaluate | predict | results``: the classify stage's commands (loaded lazily by ``cli``).

Thin click shells: parse options, call :mod:`classify.evaluate` / :mod:`classify.predict`, print.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from scdrugmap.classify.summary import print_summary
from scdrugmap.store.shell import CONTEXT, coerce, open_store, parse_kv, print_table

__all__ = ["evaluate", "predict", "results"]


@click.command(context_settings=CONTEXT)
@click.option("--model", help="Embedding model name; comma-separated for a grid (e.g. pca,geneformer).")
@click.option("--revision", help="Embedding revision (default: latest of the model).")
@click.option(
    "--head",
    default="mlp",
    show_default=True,
    help="mlp (trained to convergence, early stopping), mlp_paper (scDrugMap's fixed 10 epochs), logreg, "
    "lightgbm, rf; comma-separated for a grid.",
)
@click.option("--protocol", default="pooled", show_default=True,
              help="pooled, cross or external (train on --train-where datasets, default the primary collection; "
                   "test on the others); comma-separated for a grid.")  # fmt: skip
@click.option(
    "--category",
    default="tissue",
    show_default=True,
    help="tissue, cancer_type, drug_class, regimen, …; comma-separated for a grid.",
)
@click.option("--value", help="Category value (default: every value with labelled cells).")
@click.option(
    "--group",
    "grouping",
    type=click.Choice(["patient", "sample", "cell"]),
    help="Pooled split unit (default patient when patient ids exist, else sample, else cell).",
)
@click.option("--k", default=10, show_default=True, help="Pooled folds.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--seeds", help="Comma-separated seeds (e.g. 0,1,2): one fold set and run per seed, summary over seeds."
)
@click.option(
    "--prevalence", type=float, default=0.0, help="Subsample each test side to this positive fraction."
)
@click.option("--train-where", default="", help="external: SQL on datasets for the training side.")
@click.option(
    "--test-where", default="", help="external: SQL on datasets for the test side (default: not train)."
)
@click.option(
    "--positive", type=click.Choice(["sensitive", "resistant"]), default="sensitive", show_default=True
)
@click.option("--param", "params", multiple=True, help="Head hyper-parameter KEY=VALUE (e.g. epochs=20).")
@click.option(
    "--shots",
    default=0,
    show_default=True,
    help="Few-shot: K labelled cells per class of each held-out side train too.",
)
@click.option("--rerun", is_flag=True, help="Recompute even if the catalog holds this run.")
@click.option("--min-confidence", type=int, default=0, help="Only datasets with ≥ K label-confidence stars "
              "(1–3) train and are scored; datasets without stars are left out.")  # fmt: skip
@click.option("--by-confidence", is_flag=True, help="Also print AUROC and F1 per label-confidence stratum "
              "(always stored in confidence_metrics).")  # fmt: skip
@click.option("--by-cell-type", "by_cell_type", help="Also print metrics per cell type of this annotation (e.g. "
              "markers, from `analyze celltypes annotate`): the run's out-of-fold predictions split by cell type.")  # fmt: skip
@click.option("--corrected", help="Also evaluate this batch-corrected embedding of MODEL (e.g. pca_harmony, from "
              "`embed --correct harmony`) on the same folds; print both side by side (table correction_metrics).")  # fmt: skip
@click.option("--grid", "grid_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="TOML grid file: models, heads, protocols, categories, values, seeds lists (see README).")  # fmt: skip
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the grid's (run × fold) tasks run: local processes or Ray (--address for a cluster).")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Parallel tasks (local processes / Ray CPUs ÷ --threads); 1 local = in this process.")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), help="Threads per head fit, recorded in the run spec "
              "(default: the cores ÷ --workers).")  # fmt: skip
@click.option("--address", help="Ray cluster address (with --executor ray).")
@click.pass_context
def evaluate(
    ctx: click.Context,
    params: tuple[str, ...],
    positive: str,
    corrected: str | None,
    by_confidence: bool,
    by_cell_type: str | None,
    seeds: str | None,
    grid_file: Path | None,
    executor: str,
    workers: int,
    threads: int | None,
    address: str | None,
    **kw: Any,
) -> None:
    """Train a head on frozen embeddings and evaluate it (pooled CV, leave-one-study-out or external).

    Several models, heads, protocols or categories (comma-separated, or a --grid file) form a grid whose
    (run × fold) tasks run in parallel on --workers / --executor.
    """
    import os

    from scdrugmap.classify.evaluate import evaluate as run_eval
    from scdrugmap.classify.evaluate import summarise

    st = open_store(ctx)
    head_params = {k: coerce(v) for k, v in parse_kv(params, "--param").items()}
    if seeds is not None:
        try:
            kw["seeds"] = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(
                f"{seeds!r} is not a comma-separated list of integers", param_hint="--seeds"
            ) from None
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    lists = {
        k: [x.strip() for x in str(kw[k] or "").split(",") if x.strip()]
        for k in ("model", "head", "protocol", "category")
    }
    if grid_file is not None or executor != "local" or workers > 1 or any(len(v) > 1 for v in lists.values()):
        from scdrugmap.classify.grid_commands import run_grid_command

        if corrected or by_cell_type:
            raise click.UsageError(
                "--corrected and --by-cell-type apply to one model, head, protocol and category; run them without a grid"
            )
        run_grid_command(st, grid_file, lists, kw, head_params=head_params, positive=positive, executor=executor,
                         workers=workers, threads=threads, address=address, by_confidence=by_confidence)  # fmt: skip
        return
    if not kw.get("model"):
        raise click.UsageError("give --model (or a --grid file)")
    kw["threads"] = threads
    correction, corr_outcomes = None, []
    if corrected:  # checked before anything is evaluated
        from scdrugmap.classify.analyze.correction import evaluate_pair
        from scdrugmap.classify.analyze.harmony import load_correction

        correction = load_correction(
            st, corrected, source_model=kw.pop("model"), source_revision=kw.pop("revision")
        )
        outcomes, corr_outcomes = evaluate_pair(
            st, correction, positive_class=positive, head_params=head_params, **kw
        )
    else:
        outcomes = run_eval(st, positive_class=positive, head_params=head_params, **kw)
    for o in [*outcomes, *corr_outcomes]:
        click.echo(
            f"{o.run_id} {o.spec.category}={o.spec.value!r}: {o.n_cells} cells"
            f"{f' with ≥ {o.spec.min_confidence} stars' if o.spec.min_confidence else ''}"
            f"{' (from catalog)' if o.reused else ''}"
        )
    print_summary(summarise(st, [o.run_id for o in [*outcomes, *corr_outcomes]]))
    if by_confidence:
        from scdrugmap.classify.analyze.confidence import by_confidence as strata

        click.echo(
            "\nPer label-confidence stratum (stars 0 = none; out-of-fold predictions pooled over folds):"
        )
        print_table(strata(st, [o.run_id for o in [*outcomes, *corr_outcomes]]).round(4))
    if by_cell_type:
        from scdrugmap.classify.analyze.celltypes import cell_type_metrics

        click.echo(f"\nPer cell type ({by_cell_type} annotation; out-of-fold predictions pooled over folds):")
        for o in [*outcomes, *corr_outcomes]:
            df = cell_type_metrics(st, o.run_id, method=by_cell_type)
            keys = ["run_id", "cell_type", "n_cells", "n_positive"]
            wide = df.set_index([*keys, "metric"])["value"].unstack("metric").reset_index()
            print_table(wide[[*keys, *(m for m in ("auroc", "auprc", "f1") if m in wide)]].round(4))
    if correction is not None:
        from scdrugmap.classify.analyze.correction import correction_table

        table = correction_table(
            st, correction, [o.run_id for o in outcomes], [o.run_id for o in corr_outcomes]
        )
        click.echo(f"\nAUROC without and with {correction.batch_key} correction ({correction.source_model} vs "
                   f"{correction.model}), per fold (cross: the held-out study) and mean; all metrics in correction_metrics:")  # fmt: skip
        print_table(table.round(4))


@click.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--head", "run_id", required=True, help="Run id of an evaluation run whose head to apply.")
@click.option("--out", type=click.Path(path_type=Path), help="Output h5ad (default ./<stem>.scdrugmap.h5ad).")
@click.option(
    "--calibration",
    type=click.Choice(["auto", "platt", "isotonic", "none"]),
    default="auto",
    show_default=True,
    help="auto: the method that lowered out-of-study Brier in the run's check, else none.",
)
@click.option(
    "--abstain", help="LOW,HIGH: abstain on cells whose probability is in this band (e.g. 0.4,0.6)."
)
@click.option(
    "--min-genes", default=500, show_default=True, help="QC (raw counts): keep cells with more genes."
)
@click.option(
    "--max-pct-mito", default=10.0, show_default=True, help="QC (raw counts): keep cells below this % mito."
)
@click.option("--input-type", type=click.Choice(["auto", "counts", "lognorm", "scaled"]), default="auto",
              show_default=True, help="What X holds (auto = detect, as at ingest).")  # fmt: skip
@click.option("--layer", help="Use this layer instead of X.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Embedder checkpoint, if it moved.")
@click.option("--gene-key", help="var column with gene identifiers.")
@click.option(
    "--min-coverage", default=0.5, show_default=True, help="Minimum fraction of the model's genes present."
)
@click.option(
    "--fold", default=0, show_default=True, help="LoRA runs: whose fold's adapter and head to apply."
)
@click.pass_context
def predict(ctx: click.Context, file: Path, run_id: str, abstain: str | None, **kw: Any) -> None:
    """Apply a trained head to FILE.h5ad: QC, per-cell p(sensitive), call and status written into obs."""
    from scdrugmap.classify.calibrate import parse_band
    from scdrugmap.classify.predict import predict_file
    from scdrugmap.classify.predict_output import summary_lines

    r = predict_file(open_store(ctx), run_id, file, abstain=parse_band(abstain), **kw)
    click.echo(f"wrote {r.out}" + (f" (recorded for dataset {r.dataset_id})" if r.dataset_id else ""))
    for line in summary_lines(r.summary):
        click.echo(line)


@click.command(context_settings=CONTEXT)
@click.option("--where", help="SQL filter on eval_runs, e.g. \"model = 'pca' AND protocol = 'cross'\".")
@click.option("--long", "long_format", is_flag=True, help="One row per run × metric.")
@click.pass_context
def results(ctx: click.Context, where: str | None, long_format: bool) -> None:
    """Mean ± sd of every metric per evaluation run."""
    from scdrugmap.classify.evaluate import summarise

    df = summarise(open_store(ctx), where=where)
    if long_format:
        print_table(df, max_rows=10_000)
    else:
        print_summary(df)
