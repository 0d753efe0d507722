"""What every ``scdrugmap`` command shares: click settings, opening the store, KEY=VALUE options, tables.

The command layer (``scdrugmap.cli`` and the ``*commands`` modules it loads lazily) imports these;
nothing below the command layer does.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

__all__ = ["CONTEXT", "coerce", "new_store_guard", "open_store", "parse_kv", "print_table"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def open_store(ctx: click.Context, *, create: bool = False, write: bool = False):
    """Open the command's store; ``write=True`` holds the store lock until the command ends.

    The command runs in a :meth:`~scdrugmap.store.catalog.Store.session`: one catalog connection
    for the process instead of one per query.
    """
    from scdrugmap.store.catalog import Store

    st = Store.open(ctx.obj["store"], create=create)
    ctx.with_resource(st.session())
    if write:
        ctx.with_resource(st.writing())
    return st


@contextlib.contextmanager
def new_store_guard(ctx: click.Context) -> Iterator[None]:
    """Remove a store this command created if the command fails (nothing half-written)."""
    path = Path(ctx.obj["store"])
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.exists():
            shutil.rmtree(path)
        raise


def parse_kv(items: tuple[str, ...], what: str) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict; a malformed item or a key given twice differently → BadParameter."""
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        k, v = (part.strip() for part in item.split("=", 1))
        if k in out and out[k] != v:
            msg = f"{k} given twice with different values ({out[k]!r}, {v!r})"
            raise click.BadParameter(msg, param_hint=what)
        out[k] = v
    return out


def coerce(v: str) -> Any:
    """A command-line value as int, float, bool or the string itself."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def print_table(df, *, max_rows: int = 200) -> None:
    """Print a DataFrame as a plain table (``(no rows)`` when empty)."""
    import pandas as pd

    with pd.option_context("display.max_rows", max_rows, "display.max_columns", 50, "display.width", 160):
        click.echo(df.to_string(index=False) if len(df) else "(no rows)")
