"""``scdrugmap collection list | fetch | prepare`` (loaded lazily by ``cli``)."""

from __future__ import annotations

from pathlib import Path

import click

from scdrugmap.store.shell import CONTEXT, print_table

__all__ = ["collection"]


def _open(ctx: click.Context):
    from scdrugmap.store.collection import cache_root, load_collection

    cache = ctx.obj.get("collection_cache") or cache_root(ctx.obj["store"])
    return load_collection(ctx.obj.get("collection_file"), cache=cache)


@click.group(context_settings=CONTEXT)
@click.option("--collection", "collection_file", type=click.Path(path_type=Path), envvar="SCDRUGMAP_COLLECTION",
              help="Collection manifest CSV (default: the shipped scDrugMap manifest); env SCDRUGMAP_COLLECTION.")  # fmt: skip
@click.option("--cache", "cache", type=click.Path(path_type=Path),
              help="Download cache (default $SCDRUGMAP_CACHE, else <store>/cache).")  # fmt: skip
@click.pass_context
def collection(ctx: click.Context, collection_file: Path | None, cache: Path | None) -> None:
    """scDrugMap's 60 datasets: list them, fetch open files, prepare labelled h5ad + an ingest manifest."""
    ctx.ensure_object(dict)
    ctx.obj.update(collection_file=collection_file, collection_cache=cache)


@collection.command("list", context_settings=CONTEXT)
@click.option("--where", "where", help="pandas query on the listing, e.g. \"access == 'open'\".")
@click.pass_context
def list_cmd(ctx: click.Context, where: str | None) -> None:
    """List the datasets with accession, access, label status and local status."""
    from scdrugmap.store.collection import collection_status

    df = collection_status(_open(ctx))
    if where:
        try:
            df = df.query(where)
        except Exception as exc:
            raise click.BadParameter(f"{where!r}: {exc}", param_hint="--where") from None
    print_table(df)


@collection.command(context_settings=CONTEXT)
@click.argument("dataset_ids", nargs=-1)
@click.option("--all-open", is_flag=True, help="Every open-access dataset with files listed.")
@click.option(
    "--mirror", envvar="SCDRUGMAP_MIRROR", help="Replace scheme and host of every URL (a local mirror)."
)
@click.option("--retries", default=2, show_default=True, help="Resumed attempts after a dropped connection.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds per network operation.")
@click.option("--no-progress", is_flag=True, help="No progress bar or progress lines.")
@click.pass_context
def fetch(ctx: click.Context, dataset_ids: tuple[str, ...], all_open: bool, mirror: str | None, retries: int,
          timeout: float, no_progress: bool) -> None:  # fmt: skip
    """Download the files of DATASET_IDS (resumes; verifies size/checksum; controlled access refused)."""
    from scdrugmap.store.collection import fetch_datasets

    col = _open(ctx)
    ids = list(dataset_ids)
    if all_open:
        t = col.table
        ids += t.loc[(t["access"] == "open") & (t["files"].str.strip() != ""), "dataset_id"].tolist()
    if not ids:
        raise click.UsageError("give dataset ids (see `scdrugmap collection list`) or --all-open")
    res = fetch_datasets(col, ids, progress=not no_progress, retries=retries, timeout=timeout, mirror=mirror,
                         echo=click.echo)  # fmt: skip
    click.echo(f"{len(res)} file(s) in {col.cache / 'collection'}")


@collection.command(context_settings=CONTEXT)
@click.argument("dataset_ids", nargs=-1, required=True)
@click.option(
    "--out", type=click.Path(path_type=Path), help="Output folder (default <cache>/collection/prepared)."
)
@click.pass_context
def prepare(ctx: click.Context, dataset_ids: tuple[str, ...], out: Path | None) -> None:
    """Turn downloaded files into labelled h5ad files and an ingest manifest (`ingest --manifest`)."""
    from scdrugmap.store.collection_prepare import prepare_datasets

    manifest = prepare_datasets(_open(ctx), list(dataset_ids), out=out)
    click.echo(f"wrote {manifest}; next: scdrugmap ingest --manifest {manifest}")


@collection.command(context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.pass_context
def export(ctx: click.Context, out: Path, force: bool) -> None:
    """Write a copy of the manifest to OUT.csv to curate (sample_labels, confirmed files and checksums)."""
    import shutil

    from scdrugmap.store.errors import InputError

    col = _open(ctx)
    if out.exists() and not force:
        msg = f"{out} exists; pass --force to overwrite it"
        raise InputError(msg)
    shutil.copyfile(col.source, out)
    click.echo(f"wrote {out} ({len(col.table)} datasets); curate it, then: export SCDRUGMAP_COLLECTION={out}")
