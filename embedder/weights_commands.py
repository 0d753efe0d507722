"""``scdrugmap weights list | fetch MODEL`` (loaded lazily by ``cli``)."""

from __future__ import annotations

from pathlib import Path

import click

from scdrugmap.store.errors import InputError
from scdrugmap.store.shell import CONTEXT, print_table

__all__ = ["weights"]


def _cache(ctx: click.Context) -> Path:
    from scdrugmap.store.fetch import cache_root

    return ctx.obj.get("weights_cache") or cache_root(ctx.obj["store"])


@click.group(context_settings=CONTEXT)
@click.option("--registry", type=click.Path(path_type=Path), envvar="SCDRUGMAP_WEIGHTS_REGISTRY",
              help="Weights registry JSON (default: the shipped one); env SCDRUGMAP_WEIGHTS_REGISTRY.")  # fmt: skip
@click.option("--cache", type=click.Path(path_type=Path),
              help="Cache folder (default $SCDRUGMAP_CACHE, else <store>/cache); weights go to <cache>/weights/<model>.")  # fmt: skip
@click.pass_context
def weights(ctx: click.Context, registry: Path | None, cache: Path | None) -> None:
    """Released checkpoints of the foundation models: where they live, fetched into the adapters' layout."""
    ctx.ensure_object(dict)
    ctx.obj.update(weights_registry=registry, weights_cache=cache)


@weights.command("list", context_settings=CONTEXT)
@click.pass_context
def list_cmd(ctx: click.Context) -> None:
    """List registered models: files, how many need a manual step, local state, home."""
    import pandas as pd

    from scdrugmap.embedder.weights import weights_status

    print_table(pd.DataFrame(weights_status(_cache(ctx), ctx.obj["weights_registry"])))


@weights.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--dir", "directory", type=click.Path(path_type=Path),
              help="Target directory (default <cache>/weights/MODEL, which `embed` then uses by default).")  # fmt: skip
@click.option(
    "--mirror", envvar="SCDRUGMAP_MIRROR", help="Replace scheme and host of every URL (a local mirror)."
)
@click.option("--retries", default=2, show_default=True, help="Resumed attempts after a dropped connection.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds per network operation.")
@click.option("--no-progress", is_flag=True, help="No progress bar or progress lines.")
@click.pass_context
def fetch(ctx: click.Context, model: str, directory: Path | None, mirror: str | None, retries: int,
          timeout: float, no_progress: bool) -> None:  # fmt: skip
    """Download MODEL's released checkpoint into the layout its adapter reads (resumes, verifies, records)."""
    from scdrugmap.embedder.weights import RECORD, fetch_weights

    res = fetch_weights(model, _cache(ctx), registry=ctx.obj["weights_registry"], directory=directory,
                        progress=not no_progress, retries=retries, timeout=timeout, mirror=mirror,
                        echo=click.echo)  # fmt: skip
    if not res.complete:
        steps = "; ".join(f"{path} ← {where}" for path, where in res.manual)
        msg = (f"{model}: {len(res.manual)} file(s) need a manual download: {steps}. Put them in {res.directory} "
               f"and run `scdrugmap weights fetch {model}` again to verify and record them")  # fmt: skip
        raise InputError(msg)
    click.echo(f"{model}: checkpoint complete in {res.directory} ({len(res.fetched)} fetched, "
               f"{len(res.present)} already there; recorded in {RECORD})")  # fmt: skip
