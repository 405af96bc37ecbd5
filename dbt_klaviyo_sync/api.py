"""The Python API, for orchestrators (Airflow, Dagster, Prefect) and for the CLI itself.

    from dbt_klaviyo_sync import sync

    summary = sync("path/to/dbt/project", select=["customers"])
    if summary.exit_status:
        raise RuntimeError(summary.reason)

The dbt project, profile and target are found as `dbt build` started from the same working
directory with the same arguments would find them: the `DBT_*` environment variables count,
and dbt-duckdb opens a relative `path:` from the working directory. Keys are read from the
environment only (KLAVIYO_PRIVATE_API_KEY, KLAVIYO_PUBLIC_API_KEY), as for the CLI; so is
KLAVIYO_BASE_URL. Neither function raises for a problem the user can fix: it is in the
summary, with exit status 2.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from dbt_klaviyo_sync import __version__
from dbt_klaviyo_sync.dbt import DbtArgs, DbtProject, build, check_package, select_models
from dbt_klaviyo_sync.errors import AnnotationErrors, SyncError
from dbt_klaviyo_sync.logs import add_log_file, api_key, redact
from dbt_klaviyo_sync.manifest import ModelNode
from dbt_klaviyo_sync.progress import ProgressReporter
from dbt_klaviyo_sync.runner import (
    StopRequest,
    SyncOptions,
    build_specs,
    identify_account,
    make_client,
    preflight,
    run,
)
from dbt_klaviyo_sync.spec import SyncSpec
from dbt_klaviyo_sync.summary import ModelResult, RunSummary
from dbt_klaviyo_sync.warehouse import open_warehouse

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://a.klaviyo.com"
LOG_FILE = "dbt-klaviyo.log"


def sync(
    project_dir: str | Path | None = None,
    *,
    profiles_dir: str | Path | None = None,
    target: str | None = None,
    select: Iterable[str] | str = (),
    exclude: Iterable[str] | str = (),
    selector: str | None = None,
    vars: Mapping[str, Any] | str | None = None,
    dry_run: bool = False,
    full_refresh: bool = False,
    build: bool = False,
    state_path: str | Path | None = None,
    fail_on_rejects: float | None = None,
    concurrency: int = 4,
    job_timeout: float = 1800.0,
    read_timeout: float = 60.0,
    max_wait: float = 300.0,
    allow_removals: bool = False,
    reconcile: bool = False,
    progress: ProgressReporter | None = None,
    stop: StopRequest | None = None,
) -> RunSummary:
    """Sync the selected annotated models (all of them by default) and say what happened.

    `select`, `exclude` and `selector` take dbt's selector syntax, and `vars` dbt's vars (a
    dict, or YAML as for `dbt --vars`), as the CLI's options of the same names do.
    `build=True` runs `dbt build` for them first and syncs only those that built and
    passed their tests. `fail_on_rejects` is the share of a model's rows standing rejected
    above which the exit status is 1 (by default any reject is). `max_wait` caps the seconds
    one request may wait for Klaviyo's rate limits; `allow_removals` goes past every model's
    safety brake on removals and deletions; `reconcile` reads every mirrored list back and
    removes the members its model does not have (as `reconcile: true` on a model does).
    `stop.request()` (from a signal handler, say)
    ends the run early, losing nothing.
    """
    summary = RunSummary(dry_run=dry_run, reject_rate=fail_on_rejects)
    started = time.monotonic()
    try:
        project = _project(project_dir, profiles_dir, target, select, exclude, selector, vars)
        options = _options(
            dry_run=dry_run,
            full_refresh=full_refresh,
            state_path=Path(state_path) if state_path else None,
            concurrency=concurrency,
            job_deadline=job_timeout,
            read_timeout=read_timeout,
            max_wait=max_wait,
            allow_removals=allow_removals,
            reconcile=reconcile,
        )
        with _logged_to(project):
            _check_package(project)
            models = select_models(project)
            log.debug(
                "the dbt project (%s) and its models in %.2f s",
                "loaded by dbt" if project.loaded is not None else "as resolved before",
                time.monotonic() - started,
            )
            if build:
                models = _build(project, models, summary)
            if models:
                run(project, models, options, summary, progress, stop)
    except SyncError as exc:
        summary.error = redact(str(exc))
    finally:
        summary.seconds = time.monotonic() - started
        log.debug("the sync took %.2f s", summary.seconds)
    return summary


def _build(project: DbtProject, models: list[ModelNode], summary: RunSummary) -> list[ModelNode]:
    """`dbt build` the selected annotated models; those to sync. Those that did not build,
    or failed a test, get a result that says so (exit status 2)."""
    good = build(project, models)
    for model in models:
        if model.unique_id not in good:
            summary.models.append(
                ModelResult(
                    model.name,
                    error="`dbt build` failed for this model or one of its tests; not synced",
                )
            )
    return [m for m in models if m.unique_id in good]


@dataclass
class Check:
    """One thing `validate` checked, and what is wrong with it, if anything."""

    what: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(
    project_dir: str | Path | None = None,
    *,
    profiles_dir: str | Path | None = None,
    target: str | None = None,
    select: Iterable[str] | str = (),
    exclude: Iterable[str] | str = (),
    selector: str | None = None,
    vars: Mapping[str, Any] | str | None = None,
) -> list[Check]:
    """Check everything a sync needs, sending nothing: the annotations, each mapped column
    in the built relation, the credentials (one cheap read) and each mirrored list."""
    checks: list[Check] = []

    def check(what: str) -> Check:
        checks.append(Check(what))
        return checks[-1]

    try:
        project = _project(project_dir, profiles_dir, target, select, exclude, selector, vars)
        with _logged_to(project):
            _validate(project, check)
    except SyncError as exc:
        check("the project").problems.append(redact(str(exc)))
    return checks


def _validate(project: DbtProject, check: Callable[[str], Check]) -> None:
    package = check(f"the dbt package klaviyo_sync, if installed, is dbt-klaviyo's {__version__}")
    try:
        _check_package(project)
    except SyncError as exc:
        package.problems.append(str(exc))
    annotations = check("annotations")
    models = select_models(project)
    try:
        specs = build_specs(models)
    except AnnotationErrors as exc:
        annotations.problems += [str(p) for p in exc.problems]
        return
    annotations.what = f"annotations of {len(specs)} model(s): {', '.join(s.model for s in specs)}"
    columns = check(
        "each mapped column is in the built relation, and every row has a sync key of its own "
        "(values are checked row by row by `plan`)"
    )
    with open_warehouse(project, models, None, dry_run=True, state=False) as (warehouse, _, _):
        for spec in specs:
            try:
                warehouse.describe(spec)
                column = spec.fields[0].column
                columns.problems += [
                    f"model '{spec.model}', column '{column}': {problem}"
                    for problem in warehouse.key_problems(spec).messages()
                ]
            except AnnotationErrors as exc:
                columns.problems += [str(p) for p in exc.problems]
            except SyncError as exc:
                columns.problems.append(str(exc))
    _validate_credentials(specs, check("credentials, and each mirrored list exists"))


def _validate_credentials(specs: list[SyncSpec], credentials: Check) -> None:
    options = _options()
    if any(spec.api == "client" for spec in specs) and not options.public_key:
        credentials.problems.append(
            "KLAVIYO_PUBLIC_API_KEY is not set; models with `api: client` need it "
            f"({', '.join(s.model for s in specs if s.api == 'client')})"
        )
    client = make_client(options)
    try:
        account = identify_account(client, specs, options)
        credentials.what = f"credentials (Klaviyo account {account}), and each mirrored list exists"
        preflight(client, specs)
    except SyncError as exc:
        credentials.problems.append(redact(str(exc)))
    finally:
        client.close()


def _check_package(project: DbtProject) -> None:
    """Stop for a dbt package of another minor version than the tool; warn for a patch."""
    warning = check_package(project, __version__)
    if warning:
        log.warning("Warning: %s", warning)


def _options(**settings: Any) -> SyncOptions:
    """Options with the endpoint and keys from the environment, the only place for keys."""
    return SyncOptions(
        base_url=os.environ.get("KLAVIYO_BASE_URL") or DEFAULT_BASE_URL,
        private_key=api_key("KLAVIYO_PRIVATE_API_KEY"),
        public_key=api_key("KLAVIYO_PUBLIC_API_KEY"),
        allow_insecure_http=os.environ.get("DBT_KLAVIYO_ALLOW_INSECURE_HTTP") == "1",
        **settings,
    )


def _project(
    project_dir: str | Path | None,
    profiles_dir: str | Path | None,
    target: str | None,
    select: Iterable[str] | str,
    exclude: Iterable[str] | str,
    selector: str | None,
    vars: Mapping[str, Any] | str | None,
) -> DbtProject:
    return DbtProject.locate(
        DbtArgs(
            project_dir=str(project_dir) if project_dir else None,
            profiles_dir=str(profiles_dir) if profiles_dir else None,
            target=target,
            vars=vars if isinstance(vars, str) or vars is None else orjson.dumps(vars).decode(),
            select=_words(select),
            exclude=_words(exclude),
            selector=selector,
        )
    )


def _words(selection: Iterable[str] | str) -> tuple[str, ...]:
    """A selection as dbt takes it: one string, or several (each may hold several words)."""
    return (selection,) if isinstance(selection, str) else tuple(selection)


@contextmanager
def _logged_to(project: DbtProject) -> Iterator[None]:
    """Log this run, keys scrubbed, to target/dbt-klaviyo.log, next to dbt's own output."""
    with add_log_file(project.target_path / LOG_FILE):
        yield
