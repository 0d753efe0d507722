"""``scdrugmap`` command line: thin click shells over store/, embedder/ and classify/.

Every command parses options, calls one function and prints. Errors raised on purpose
(:class:`store.errors.ScDrugMapError`) are printed as one line and exit with status 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from scdrugmap.store.errors import ScDrugMapError
from scdrugmap.store.shell import CONTEXT, coerce, new_store_guard, open_store, parse_kv, print_table

#: commands defined in other modules, imported only when used: name → ("module:attribute", short help).
#: The short help is what ``scdrugmap --help`` lists without importing the module (tests/test_layout.py
#: checks it against each command's own help).
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("scdrugmap.classify.service.commands:serve", "Serve the store over HTTP: JSON API (/docs), per-cell predictions and the web page (/)."),
    "report": ("scdrugmap.classify.report:report", "Write the benchmark figures (PNG + SVG) and an offline index.html into --out."),
    "finetune": ("scdrugmap.classify.finetune_commands:finetune_command", "LoRA-fine-tune a foundation model with the MLP head on the persisted folds."),
    "analyze": ("scdrugmap.classify.analyze.commands:analyze", "Biology views: DE, enrichment, biomarkers, separation, pseudotime, genes, Harmony, confidence, cell types, CCC."),
    "genesets": ("scdrugmap.classify.analyze.commands:genesets", "Gene-set files (GMT) for `analyze enrich`."),
    "prompt": ("scdrugmap.classify.prompting.commands:prompt", "Zero-shot sensitive/resistant calls from a chat model over an OpenAI-compatible API."),
    "evaluate": ("scdrugmap.classify.presets:evaluate", "Train a head on frozen embeddings and evaluate it (pooled CV, leave-one-study-out or external)."),
    "predict": ("scdrugmap.classify.commands:predict", "Apply a trained head to FILE.h5ad: QC, per-cell p(sensitive), call and status written into obs."),
    "export": ("scdrugmap.store.export_command:export_command", "Write DATASET_ID's embeddings into an h5ad under obsm['X_scdrugmap_<model>'] (scanpy's X_pca untouched)."),
    "results": ("scdrugmap.classify.commands:results", "Mean ± sd of every metric per evaluation run."),
    "leakage": ("scdrugmap.classify.leakage:leakage_command", "Evaluate the same cells under cell, sample, patient and study grouping; report the inflation."),
    "doctor": ("scdrugmap.store.commands:doctor", "Check catalog ↔ dataset files ↔ Zarr arrays; report (exit 1 if anything is left unrepaired)."),
    "coverage": ("scdrugmap.store.coverage:coverage_command", "Gene coverage per dataset and model revision, by how genes matched the vocabulary."),
    "collection": ("scdrugmap.store.collection_commands:collection", "scDrugMap's 60 datasets: list them, fetch open files, prepare labelled h5ad + an ingest manifest."),
    "recommend": ("scdrugmap.classify.recommend_commands:recommend_command", "Recommend a model/head per category value and scenario from the stored runs, with the evidence."),
    "release": ("scdrugmap.classify.analyze.release_commands:release", "Integrated releases: a category value's datasets merged, Harmony-corrected, one immutable h5ad."),
    "weights": ("scdrugmap.embedder.weights_commands:weights", "Released checkpoints of the foundation models: where they live, fetched into the adapters' layout."),
}  # fmt: skip


class _Group(click.Group):
    """Turns ScDrugMapError into a one-line ``Error: ...`` and exit code 1; loads lazy commands."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        import importlib.util

        def present(module: str) -> bool:
            try:
                return importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                return False

        lazy = [n for n, (target, _) in LAZY_COMMANDS.items() if present(target.split(":")[0])]
        return sorted({*super().list_commands(ctx), *lazy})

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``--help`` without importing the lazy commands' modules."""
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS and name not in self.commands:
                rows.append((name, LAZY_COMMANDS[name][1]))
            else:
                cmd = self.get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append(
                        (
                            name,
                            cmd.get_short_help_str(
                                formatter.width - 6 - max(len(n) for n, _ in rows or [(name, "")])
                            ),
                        )
                    )
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is None and name in LAZY_COMMANDS:
            import importlib

            module, attr = LAZY_COMMANDS[name][0].split(":")
            try:
                cmd = getattr(importlib.import_module(module), attr)
            except ModuleNotFoundError:
                return None
        return cmd

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ScDrugMapError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            from scdrugmap.store.commands import failure_exception

            raise failure_exception(exc, (ctx.obj or {}).get("store", ".")) from None


