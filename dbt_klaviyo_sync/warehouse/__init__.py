"""The warehouse seam: one interface to the models and the sync state, one implementation
per engine (`warehouse/<engine>/`). The runner, the CLI and the history commands talk to a
`Warehouse` and to nothing else of the engine's; what crosses the seam is in `changeset`.

A run (or a history command) opens one warehouse with `open_warehouse` and keeps it for
its length. DuckDB keeps the sync state in a local file next to the dbt project (dbt-duckdb
locks its own database file while dbt runs); other engines keep it in a schema of the
user's warehouse, where the diff runs too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from dbt_klaviyo_sync.changeset import (
    ChangeCounts,
    JournaledUnit,
    KeyProblems,
    RunCounts,
    SyncIdentity,
)
from dbt_klaviyo_sync.errors import ConfigurationError
from dbt_klaviyo_sync.spec import SyncSpec

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from dbt_klaviyo_sync.dbt import DbtProject
    from dbt_klaviyo_sync.manifest import ModelNode


class JobRecorder(Protocol):
    """Records a unit's bulk job id, from whichever sending thread created the job."""

    def __call__(self, unit: str, job_id: str) -> None: ...

    def close(self) -> None: ...


class RejectsView(Protocol):
    """A model's rejects, as a query to count, page through or export."""

    def count(self) -> int: ...

    def first(self, limit: int) -> list[tuple[Any, ...]]: ...

    def export_csv(self, path: Path) -> None: ...

    def by_reason(self, examples: int) -> list[ReasonGroup]:
        """The rejects grouped by code and reason, most frequent first, with a few keys."""


@dataclass(frozen=True)
class ReasonGroup:
    """Rejects that share a code and a reason: how many, and the first few keys (None for
    a row without a sync key)."""

    code: str
    reason: str
    count: int
    examples: list[str | None]


def reason_groups_sql(query: str, examples: int) -> str:
    """Group the rows of a rejects query (`REJECT_COLUMNS`) by code and reason, keeping the
    first `examples` keys of each: one row per example, in SQL every engine runs."""
    return f"""select code, reason, total, key from (
        select code, reason, key, count(*) over (partition by code, reason) as total,
            row_number() over (partition by code, reason order by key) as n
        from ({query}) as found) as grouped
        where n <= {int(examples)} order by total desc, code, reason, n"""


def reason_groups(rows: list[tuple[Any, ...]]) -> list[ReasonGroup]:
    """The groups of `reason_groups_sql`'s rows, in their order."""
    groups: dict[tuple[str, str], ReasonGroup] = {}
    for code, reason, total, key in rows:
        group = groups.setdefault((code, reason), ReasonGroup(code, reason, int(total), []))
        group.examples.append(key)
    return list(groups.values())


