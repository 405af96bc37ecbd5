"""The `dbt-klaviyo` command: a thin layer that parses arguments, runs, and maps the result
to an exit status: 0 all synced, 1 some records rejected or failed, 2 could not run."""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from dbt_klaviyo_sync.errors import SyncError
from dbt_klaviyo_sync.logs import configure, redact

if TYPE_CHECKING:
    from dbt_klaviyo_sync.runner import ModelResult

DEFAULT_BASE_URL = "https://a.klaviyo.com"
_MULTI_VALUE = {"--select", "-s"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Sync annotated dbt models to Klaviyo, sending only what changed."""


@cli.command()
@click.option(
    "--project-dir",
    type=click.Path(file_okay=False),
    help="The dbt project (default: as dbt finds it).",
)
@click.option(
    "--profiles-dir",
    type=click.Path(file_okay=False),
    help="Where profiles.yml is (default: as dbt finds it).",
)
@click.option("--target", "-t", help="The dbt target to read models from.")
@click.option(
    "--select",
    "-s",
    "select",
    multiple=True,
    help="Models to sync, by name or glob; several may follow one --select.",
)
@click.option(
    "--dry-run", is_flag=True, help="Show what would be sent; send nothing, change no state."
)
@click.option("--full-refresh", is_flag=True, help="Forget the snapshot and send every row again.")
@click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="DBT_KLAVIYO_STATE",
    help="The state file [default: <project>/.klaviyo_sync/state.duckdb].",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 16),
    default=4,
    show_default=True,
    help="Requests in flight at once.",
)
@click.option(
    "--fail-on-rejects",
    "reject_rate",
    type=click.FloatRange(0, 1),
    help="Exit 1 for rejects only when a model rejects more than this share of the rows it "
    "sent (0.05 = 5%). By default any reject exits 1. Failed records always exit 1.",
)
@click.option(
    "--job-timeout",
    type=click.FloatRange(min=1),
    default=1800,
    show_default=True,
    help="Seconds to wait for a bulk import job before leaving its rows for the next run.",
)
@click.option(
    "--timeout",
    "read_timeout",
    type=click.FloatRange(min=0.1),
    default=60,
    show_default=True,
    help="Seconds to wait for Klaviyo's answer before retrying the request.",
)
def sync(
    project_dir: str | None,
    profiles_dir: str | None,
    target: str | None,
    select: tuple[str, ...],
    dry_run: bool,
    full_refresh: bool,
    state_path: Path | None,
    concurrency: int,
    reject_rate: float | None,
    job_timeout: float,
    read_timeout: float,
) -> None:
    """Diff each annotated model against its last sync and send the changes to Klaviyo."""
    from dbt_klaviyo_sync.dbt import DbtProject
    from dbt_klaviyo_sync.runner import SyncOptions, run

    options = SyncOptions(
        base_url=os.environ.get("KLAVIYO_BASE_URL") or DEFAULT_BASE_URL,
        private_key=os.environ.get("KLAVIYO_PRIVATE_API_KEY") or None,
        public_key=os.environ.get("KLAVIYO_PUBLIC_API_KEY") or None,
        dry_run=dry_run,
        full_refresh=full_refresh,
        state_path=state_path,
        concurrency=concurrency,
        job_deadline=job_timeout,
        read_timeout=read_timeout,
        allow_insecure_http=os.environ.get("DBT_KLAVIYO_ALLOW_INSECURE_HTTP") == "1",
    )
    project = DbtProject.locate(project_dir, profiles_dir, target)
    results = run(project, select, options)
    _print_summary(results, dry_run)
    if any(r.counts.failed or r.rejects_too_many(reject_rate) for r in results):
        sys.exit(1)


def _print_summary(results: list[ModelResult], dry_run: bool) -> None:
    from dbt_klaviyo_sync.state import RunCounts

    # Off a terminal (CI logs, pipes) rich would squeeze the table into 80 columns.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    title = "Dry run: nothing was sent" if dry_run else "Klaviyo sync"
    table = Table(title=title, title_justify="left")
    columns = [f.name for f in fields(RunCounts)]
    table.add_column("model")
    for column in columns:
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r.model, *(f"{getattr(r.counts, c):,}" for c in columns))
    console.print(table)
    for r in results:
        for reject in r.rejects:
            where = f" {reject.column}" if reject.column else ""
            console.print(f"  rejected {r.model} {reject.key!r}{where}: {reject.reason}")
        if r.counts.rejected > len(r.rejects):
            more = r.counts.rejected - len(r.rejects)
            console.print(f"  ... and {more:,} more in the rejects table")
        for failure in r.failures:
            console.print(f"  failed {r.model} {failure} (sent again next run)")
        for key in r.planned:
            console.print(f"  would delete {r.model} {key!r}")


@cli.command()
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
    from dbt_klaviyo_sync.emulator import serve

    serve(
        host,
        port,
        private_key=os.environ.get("KLAVIYO_PRIVATE_API_KEY") or None,
        public_key=os.environ.get("KLAVIYO_PUBLIC_API_KEY") or None,
        rate_limits=rate_limit_scale if rate_limit_scale > 0 else False,
        job_seconds=job_seconds,
        validate=not no_validate,
    )


def _expand_multi_values(args: list[str]) -> list[str]:
    """Let `--select a b c` mean `--select a --select b --select c`, as in dbt."""
    expanded: list[str] = []
    option: str | None = None
    took_value = False
    for arg in args:
        if option and not arg.startswith("-"):
            expanded += [option, arg]
            took_value = True
            continue
        if option and not took_value:
            expanded.append(option)  # a --select without a value: let click complain
        option, took_value = (arg, False) if arg in _MULTI_VALUE else (None, False)
        if option is None:
            expanded.append(arg)
    if option and not took_value:
        expanded.append(option)
    return expanded


def main(argv: list[str] | None = None) -> None:
    configure(os.environ.get("DBT_KLAVIYO_LOG_LEVEL", "INFO"))
    args = _expand_multi_values(list(sys.argv[1:] if argv is None else argv))
    try:
        cli.main(args=args, prog_name="dbt-klaviyo", standalone_mode=False)
    except SyncError as exc:
        click.echo(redact(f"Error: {exc}"), err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(2)
    except SystemExit:
        raise
    except Exception:
        click.echo(
            redact("Internal error (please report it):\n" + traceback.format_exc()), err=True
        )
        sys.exit(2)