@click.group(cls=_Group, context_settings=CONTEXT)
@click.option(
    "--store",
    "store_path",
    envvar="SCDRUGMAP_STORE",
    default="./scdrugmap-store",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Store directory (catalog.duckdb + embeddings.zarr); env SCDRUGMAP_STORE.",
)
@click.option("-v", "--verbose", is_flag=True, help="Show informational log messages.")
@click.option("--debug", is_flag=True, help="Show the Python traceback of unexpected failures.")
@click.option("--wait-timeout", type=click.FloatRange(min=0), envvar="SCDRUGMAP_WAIT_TIMEOUT", default=600.0,
              show_default=True, help="Seconds to wait while another process holds the store.")  # fmt: skip
@click.option("--no-wait", is_flag=True, help="Refuse at once when another process holds the store.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or progress lines on stderr.")
@click.version_option(package_name="scdrugmap")
@click.pass_context
def main(
    ctx: click.Context, store_path: Path, verbose: bool, debug: bool, wait_timeout: float, no_wait: bool,
    quiet: bool,
) -> None:  # fmt: skip
    """Predict drug sensitive/resistant single cells from scRNA-seq with foundation-model embeddings.

    Flow: ingest h5ad → embed (per model, into Zarr) → evaluate (pooled / cross-data) → results / sql.
    """
    from scdrugmap.store import progress
    from scdrugmap.store.locking import configure

    progress.configure(enabled=not quiet)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    configure(timeout_s=wait_timeout, no_wait=no_wait)
    ctx.ensure_object(dict)
    ctx.obj.update(store=store_path, debug=debug)


@main.command(context_settings=CONTEXT)
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option("--dataset-id", help="Catalog id of the dataset (letters, digits, . _ -).")
@click.option(
    "--manifest", type=click.Path(path_type=Path), help="CSV with one dataset per row (see README)."
)
@click.option("--label-key", help="obs column with response labels (omit for unlabelled data).")
@click.option("--sensitive", multiple=True, help="Label value meaning sensitive (repeatable).")
@click.option("--resistant", multiple=True, help="Label value meaning resistant (repeatable).")
@click.option("--sample-key", help="obs column with sample (replicate/culture/biopsy) ids.")
@click.option("--patient-key", help="obs column with patient (donor) ids; folds group by patient.")
@click.option("--patient-scope", help="Datasets with the same scope share patient ids (default: own).")
@click.option(
    "--input-type",
    type=click.Choice(["auto", "counts", "lognorm", "scaled"]),
    default="auto",
    show_default=True,
    help="What X holds; auto detects (negative → scaled, integers → counts).",
)
@click.option("--layer", help="Use adata.layers[LAYER] instead of X.")
@click.option("--gene-key", help="var column with gene symbols/Ensembl ids (default: var_names).")
@click.option("--min-genes", default=500, show_default=True, help="QC: keep cells with more detected genes.")
@click.option("--max-pct-mito", default=10.0, show_default=True, help="QC: keep cells with less mito %.")
@click.option(
    "--meta", "meta", multiple=True, help="Dataset metadata FIELD=VALUE (tissue, cancer_type, drug, …)."
)
@click.option("--allow-unmapped", is_flag=True, help="Ingest a file none of whose genes maps to HGNC.")
@click.pass_context
def ingest(
    ctx: click.Context, file: Path | None, manifest: Path | None, meta: tuple[str, ...], **kw: Any
) -> None:
    """Ingest FILE.h5ad (or every row of --manifest) into the store, with QC and gene mapping."""
    from scdrugmap.store.ingest import ingest_h5ad
    from scdrugmap.store.manifest import ingest_manifest

    if (file is None) == (manifest is None):
        raise click.UsageError("give either FILE.h5ad with --dataset-id, or --manifest FILE.csv")
    if manifest is None and not kw["dataset_id"]:
        raise click.UsageError("--dataset-id is required with FILE.h5ad")
    with new_store_guard(ctx):
        st = open_store(ctx, create=True, write=True)
        if manifest is not None:
            reports = ingest_manifest(st, manifest)
        else:
            reports = [ingest_h5ad(st, file, meta=parse_kv(meta, "--meta"), **kw)]
    for r in reports:
        click.echo(
            f"{r.dataset_id}: {r.status}; {r.n_cells}/{r.n_cells_input} cells after QC"
            f"{'' if r.qc_applied else ' (QC skipped: ' + str(r.x_kind) + ' input)'}; "
            f"{r.n_genes_mapped}/{r.n_genes} genes mapped; {r.n_sensitive} sensitive, {r.n_resistant} resistant"
            + (f"; {r.label_confidence} star(s) ({r.confidence_source})" if r.label_confidence else "")
        )


