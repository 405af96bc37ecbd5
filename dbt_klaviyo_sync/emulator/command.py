"""`dbt-klaviyo emulator` and `python -m dbt_klaviyo_sync.emulator`: one command, kept in
the emulator's package so that running the emulator imports nothing of the client."""

from __future__ import annotations

import os

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=int, help="0 picks a free port.")
@click.option(
    "--rate-limit-scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Multiply Klaviyo's documented rate limits; 0 turns them off.",
)
@click.option(
    "--job-seconds",
    type=float,
    default=0.5,
    show_default=True,
    help="How long bulk import jobs stay queued and processing.",
)
@click.option("--no-validate", is_flag=True, help="Skip OpenAPI validation of requests.")
def emulator(
    host: str, port: int, rate_limit_scale: float, job_seconds: float, no_validate: bool
) -> None:
    """Run the bundled Klaviyo emulator, for demos and CI.

    It accepts only the keys in KLAVIYO_PRIVATE_API_KEY and KLAVIYO_PUBLIC_API_KEY when
    they are set, and any key otherwise. Its state is at /__emulator__/state.
    """
    try:
        from .server import serve  # the server's imports load only when it runs
    except ModuleNotFoundError as exc:  # installed without the [emulator] extra
        missing = (exc.name or "werkzeug").partition(".")[0]
        click.echo(
            f"Error: the emulator needs {missing}, which is not installed: "
            "pip install 'dbt-klaviyo-sync[emulator]'",
            err=True,
        )
        raise SystemExit(2) from None

    serve(
        host,
        port,
        private_key=os.environ.get("KLAVIYO_PRIVATE_API_KEY") or None,
        public_key=os.environ.get("KLAVIYO_PUBLIC_API_KEY") or None,
        rate_limits=rate_limit_scale if rate_limit_scale > 0 else False,
        job_seconds=job_seconds,
        validate=not no_validate,
    )
