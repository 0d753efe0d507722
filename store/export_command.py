"""``scdrugmap export``: a dataset's embeddings into an h5ad's ``obsm['X_scdrugmap_<model>']``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

__all__ = ["export_command"]


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("dataset_id")
@click.option("--model", required=True, help="Embedding model (e.g. pca, geneformer).")
@click.option("--revision", help="Embedding revision (default: the model's latest).")
@click.option(
    "--into",
    type=click.Path(path_type=Path),
    help="h5ad whose obs names are the dataset's cells (default: the store's QC-filtered copy).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output h5ad.")
@click.pass_context
def export_command(
    ctx: click.Context, dataset_id: str, model: str, revision: str | None, into: Path | None, out: Path
) -> None:
    """Write DATASET_ID's embeddings into an h5ad under obsm['X_scdrugmap_<model>'] (scanpy's X_pca untouched)."""
    from scdrugmap.store.embeddings import export_obsm
    from scdrugmap.store.failures import check_writable
    from scdrugmap.store.prepare import read_h5ad_checked
    from scdrugmap.store.shell import open_store

    check_writable(out)
    store = open_store(ctx)
    adata = read_h5ad_checked(into) if into is not None else None
    adata = export_obsm(store, dataset_id, model, revision=revision, adata=adata)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    key = f"X_scdrugmap_{model}"
    click.echo(f"wrote {out}: obsm[{key!r}] {adata.obsm[key].shape[0]} × {adata.obsm[key].shape[1]}")