@main.command("import-embeddings", context_settings=CONTEXT)
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--dataset-id", required=True, help="Dataset the embedding rows belong to.")
@click.option("--obsm", "obsm_key", required=True, help="obsm key holding the embedding.")
@click.option("--model", required=True, help="Name to store the embedding under.")
@click.option("--label-key", help="For a new dataset: obs column with labels.")
@click.option("--sensitive", multiple=True, help="For a new dataset: value meaning sensitive.")
@click.option("--resistant", multiple=True, help="For a new dataset: value meaning resistant.")
@click.option("--sample-key", help="For a new dataset: obs column with sample ids.")
@click.option("--meta", "meta", multiple=True, help="For a new dataset: metadata FIELD=VALUE.")
@click.pass_context
def import_embeddings_cmd(ctx: click.Context, file: Path, meta: tuple[str, ...], **kw: Any) -> None:
    """Store precomputed embeddings (obsm) of FILE.h5ad; ingests the file's cells when the dataset is new."""
    from scdrugmap.store.imports import import_embeddings

    with new_store_guard(ctx):
        st = open_store(ctx, create=True, write=True)
        r = import_embeddings(st, file, meta=parse_kv(meta, "--meta"), **kw)
    click.echo(
        f"{r.model} revision {r.revision}: {r.n_rows} × {r.dim} rows for {r.dataset_id}"
        f"{' (dataset ingested from the file)' if r.dataset_ingested else ''}"
    )


@main.command(context_settings=CONTEXT)
@click.option("--where", help="SQL filter on the datasets table, e.g. \"tissue = 'Cell line'\".")
@click.option("--filter", "filters", multiple=True, help="FIELD=VALUE equality filter (repeatable).")
@click.pass_context
def datasets(ctx: click.Context, where: str | None, filters: tuple[str, ...]) -> None:
    """List ingested datasets and their metadata."""
    from scdrugmap.store.ingest import META_FIELDS

    df = open_store(ctx).datasets(where)  # the filter is checked and evaluated read-only
    for k, v in parse_kv(filters, "--filter").items():
        if k not in (*META_FIELDS, "dataset_id", "x_kind"):
            raise click.BadParameter(f"unknown field {k!r}", param_hint="--filter")
        df = df[df[k].astype("string").fillna("") == v]
    cols = [
        "dataset_id",
        "study",
        "tissue",
        "cancer_type",
        "drug_class",
        "regimen",
        "source",
        "n_cells",
        "x_kind",
    ]
    print_table(df[cols])


@main.command(context_settings=CONTEXT)
def models() -> None:
    """List the registered embedders (name, input, LoRA targets)."""
    from scdrugmap.embedder import available_models, get_embedder_class

    for name in available_models():
        cls = get_embedder_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lora = ",".join(cls.lora_targets) or "-"
        click.echo(f"{name:14s} input={cls.input_kind:6s} lora={lora:32s} {doc}")


