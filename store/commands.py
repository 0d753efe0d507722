"""Click glue for store-level concerns: the ``doctor`` command and the CLI's last-resort error line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

__all__ = ["doctor", "failure_exception"]


class _Failed(click.ClickException):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def failure_exception(exc: BaseException, store: str | Path) -> click.ClickException:
    """One line for an exception that is not scdrugmap's own: a known failure family, or a summary.

    Parameters
    ----------
    exc
        What ended the command.
    store
        The command's store directory (named in messages).

    Returns
    -------
    click.ClickException
        Printed by click as ``Error: …``; exit status 1 (130 for Ctrl-C). Unknown exceptions
        say where their full traceback was written (:func:`store.failures.write_traceback`).
    """
    from scdrugmap.store.failures import explain, write_traceback

    known = explain(exc, store)
    if known is not None:
        return _Failed(known.message, known.exit_code)
    where = write_traceback(exc, " ".join(["scdrugmap", *sys.argv[1:]]))
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    saved = f"full traceback in {where}" if where else "the traceback could not be saved"
    return _Failed(f"unexpected {type(exc).__name__}: {first} ({saved}; rerun with --debug to show it)", 1)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--repair", is_flag=True, help="Also repair what is safe (orphan files, unreadable chunks' rows)."
)
@click.pass_context
def doctor(ctx: click.Context, repair: bool) -> None:
    """Check catalog ↔ dataset files ↔ Zarr arrays; report (exit 1 if anything is left unrepaired)."""
    from scdrugmap.store import Store
    from scdrugmap.store.doctor import check_store

    findings = check_store(Store.open(ctx.obj["store"]), repair=repair)
    for f in findings:
        state = "repaired" if f.repaired else ("repair with --repair" if f.repairable else "not repairable")
        click.echo(f"{f.kind}: {f.path}: {f.detail} [{state}]")
    left = [f for f in findings if not f.repaired]
    click.echo(
        f"{len(findings)} finding(s), {len(findings) - len(left)} repaired"
        if findings
        else "store is consistent"
    )
    if left:
        ctx.exit(1)
