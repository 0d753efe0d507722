"""``scdrugmap release build | list | export`` (loaded lazily by ``cli``; logic in :mod:`classify.analyze.releases`)."""

from __future__ import annotations

from pathlib import Path

import click

from scdrugmap.store.shell import CONTEXT, open_store, parse_kv, print_table

__all__ = ["release"]


@click.group(context_settings=CONTEXT)
def release() -> None:
    """Integrated releases: a category value's datasets merged, Harmony-corrected, one immutable h5ad."""


@release.command("build", context_settings=CONTEXT)
@click.option("--category", required=True, type=click.Choice(["drug", "drug_class", "cancer_type", "tissue", "regimen"]),
              help="Dataset field that scopes the release.")  # fmt: skip
@click.option("--value", required=True, help="Its value (case-sensitive, e.g. cisplatin).")
@click.option("--model", required=True, help="Embedding model to integrate (e.g. pca, geneformer).")
@click.option("--revision", help="Embedding revision (default: the model's latest).")
@click.option("--batch-key", default="study", show_default=True,
              help="Harmony batches: study, dataset_id, sample_id, technology, … (≥ 2 values in the scope).")  # fmt: skip
@click.option("--harmony", "harmony_options", multiple=True,
              help="Harmony option KEY=VALUE: theta, sigma, nclust, max_iter, n_pcs, seed (repeatable).")  # fmt: skip
@click.pass_context
def build(ctx: click.Context, category: str, value: str, model: str, revision: str | None, batch_key: str,
          harmony_options: tuple[str, ...]) -> None:  # fmt: skip
    """Build the release of CATEGORY = VALUE (the same inputs return the existing release, unchanged)."""
    from scdrugmap.classify.analyze.harmony import HarmonySpec
    from scdrugmap.classify.analyze.releases import build_release

    spec = HarmonySpec.from_options(parse_kv(harmony_options, "--harmony"))
    st = open_store(ctx)  # build_release takes the writer lock only when it writes
    rel = build_release(
        st, category, value, model=model, revision=revision, batch_key=batch_key, harmony=spec
    )
    state = "exists already (same inputs; nothing written)" if rel.reused else "built"
    click.echo(f"release {rel.release_id} {state}: {rel.n_cells} cells from {rel.n_datasets} dataset(s), "
               f"{model} revision {rel.revision[:12]} + Harmony by {batch_key}; first built {rel.created_date}")  # fmt: skip
    click.echo(f"  file {rel.path} (sha256 {rel.content_hash[:16]}…); export: scdrugmap release export {rel.release_id} -o FILE.h5ad")  # fmt: skip


@release.command("list", context_settings=CONTEXT)
@click.pass_context
def list_cmd(ctx: click.Context) -> None:
    """List the stored releases with scope, size, date of first build and content hash."""
    from scdrugmap.classify.analyze.releases import list_releases

    df = list_releases(open_store(ctx))
    df["content_hash"] = df["content_hash"].str[:12]
    df["revision"] = df["revision"].str[:12]
    print_table(df.drop(columns=["inputs_hash", "path", "name"]))


@release.command("export", context_settings=CONTEXT)
@click.argument("release_id")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output h5ad.")
@click.pass_context
def export(ctx: click.Context, release_id: str, out: Path) -> None:
    """Copy release RELEASE_ID's h5ad to --out (checked against its SHA-256 in the catalog)."""
    from scdrugmap.classify.analyze.releases import export_release
    from scdrugmap.store.failures import check_writable

    check_writable(out)
    rel = export_release(open_store(ctx), release_id, out)
    click.echo(
        f"wrote {out}: release {rel.release_id}, {rel.n_cells} cells (sha256 {rel.content_hash[:16]}…)"
    )
