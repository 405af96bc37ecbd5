"""The `dbt-klaviyo` command: a thin layer that parses arguments, calls the Python API
(`dbt_klaviyo_sync.api`), shows the result and maps it to an exit status: 0 all synced,
1 some records rejected or failed, 2 could not run."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import orjson

from dbt_klaviyo_sync.emulator.command import emulator as emulator_command
from dbt_klaviyo_sync.errors import ConfigurationError, SyncError
from dbt_klaviyo_sync.logs import configure, redact

if TYPE_CHECKING:
    from dbt_klaviyo_sync.runner import StopRequest
    from dbt_klaviyo_sync.warehouse import Warehouse

_MULTI_VALUE = {"--select", "-s", "--exclude"}
Decorator = Callable[[Callable[..., None]], Callable[..., None]]


def _set_log_level(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        configure(value)


def _set_log_format(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        configure(log_format=value)


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        configure("WARNING")


def _options(*options: Decorator) -> Decorator:
    """Several click options as one decorator, in the order given."""

    def apply(command: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


_logging_options = _options(
    click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        expose_value=False,
        is_eager=True,
        callback=_set_log_level,
        help="How much to log to stderr [default: info]. target/dbt-klaviyo.log gets info "
        "or finer.",
    ),
    click.option(
        "--log-format",
        type=click.Choice(["text", "json"], case_sensitive=False),
        expose_value=False,
        is_eager=True,
        callback=_set_log_format,
        help="json: one JSON object per log line (time, level, logger, message), on stderr "
        "and in target/dbt-klaviyo.log [default: text].",
    ),
    click.option(
        "--quiet",
        "-q",
        is_flag=True,
        expose_value=False,
        callback=_set_quiet,
        help="Only warnings and errors, and no progress bar; the summary still prints.",
    ),
)

# Left unset, each is dbt's to decide, from its DBT_* environment variables and defaults.
_project_options = _options(
    click.option(
        "--project-dir",
        type=click.Path(file_okay=False),
        help="The dbt project (default: DBT_PROJECT_DIR, or as dbt finds it).",
    ),
    click.option(
        "--profiles-dir",
        type=click.Path(file_okay=False),
        help="Where profiles.yml is (default: DBT_PROFILES_DIR, or as dbt finds it).",
    ),
    click.option(
        "--target",
        "-t",
        help="The dbt target to read models from (default: DBT_TARGET, or the profile's).",
    ),
    click.option("--vars", help="dbt vars, a YAML dictionary, as for `dbt --vars`."),
    click.option(
        "--select",
        "-s",
        "select",
        multiple=True,
        help="Models to sync, in dbt's selector syntax (names, tag:, path:, +model, ...); "
        "several may follow one --select.",
    ),
    click.option(
        "--exclude",
        multiple=True,
        help="Models to leave out, in dbt's selector syntax; several may follow one --exclude.",
    ),
    click.option("--selector", help="A selector of the project's selectors.yml, as in dbt."),
)

_state_option = click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="DBT_KLAVIYO_STATE",
    help="The state file [default: <project>/.klaviyo_sync/state.duckdb].",
)

_sync_options = _options(
    _project_options,
    click.option(
        "--full-refresh", is_flag=True, help="Forget the snapshot and send every row again."
    ),
    _state_option,
    click.option(
        "--build",
        is_flag=True,
        help="Run `dbt build` for the selected models first; sync those that built and "
        "passed their tests.",
    ),
    click.option(
        "--output",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="json: one JSON summary on stdout, for orchestrators.",
    ),
    click.option(
        "--concurrency",
        type=click.IntRange(1, 16),
        default=4,
        show_default=True,
        help="Requests in flight at once.",
    ),
    click.option(
        "--fail-on-rejects",
        "reject_rate",
        type=click.FloatRange(0, 1),
        help="Exit 1 for rejects only when a model rejects more than this share of the rows "
        "it sent (0.05 = 5%). By default any reject exits 1. Failed records always exit 1.",
    ),
    click.option(
        "--job-timeout",
        type=click.FloatRange(min=1),
        default=1800,
        show_default=True,
        help="Seconds to wait for a bulk import job before leaving its rows for the next run.",
    ),
    click.option(
        "--timeout",
        "read_timeout",
        type=click.FloatRange(min=0.1),
        default=60,
        show_default=True,
        help="Seconds one request may take, answer and all, before it is retried.",
    ),
    click.option(
        "--max-wait",
        type=click.FloatRange(min=0),
        default=300,
        show_default=True,
        help="Seconds one request may wait for Klaviyo's rate limits (Retry-After included); "
        "a longer wait fails its records for this run instead of sleeping.",
    ),
    click.option(
        "--allow-removals",
        is_flag=True,
        help="Go past each model's safety brake: a list mirror or delete model that would "
        "remove more than its max_removal_share of what the last sync left stops otherwise.",
    ),
    click.option(
        "--reconcile",
        is_flag=True,
        help="Also read each mirrored list's members from Klaviyo: remove those not in the "
        "model, add back model rows the list lost (as `reconcile: true` on a model does).",
    ),
    _logging_options,
)


def _show_versions(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """The tool's, dbt-core's and each installed adapter's versions, as `dbt --version`
    lists them (without its look-up of the latest versions on PyPI)."""
    if not value or ctx.resilient_parsing:
        return
    from dbt.version import __version__ as dbt_version

    from dbt_klaviyo_sync import __version__
    from dbt_klaviyo_sync.dbt import adapter_versions

    click.echo(f"dbt-klaviyo: {__version__}\ndbt-core: {dbt_version}")
    for name, version in adapter_versions():
        click.echo(f"dbt-{name}: {version}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_versions,
    help="Show the versions of dbt-klaviyo, dbt-core and the dbt adapters, and exit.",
)
@_logging_options
def cli() -> None:
    """Sync annotated dbt models to Klaviyo, sending only what changed.

    The logging options go before the command or after it, as in dbt. Every option can
    also be set with an environment variable DBT_KLAVIYO_<OPTION> (DBT_KLAVIYO_LOG_LEVEL,
    DBT_KLAVIYO_CONCURRENCY, ...), shown in each command's --help; an option on the command
    line wins.
    """


@cli.command()
@click.option(
    "--dry-run", is_flag=True, help="Show what would be sent; send nothing, change no state."
)
@_sync_options
def sync(dry_run: bool, **settings: Any) -> None:
    """Diff each annotated model against its last sync and send the changes to Klaviyo."""
    _sync(dry_run=dry_run, **settings)


@cli.command()
@_sync_options
def plan(**settings: Any) -> None:
    """Show what a sync would send, with sample records: `sync --dry-run`."""
    _sync(dry_run=True, **settings)


@contextmanager
def _stopped_by_signals(stop: StopRequest) -> Iterator[None]:
    """SIGINT and SIGTERM ask the run to stop: no new work, answers already received
    committed, the run recorded as interrupted, the summary printed, exit status 2. A
    second signal stops at once (what was not committed is sent again next run)."""

    def handle(number: int, frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.request()

    signals = (signal.SIGINT, signal.SIGTERM)
    before = {number: signal.signal(number, handle) for number in signals}
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def _sync(output: str, reject_rate: float | None, **settings: Any) -> None:
    from dbt_klaviyo_sync import report
    from dbt_klaviyo_sync.api import sync as run_sync
    from dbt_klaviyo_sync.progress import BarProgress, NoProgress
    from dbt_klaviyo_sync.runner import StopRequest

    quiet = logging.getLogger("dbt_klaviyo_sync").getEffectiveLevel() > logging.INFO
    live = output == "text" and not quiet and not settings["dry_run"] and sys.stderr.isatty()
    progress = BarProgress() if live else NoProgress()
    stop = StopRequest()
    try:
        with _stopped_by_signals(stop):
            summary = run_sync(
                fail_on_rejects=reject_rate, progress=progress, stop=stop, **settings
            )
    finally:
        progress.close()
    if output == "json":
        click.echo(
            orjson.dumps(summary.to_dict(), default=str, option=orjson.OPT_INDENT_2).decode()
        )
    else:
        report.summary(report.console(), summary)
        if summary.error:  # once: in the JSON, or here
            click.echo(f"Error: {summary.error}", err=True)
    sys.exit(summary.exit_status)


_history_options = _options(
    click.option("--project-dir", type=click.Path(file_okay=False), help="The dbt project."),
    click.option(
        "--profiles-dir",
        type=click.Path(file_okay=False),
        help="Where profiles.yml is, for a target that keeps the state in its warehouse.",
    ),
    click.option("--target", "-t", help="The dbt target whose sync history to read."),
    _state_option,
)


@cli.command()
@click.argument("model", required=False)
@_history_options
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@_logging_options
def status(model: str | None, runs: int, output: str, **where: Any) -> None:
    """The last runs of each synced model (or of MODEL): when, counts, rejects, time taken."""
    from dbt_klaviyo_sync import report

    with _history(**where) as warehouse:
        rows = warehouse.last_runs(model, runs)  # an unknown model: as for `rejects`
    if output == "json":
        click.echo(orjson.dumps(rows, default=str, option=orjson.OPT_INDENT_2).decode())
    elif rows:
        report.runs(report.console(), rows)
    else:
        click.echo("No syncs recorded yet.")


@cli.command()
@click.argument("model")
@_history_options
@click.option("--all", "every", is_flag=True, help="Every reject ever logged, not only open ones.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write all of them to this CSV file instead of printing.",
)
@_logging_options
def rejects(model: str, every: bool, limit: int, csv_path: Path | None, **where: Any) -> None:
    """MODEL's rejected records with their reasons: those still rejected (the row has not
    changed since), or with --all the whole log."""
    from dbt_klaviyo_sync import report
    from dbt_klaviyo_sync.summary import quantity

    with _history(**where) as warehouse:
        found = warehouse.rejects(model, every)
        total = found.count()
        if csv_path:
            found.export_csv(csv_path)
            click.echo(f"{quantity(total, 'rejected record')} of {model} written to {csv_path}")
            return
        report.rejects(report.console(), model, found.first(limit), total)


@cli.command("report")
@_history_options
@click.option(
    "--select",
    "-s",
    "select",
    multiple=True,
    help="Only these models, by name; several may follow one --select.",
)
@click.option(
    "--runs", type=click.IntRange(min=1), default=30, show_default=True, help="Runs per model."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The HTML file to write [default: <project>/target/klaviyo-report.html].",
)
@_logging_options
def report_command(select: tuple[str, ...], runs: int, out: Path | None, **where: Any) -> None:
    """Write the sync history as one HTML page: each model's runs as charts, its open
    rejects by reason and its last run. The page needs nothing else to open."""
    from datetime import UTC, datetime

    from dbt_klaviyo_sync.html_report import ModelHistory, render

    out = out or Path(where["project_dir"] or ".") / "target" / "klaviyo-report.html"
    with _history(**where) as warehouse:
        rows = warehouse.last_runs(None, runs)
        synced = sorted({row["model"] for row in rows})
        unknown = [name for name in select if name not in synced]
        if unknown:
            raise ConfigurationError(
                f"model '{unknown[0]}' has never been synced with this state (synced models: "
                f"{', '.join(synced) or 'none'})"
            )
        histories = [
            ModelHistory(
                model,
                [row for row in reversed(rows) if row["model"] == model],
                warehouse.rejects(model).by_reason(examples=3),
            )
            for model in synced
            if not select or model in select
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(histories, _source(where), datetime.now(UTC)), encoding="utf-8")
    shown = sum(len(history.runs) for history in histories)
    click.echo(f"Wrote {_count(shown, 'run')} of {_count(len(histories), 'model')} to {out}")


def _count(number: int, thing: str) -> str:
    return f"{number:,} {thing}{'' if number == 1 else 's'}"


def _source(where: dict[str, Any]) -> str:
    """Where the history was read, in a few words, for the page's header."""
    if where["state_path"]:
        return f"the state file {where['state_path']}"
    target = f" (target {where['target']})" if where["target"] else ""
    project = Path(where["project_dir"] or ".").resolve()
    return f"the sync state of the dbt project {project}{target}"