@main.command(context_settings=CONTEXT)
@click.option("--model", required=True, help="Embedder name; `scdrugmap models` lists them.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Checkpoint directory (original layout).")
@click.option(
    "--datasets", "dataset_ids", multiple=True, help="Dataset ids, comma-separated or repeated (default all)."
)
@click.option("--where", help="SQL filter on datasets, e.g. \"tissue = 'Cell line'\".")
@click.option("--pooling", help="Pooling variant (model-specific; default the authors' choice).")
@click.option("--batch-size", type=int, help="Forward mini-batch size.")
@click.option("--device", help="cuda, cuda:1, cpu (default: CUDA when available).")
@click.option("--option", "options", multiple=True, help="Extra embedder option KEY=VALUE (repeatable).")
@click.option("--lora", "lora_run", help="Embed with the fine-tuned backbone of this LoRA run (with --fold).")
@click.option("--fold", "lora_fold", default=0, show_default=True, help="Fold of the LoRA run.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--correct", type=click.Choice(["none", "harmony"]), default="none", show_default=True,
              help="Then also write a batch-corrected revision <MODEL>_harmony of the selection (harmonypy).")  # fmt: skip
@click.option("--batch-key", help="With --correct harmony: sample_id or a dataset field (default study).")
@click.option("--correct-option", "correct_options", multiple=True,
              help="Harmony option KEY=VALUE: theta, sigma, nclust, max_iter, n_pcs, seed (repeatable).")  # fmt: skip
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker processes on this machine; ray: Ray actors (a cluster with --address).")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes / Ray actors, each embedding chunk-aligned shards (1 local: in-process).")  # fmt: skip
@click.option("--address", help="Ray cluster address (default: start a local Ray with --workers CPUs).")
@click.option(
    "--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Threads per worker."
)
@click.option(
    "--chunk-rows", type=click.IntRange(min=1), help="Rows per Zarr chunk of a new array (default ≥ 1 MiB)."
)
@click.pass_context
def embed(ctx: click.Context, model: str, checkpoint: Path | None, dataset_ids: tuple[str, ...], where: str | None,
          pooling: str | None, batch_size: int | None, device: str | None, options: tuple[str, ...], lora_run: str | None, lora_fold: int,
          no_progress: bool, correct: str, batch_key: str | None, correct_options: tuple[str, ...], executor: str,
          workers: int, address: str | None, threads: int, chunk_rows: int | None) -> None:  # fmt: skip
    """Embed the selected datasets with MODEL into the store (resumes after an interruption)."""
    from scdrugmap.embedder.runner import embed_datasets

    if (batch_key is not None or correct_options) and correct != "harmony":
        raise click.UsageError("--batch-key and --correct-option apply only with --correct harmony")
    opts: dict[str, Any] = {k: coerce(v) for k, v in parse_kv(options, "--option").items()}
    for key, val in (("pooling", pooling), ("batch_size", batch_size), ("device", device)):
        if val is not None:
            opts[key] = val
    st = open_store(ctx, write=True)
    if checkpoint is None and not lora_run:  # weights fetched by `scdrugmap weights fetch MODEL`
        from scdrugmap.embedder.weights import default_checkpoint
        from scdrugmap.store.fetch import cache_root

        checkpoint = default_checkpoint(cache_root(ctx.obj["store"]), model)
    selected = [d.strip() for item in dataset_ids for d in item.split(",") if d.strip()] or None
    if correct == "harmony":  # refuse a bad batch key before embedding anything
        from scdrugmap.classify.analyze.harmony import HarmonySpec, check_batch_key
        from scdrugmap.embedder.runner import select_datasets

        harmony = HarmonySpec.from_options(parse_kv(correct_options, "--correct-option"))
        batch_key = batch_key or "study"
        selected = select_datasets(st, selected, where)["dataset_id"].tolist()
        check_batch_key(st, batch_key, datasets=selected)
    emb = None
    if lora_run:
        from scdrugmap.classify.finetune import finetuned_embedder

        emb, _ = finetuned_embedder(st, lora_run, lora_fold, checkpoint=checkpoint)
    from scdrugmap.embedder.executor import make_executor

    pool = make_executor(executor, workers=workers, address=address)
    try:
        r = embed_datasets(
            st,
            model,
            embedder=emb,
            checkpoint=checkpoint,
            datasets=selected,
            where=where,
            options=opts,
            progress=not no_progress,
            executor=pool,
            threads=threads,
            chunk_rows=chunk_rows,
        )
    finally:
        pool.close()
    click.echo(
        f"{r.model} revision {r.revision}: dim {r.dim}; {r.n_embedded_now} cells embedded now, {r.n_done} done; {r.status}"
    )
    if correct == "harmony":
        from scdrugmap.classify.analyze.commands import echo_harmony_correction

        echo_harmony_correction(st, r, batch_key=batch_key or "study", datasets=selected, spec=harmony)