class Warehouse(Protocol):
    """One run's access to the models and to the sync state, wherever they live.

    Writes are committed as they are made (a crash keeps what was committed); a dry run's
    warehouse keeps nothing of what it does."""

    #: How this warehouse fingerprints rows (recorded per sync), e.g. "md5-v1".
    fingerprints: str
    #: Answers are committed when this many records have gathered (or a few seconds
    #: passed), in whole multiples of it when more have, as far as bulk jobs' rows make
    #: up the difference: as many as a commit's fixed cost is worth, and no more, as the
    #: records wait in the client's memory until then.
    commit_records: int
    #: Whether records sent in journaled bulk jobs keep their values' JSON (those shaped in
    #: Arrow have it) until their answers are committed, so that the commit need not read
    #: the values back from the journal: worth its memory where that read is dear.
    values_until_commit: bool
    #: How many batches of changed rows are shaped ahead of the sending, on a thread of
    #: their own (`ahead.read_ahead`; 0: none, on the sending thread). Worth their memory
    #: where the client's CPU bounds a first sync, not where it waits on a server.
    shaped_ahead: int

    # -- the models -------------------------------------------------------------------

    def describe(self, spec: SyncSpec) -> None:
        """Check that the model can be read and has its mapped columns: `ModelError` when
        the model has no relation to read (stop it alone), `AnnotationErrors` for missing
        columns (stop the run)."""

    def key_problems(self, spec: SyncSpec) -> KeyProblems:
        """The model's NULL and duplicated sync keys, over all its rows: what `validate`
        must not call ok, as the next sync rejects those rows."""

    def readable(self, spec: SyncSpec) -> None:
        """`ModelError` when the model has no relation to read (not built, ephemeral)."""

    # -- which sync ------------------------------------------------------------------

    def has_syncs(self) -> bool:
        """Whether any sync was ever recorded here (an empty state is a fresh one)."""

    def accounts(self, spec: SyncSpec, target: str, base_url: str) -> dict[str, str | None]:
        """The syncs recorded for this model's object, behaviour, list, target and URL,
        whatever the Klaviyo account: their ids, with the account of each."""

    def resolved(self, sync: SyncIdentity, spec: SyncSpec) -> str:
        """The id a dry run reads (which registers nothing)."""

    def register(self, sync: SyncIdentity, spec: SyncSpec) -> None:
        """Record what the sync id stands for; adopt a state from before accounts."""

    def rebase(self, spec: SyncSpec, sid: str) -> int | None:
        """Carry a sync recorded by an earlier version over to today's keys and
        fingerprints without sending anything: how many rows, or None if nothing to do."""

    def forget(self, sid: str, *, keep_accepted: bool) -> None:
        """`--full-refresh`: every row counts as never sent (with `keep_accepted`, what
        Klaviyo accepted stays done), and rejected rows are tried again."""

    # -- a run's record --------------------------------------------------------------

    def start_run(self, sid: str, model: str, *, full_refresh: bool) -> str: ...

    def finish_run(
        self,
        run_id: str,
        counts: RunCounts,
        status: str,
        error: str | None = None,
        *,
        rate_limit_seconds: float = 0.0,
    ) -> None:
        """Record how the run ended; `rate_limit_seconds` is how long its requests
        waited for Klaviyo's rate limits."""

    # -- the journal of what is in flight ----------------------------------------------

    def journal(self, sid: str, unit: str, rows: pa.Table) -> None:
        """Write down a unit's records (`JOURNAL_SCHEMA`) before they are sent."""

    def job_recorder(self, sid: str) -> JobRecorder: ...

    def journaled_units(self, sid: str) -> list[JournaledUnit]:
        """What an earlier run sent and never saw answered, unit by unit, oldest first."""

    def drop_journal(self, sid: str, units: list[str]) -> None:
        """Forget journaled units whose records may simply be sent again."""

    # -- the diff ----------------------------------------------------------------------

    def diff(self, spec: SyncSpec, sid: str, held: list[str]) -> ChangeCounts:
        """Work out the rows to act on (kept until the next `diff`), leaving out those of
        the `held` journal units (bulk jobs of an earlier run still running)."""

    def changes(self, kinds: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
        """Stream the rows of these change kinds in Arrow batches (`changeset` columns)."""

    def model_keys(self, spec: SyncSpec) -> set[str]:
        """Every sync key of the model, written as `KEY` is (for a list reconcile)."""

    def standing_rejects(self, sid: str) -> int:
        """Rows refused earlier and not tried again in this diff."""

    def accepted_count(self, sid: str) -> int:
        """How many of the sync's rows Klaviyo has accepted (what the last sync left)."""

    def accepted_values(self, sid: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        """What Klaviyo last accepted for these keys, field by field (for a plan), of the
        keys it accepted: empty where the values are unknown (rows of a bulk job followed
        after a crash, where the journal does without them: `values_until_commit`)."""

    # -- the answers ---------------------------------------------------------------------

    def commit(self, sid: str, run_id: str, model: str, outcomes: pa.Table) -> None:
        """Record a batch's answers (`OUTCOME_SCHEMA`) in one transaction."""

    def forget_removed(self, sid: str) -> None:
        """Drop the rows of the last diff that left the model, so that they are sent
        again if they come back (upserts and updates leave Klaviyo alone for them)."""

    def idle(self) -> None:
        """The sync has nothing to do but wait for Klaviyo's rate limit: a moment for
        upkeep that would otherwise stall it later (DuckDB checkpointing the state)."""

    # -- the history -------------------------------------------------------------------

    def last_runs(self, model: str | None, runs: int) -> list[dict[str, Any]]:
        """The last `runs` runs of each synced model (or of one), newest first."""

    def rejects(self, model: str, every: bool = False) -> RejectsView:
        """The model's outstanding rejects (or, with `every`, every reject ever logged)."""


@contextmanager
def open_warehouse(
    project: DbtProject,
    models: list[ModelNode],
    state_path: Path | None,
    *,
    dry_run: bool,
    state: bool = True,
) -> Iterator[tuple[Warehouse, str, str]]:
    """The warehouse of the project's target, for one run: with the target's name and where
    the sync state lives (for messages). A dry run's warehouse keeps nothing; without
    `state`, the sync state is not even read (to check the models alone)."""
    kind = project.adapter_type
    if kind == "duckdb":
        with _open_duckdb(project, models, state_path, dry_run=dry_run, state=state) as opened:
            yield opened
        return
    if state_path is not None:
        raise ConfigurationError(
            f"--state (or DBT_KLAVIYO_STATE) names a state file, which only dbt-duckdb targets "
            f"keep; the {kind} target '{project.target_name}' keeps the sync state in a schema "
            "of its warehouse (the var klaviyo_sync_schema, klaviyo_sync by default)."
        )
    from dbt_klaviyo_sync.dbt import adapter
    from dbt_klaviyo_sync.warehouse.adapter import AdapterWarehouse

    for model in models:
        log.info(
            "%s: reading %s from the %s target '%s'",
            model.name,
            model.relation_name,
            kind,
            project.target_name,
        )
    with adapter(project) as found:
        warehouse = AdapterWarehouse(found, dry_run=dry_run or not state)
        try:
            yield warehouse, project.target_name, f"schema {warehouse.schema} of the warehouse"
        finally:
            warehouse.close()


@contextmanager
def _open_duckdb(
    project: DbtProject,
    models: list[ModelNode],
    state_path: Path | None,
    *,
    dry_run: bool,
    state: bool,
) -> Iterator[tuple[Warehouse, str, str]]:
    from dbt_klaviyo_sync.dbt import load_warehouse
    from dbt_klaviyo_sync.warehouse.duckdb import default_path, open_duckdb

    files = load_warehouse(project, models)
    path = (state_path or default_path(project.project_dir)).resolve()
    # The state file, when profiles.yml attaches it (to read the history through dbt), is
    # opened on its own, not as one of the warehouse's databases.
    databases = {name: file for name, file in files.databases.items() if file != path}
    in_memory = not state or (dry_run and not path.exists())  # an empty state in memory
    with open_duckdb(None if in_memory else path, databases, read_only=dry_run) as warehouse:
        yield warehouse, files.target_name, str(path)