@cli.command()
@_project_options
@_logging_options
def validate(**settings: Any) -> None:
    """Check annotations, mapped columns, credentials and lists, sending nothing. Exit
    status 0 when a sync could run, 2 when not."""
    from dbt_klaviyo_sync import report
    from dbt_klaviyo_sync.api import validate as run_checks

    found = run_checks(**settings)
    report.checks(report.console(), found)
    sys.exit(0 if all(check.ok for check in found) else 2)


@cli.command()
@click.option(
    "--project-dir",
    type=click.Path(file_okay=False),
    help="The dbt project (default: DBT_PROJECT_DIR, or the nearest folder up from here with "
    "a dbt_project.yml).",
)
@click.option(
    "--no-deps", is_flag=True, help="Do not run `dbt deps` (offline, or to run it later)."
)
@click.option(
    "--local",
    metavar="PATH",
    help="For development: a `local: PATH` entry (a checkout of dbt-klaviyo-sync) instead of "
    "the git entry at the tool's version.",
)
@_logging_options
def init(project_dir: str | None, no_deps: bool, local: str | None) -> None:
    """Add the dbt package (at this tool's version) to the dbt project's packages.yml and
    an annotated example model config, then run `dbt deps`. Entries and files already there
    are left as they are, so running it again changes nothing."""
    from dbt_klaviyo_sync.scaffold import init as set_up

    here = _project_root(project_dir or os.environ.get("DBT_PROJECT_DIR"))
    set_up(here, local, run_deps=not no_deps, say=click.echo)