@main.command(context_settings=CONTEXT)
@click.argument("query")
@click.option("--limit", default=1000, show_default=True, help="Maximum rows printed.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Interrupt the query after this many seconds.")  # fmt: skip
@click.pass_context
def sql(ctx: click.Context, query: str, limit: int, as_csv: bool, time_limit: float) -> None:
    """Run a read-only SQL query on the catalog (writes, files, extensions and attachments are refused)."""
    df = open_store(ctx).sql(query, limit=limit, time_limit_s=time_limit)
    if as_csv:
        click.echo(df.to_csv(index=False), nl=False)
    else:
        print_table(df, max_rows=limit)


@main.command(context_settings=CONTEXT)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--n-cells", default=3000, show_default=True, help="Total cells (default collection).")
@click.option("--n-genes", default=2000, show_default=True, help="Genes per dataset.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--catalogue", type=click.Path(path_type=Path), help="Follow a catalogue CSV (scDrugMap layout)."
)
@click.option("--scale", type=float, help="Cell-count scale factor with --catalogue (default 0.01).")
@click.option("--study-effect", default=1.0, show_default=True,
              help="Multiplier of the per-study batch effect (e.g. 3 for strong study effects; 0 = none).")  # fmt: skip
@click.option("--sample-effect", default=0.08, show_default=True,
              help="Sd of each sample's gene-wise effect; 0.3-0.6 is as large as real cultures/biopsies.")  # fmt: skip
@click.option("--samples-per-patient", default=1, show_default=True,
              help="Above 1: samples form patients (obs patient_id, manifest patient_key).")  # fmt: skip
@click.option("--cell-types", default=0, show_default=True,
              help="Plant N cell types with marker programmes (obs cell_type; 0 = none, 10 at most).")  # fmt: skip
def simulate(
    out_dir: Path, n_cells: int, n_genes: int, seed: int, catalogue: Path | None, scale: float | None,
    study_effect: float, sample_effect: float, samples_per_patient: int, cell_types: int,
) -> None:  # fmt: skip
    """Write a simulated multi-study collection (h5ad per dataset + manifest.csv)."""
    from scdrugmap.store.simulate import simulate_collection

    manifest = simulate_collection(
        out_dir, n_cells=n_cells, n_genes=n_genes, seed=seed, catalogue=catalogue, scale=scale,
        study_effect=study_effect, sample_effect=sample_effect, samples_per_patient=samples_per_patient,
        cell_types=cell_types,
    )  # fmt: skip
    click.echo(f"wrote {manifest}")


@main.command(context_settings=CONTEXT)
@click.option("--n-cells", default=3000, show_default=True, help="Cells in the simulated collection.")
@click.option("--seed", default=0, show_default=True)
@click.option("--heads", default="logreg,mlp_paper,mlp", show_default=True, help="Comma-separated heads.")
@click.option("--sample-effect", default=0.08, show_default=True,
              help="Per-sample effect of the simulation (0.5: real-culture-sized; see `scdrugmap leakage`).")  # fmt: skip
@click.option("--cell-types", default=0, show_default=True,
              help="Plant N cell types and annotate them (analyze celltypes); 0 = none.")  # fmt: skip
@click.pass_context
def demo(
    ctx: click.Context, n_cells: int, seed: int, heads: str, sample_effect: float, cell_types: int
) -> None:
    """Simulate → ingest → embed pca → evaluate pooled and cross-data → results, in a fresh store."""
    from scdrugmap.classify.demo import run_demo

    summary = run_demo(
        ctx.obj["store"],
        n_cells=n_cells,
        seed=seed,
        heads=[h.strip() for h in heads.split(",") if h.strip()],
        echo=click.echo,
        sample_effect=sample_effect,
        cell_types=cell_types,
    )
    from scdrugmap.classify.summary import print_summary

    print_summary(summary)


if __name__ == "__main__":  # pragma: no cover
    main()
