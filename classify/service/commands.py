"""``scdrugmap serve``: run the service with uvicorn."""

from __future__ import annotations

import ipaddress

import click

from scdrugmap.store.errors import InputError

__all__ = ["check_bind", "serve"]


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a token.

    Parameters
    ----------
    host
        Address or host name to bind.
    token
        The service token, if any.

    Raises
    ------
    InputError
        ``host`` is not a loopback address (127.0.0.0/8, ::1, localhost) and no token is set.
    """
    if token:
        return
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        msg = (
            f"binding to {host} (not a loopback address) needs a token: pass --token or set SCDRUGMAP_TOKEN; "
            "clients then send 'Authorization: Bearer TOKEN'"
        )
        raise InputError(msg)


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (non-loopback needs --token)."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--token", envvar="SCDRUGMAP_TOKEN", help="Require this token on API requests; env SCDRUGMAP_TOKEN."
)
@click.option(
    "--max-upload-mb", default=500.0, show_default=True, type=float, help="Upload size limit of /predict."
)
@click.option("--sql-row-limit", default=10_000, show_default=True, help="Most rows /sql returns.")
@click.option(
    "--sql-time-limit", default=10.0, show_default=True, help="Seconds before /sql interrupts a query."
)
@click.option("--workers", default=2, show_default=True, help="Prediction jobs run at once.")
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    token: str | None,
    max_upload_mb: float,
    sql_row_limit: int,
    sql_time_limit: float,
    workers: int,
    log_level: str,
) -> None:
    """Serve the store over HTTP: JSON API (/docs), per-cell predictions and the web page (/)."""
    import uvicorn

    from scdrugmap.classify.service.app import create_app

    check_bind(host, token)
    app = create_app(
        ctx.obj["store"],
        token=token,
        max_upload_mb=max_upload_mb,
        sql_row_limit=sql_row_limit,
        sql_time_limit_s=sql_time_limit,
        workers=workers,
    )
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"scdrugmap service on http://{shown}:{port}/ (API docs at /docs); Ctrl-C stops it")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