@contextmanager
def _history(
    project_dir: str | None, profiles_dir: str | None, target: str | None, state_path: Path | None
) -> Iterator[Warehouse]:
    """The sync state, read-only, for the history commands: the state file of a dbt-duckdb
    project (found without starting dbt when it is in its default place), or the state
    schema in the warehouse of another target. The project is found as dbt finds it:
    --project-dir, DBT_PROJECT_DIR, or the nearest folder up from here with a
    dbt_project.yml."""
    from dbt_klaviyo_sync.warehouse.duckdb import default_path, open_duckdb

    here = _project_root(project_dir or os.environ.get("DBT_PROJECT_DIR"))
    if state_path is None and default_path(here).is_file():
        state_path = default_path(here)
    if state_path is None:
        from dbt_klaviyo_sync.dbt import DbtArgs, DbtProject, current_manifest
        from dbt_klaviyo_sync.warehouse import open_warehouse

        project = DbtProject.locate(DbtArgs(project_dir, profiles_dir, target))
        if project.adapter_type == "duckdb":
            state_path = default_path(project.project_dir)
        else:
            current_manifest(project)
            with open_warehouse(project, [], None, dry_run=True) as (warehouse, _, _):
                yield warehouse
            return
    if not state_path.is_file():
        raise ConfigurationError(f"no sync state at {state_path}: nothing has been synced yet.")
    with open_duckdb(state_path, {}, read_only=True) as warehouse:
        yield warehouse


def _project_root(given: str | None) -> Path:
    """The dbt project folder as dbt 1.10+ resolves a missing --project-dir: the working
    directory or the nearest of its parents that holds a dbt_project.yml."""
    if given:
        return Path(given).resolve()
    here = Path.cwd()
    return next((p for p in (here, *here.parents) if (p / "dbt_project.yml").is_file()), here)


# The emulator's command lives in its package, which imports nothing of the client; it
# takes the logging options every command takes (click adds them to a command object).
cli.add_command(_logging_options(emulator_command))  # type: ignore[arg-type]


def _take_environment(group: click.Group, prefix: str = "DBT_KLAVIYO_") -> None:
    """Give every option an environment variable, DBT_KLAVIYO_ and its long name
    (`--job-timeout`: DBT_KLAVIYO_JOB_TIMEOUT), the same for every command, and show it in
    --help. The logging options read theirs once, before the command: repeated after it,
    only what the command line says counts, wherever it is said."""
    shared = {param.name for param in group.params}
    for command in [group, *group.commands.values()]:
        for param in command.params:
            if not isinstance(param, click.Option) or param.name in ("help", "version"):
                continue
            if command is not group and param.name in shared:
                continue
            if param.envvar is None:
                longest = max(param.opts, key=len).lstrip("-")
                param.envvar = prefix + longest.upper().replace("-", "_")
            param.show_envvar = True


_take_environment(cli)


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


#: glibc's mallopt parameter for the size from which a buffer gets pages of its own.
_M_MMAP_THRESHOLD = -3


def _release_large_buffers() -> None:
    """Have glibc's malloc give buffers of 128 KiB and more (a bulk job's body of up to
    5 MB, its answer, the driver's rows) back to the system as soon as they are freed. By
    default glibc raises that threshold to the largest buffer freed so far, and later ones
    come from the heap, where the small objects around them keep the pages resident: about
    12 MB more peak memory in a sync of 200,000 profiles. Other C libraries: no change."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def _arrow_returns_freed_memory() -> None:
    """Have Arrow's allocator (mimalloc) give freed pages back at once, unless
    MIMALLOC_PURGE_DELAY says otherwise; set before Arrow is loaded. By default it keeps
    them a while for reuse: 20 MB more at the peak of a PostgreSQL sync of 200,000
    profiles (263 against 243 MB). The C library's allocator saved 10 MB more, but mapped
    and unmapped every large buffer: a DuckDB first sync of 1M profiles took 19.2 s
    against 17.8 s."""
    os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")


def main(argv: list[str] | None = None) -> None:
    _release_large_buffers()
    _arrow_returns_freed_memory()
    configure("INFO", "text")  # until the options (or DBT_KLAVIYO_LOG_*) say otherwise
    args = _expand_multi_values(list(sys.argv[1:] if argv is None else argv))
    try:
        cli.main(args=args, prog_name="dbt-klaviyo", standalone_mode=False)
    except SyncError as exc:
        click.echo(redact(f"Error: {exc}"), err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo(
            "Stopped at once. Answers not yet recorded are sent again on the next run, "
            "which is safe.",
            err=True,
        )
        sys.exit(2)
    except SystemExit:
        raise
    except Exception as exc:
        # Never a traceback on the terminal: it could carry what a library put in it.
        logging.getLogger(__name__).debug("%s", redact(traceback.format_exc()))
        click.echo(
            redact(
                f"Internal error (please report it, with the output of --log-level debug): "
                f"{type(exc).__name__}: {exc}"
            ),
            err=True,
        )
        sys.exit(2)


def run() -> NoReturn:
    """The `dbt-klaviyo` command: `main`, then an exit without the interpreter's teardown,
    which frees every module and object one by one (about 0.1 s, a tenth of a no-op sync
    on a million rows). The exit handlers still run (logging's shutdown, the semaphores
    dbt's adapters created), and the output is flushed; the state is committed as the
    sync goes. `main` itself exits normally, for callers in the same process."""
    try:
        main()
        status = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    atexit._run_exitfuncs()  # what a normal exit runs before the teardown
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # closed, or its reader went away
            stream.flush()
    os._exit(status)
