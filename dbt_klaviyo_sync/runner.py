"""Orchestration only: for each annotated model, diff, then send, then commit.

Everything is checked before anything is sent: the annotations of every selected model,
that each model is built and has its columns, and the credentials. Then each model is
diffed in DuckDB, its changed rows are streamed in batches, shaped into requests and sent
by a small pool of workers, and each answer is committed as soon as it arrives: accepted
records to the snapshot, rejected ones to the rejects table. A crash loses at most the
batches in flight, which the next run sends again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from dbt_klaviyo_sync import diff, payloads
from dbt_klaviyo_sync.dbt import DbtProject, load_warehouse
from dbt_klaviyo_sync.errors import (
    AnnotationErrors,
    ApiUnavailableError,
    ConfigurationError,
    TransientApiError,
)
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient, KlaviyoRejected
from dbt_klaviyo_sync.klaviyo.deletions import ProfileDeleter
from dbt_klaviyo_sync.klaviyo.events import EventSender
from dbt_klaviyo_sync.klaviyo.lists import ListRemover, check_list
from dbt_klaviyo_sync.klaviyo.outcomes import Outcome, Prepared, Sender
from dbt_klaviyo_sync.klaviyo.profiles import ProfileUpdater, ProfileUpserter
from dbt_klaviyo_sync.logs import redact
from dbt_klaviyo_sync.manifest import ModelNode
from dbt_klaviyo_sync.payloads import Record
from dbt_klaviyo_sync.progress import NoProgress, ProgressReporter
from dbt_klaviyo_sync.spec import SyncSpec, build_spec
from dbt_klaviyo_sync.state import (
    OUTCOME_SCHEMA,
    State,
    default_path,
    open_state,
    sync_id,
)
from dbt_klaviyo_sync.summary import (
    PRINTED_REJECTS,
    SAMPLE_SIZE,
    Change,
    ModelResult,
    RunSummary,
    changed_fields,
)

log = logging.getLogger(__name__)

#: Above this many changed profiles, bulk import jobs are cheaper than one request each.
BULK_THRESHOLD = 100
#: Answers are committed when this many records, or this many seconds, have gathered.
COMMIT_RECORDS = 50_000
COMMIT_SECONDS = 2.0
#: The rows a sync acts on first: new and changed ones, and rows it must report.
_CHANGES = ("add", "update", "null_key", "duplicate_key")


@dataclass(frozen=True)
class SyncOptions:
    base_url: str
    private_key: str | None
    public_key: str | None
    dry_run: bool = False
    full_refresh: bool = False
    state_path: Path | None = None
    concurrency: int = 4
    job_deadline: float = 1800.0
    read_timeout: float = 60.0
    allow_insecure_http: bool = False


def build_specs(models: list[ModelNode]) -> list[SyncSpec]:
    """Validate every selected model; report all problems of all models together."""
    specs, problems = [], []
    for model in models:
        try:
            specs.append(build_spec(model))
        except AnnotationErrors as exc:
            problems += exc.problems
    if problems:
        raise AnnotationErrors(problems)
    return specs


def run(
    project: DbtProject,
    models: list[ModelNode],
    options: SyncOptions,
    summary: RunSummary,
    progress: ProgressReporter | None = None,
) -> None:
    """Sync the selected annotated models of a dbt project, adding each model's result to
    `summary` as it starts, so that a run that stops midway still says how far it got."""
    specs = build_specs(models)
    warehouse = load_warehouse(project, models)
    state_path = options.state_path or default_path(project.project_dir)
    databases = _without_state(warehouse.databases, state_path)
    fresh = not state_path.exists()
    if fresh and not options.dry_run:
        _warn_fresh_state(specs, state_path)
    client = make_client(options)  # a dry run builds requests to show them, sends none
    try:
        with open_state(
            None if options.dry_run and fresh else state_path,  # None: an empty state in memory
            databases,
            read_only=options.dry_run,
        ) as state:
            for spec in specs:
                diff.check_columns(state.con, spec)
            if not options.dry_run:
                preflight(client, specs)
            for spec in specs:
                model = ModelSync(state, client, spec, warehouse.target_name, options, progress)
                summary.models.append(model.result)
                model.run()
    finally:
        client.close()


def make_client(options: SyncOptions) -> KlaviyoClient:
    return KlaviyoClient(
        options.base_url,
        options.private_key,
        options.public_key,
        timeout=(10.0, options.read_timeout),
        allow_insecure=options.allow_insecure_http,
    )


def _without_state(databases: dict[str, Path], state_path: Path) -> dict[str, Path]:
    """The warehouse's databases, less the state file when profiles.yml attaches it (to
    offer the run history to dbt as a source): the state is opened on its own."""
    state = state_path.resolve()
    return {name: path for name, path in databases.items() if path != state}


def _warn_fresh_state(specs: list[SyncSpec], path: Path) -> None:
    """Without a state file nothing looks sent: fine for a first sync, but if the state was
    lost, events and deletions are requested again. Say so, loudly, before sending."""
    once = ", ".join(spec.model for spec in specs if spec.once)
    log.warning(
        "no sync state at %s: every row counts as new and is sent.%s If you moved or lost "
        "the state, stop now and point --state (or DBT_KLAVIYO_STATE) at it.",
        path,
        f" {once} will send every event and deletion again (Klaviyo drops events it already "
        "has by unique_id)."
        if once
        else "",
    )


def preflight(client: KlaviyoClient, specs: list[SyncSpec]) -> None:
    """Cheap reads before any state changes: the key works, the API answers, and every
    list a model mirrors exists."""
    if not any(spec.api == "private" for spec in specs):
        return
    try:
        # Three tries: a user at the terminal should hear soon that Klaviyo is out of reach.
        client.call("get_profiles", params={"page[size]": "1"}, attempts=3)
        for spec in specs:
            if spec.mirrors:
                check_list(client, spec)
    except TransientApiError as exc:
        raise ApiUnavailableError(
            f"cannot reach Klaviyo at {client.base_url}: {exc}. Check KLAVIYO_BASE_URL and "
            "your network, then run again; nothing was sent."
        ) from exc
    except KlaviyoRejected as exc:
        raise ApiUnavailableError(f"Klaviyo refused a first, harmless read: {exc}") from exc


def make_sender(
    client: KlaviyoClient, spec: SyncSpec, *, bulk: bool, options: SyncOptions
) -> Sender:
    """The sender for a model's object and behaviour, Census's names for them."""
    deadline = options.job_deadline
    match (spec.object, spec.behavior):
        case ("profile", "upsert"):
            return ProfileUpserter(client, spec, bulk=bulk, job_deadline=deadline)
        case ("profile", "update_only"):
            return ProfileUpdater(client, spec, bulk=bulk, job_deadline=deadline)
        case ("profile", "delete"):
            return ProfileDeleter(client, spec)
        case ("list", "mirror"):
            return ProfileUpserter(
                client, spec, bulk=bulk, job_deadline=deadline, list_id=spec.list_id
            )
        case ("event", "send"):
            return EventSender(client, spec)
    raise ConfigurationError(f"model '{spec.model}': no sender for {spec.object} {spec.behavior}")


class ModelSync:
    """One model's sync: diff, send in batches, commit each answer."""

    def __init__(
        self,
        state: State,
        client: KlaviyoClient,
        spec: SyncSpec,
        target: str,
        options: SyncOptions,
        progress: ProgressReporter | None = None,
    ) -> None:
        self.state = state
        self.target = target
        self.client = client
        self.spec = spec
        self.sid = sync_id(spec, target, options.base_url)
        self.options = options
        self.dry_run = options.dry_run
        self.result = ModelResult(spec.model, spec.object, spec.behavior)
        self.progress = progress or NoProgress()
        self.run_id = ""
        self._waited_before = 0.0
        self._samples: list[Record] = []  # a dry run's first few changes of each kind
        self._sampled: Counter[str] = Counter()  # how many of each kind
        self._pending = Outcome()  # answers counted but not yet committed
        self._committed_at = time.monotonic()

    def run(self) -> ModelResult:
        began = time.monotonic()
        try:
            return self._run()
        except Exception as exc:
            self.result.error = _error_text(exc)
            raise
        finally:
            self.result.seconds = time.monotonic() - began

    def _run(self) -> ModelResult:
        if not self.dry_run:
            self.state.register(self.sid, self.spec, self.target, self.options.base_url)
            if self.options.full_refresh:
                self.state.forget(self.sid, keep_accepted=self.spec.once)
            self.run_id = self.state.start_run(
                self.sid, self.spec.model, dry_run=False, full_refresh=self.options.full_refresh
            )
        started = time.monotonic()
        self.state.memory_for("diff")
        counts = diff.compute(self.state.con, self.spec, self.sid)
        self.state.memory_for("send")
        log.info(
            "%s: %d rows; %d to add, %d to update, %d left the model, %d with a NULL or "
            "duplicated sync key (diff: %.1f s)",
            self.spec.model,
            counts.model_rows,
            counts.add,
            counts.update,
            counts.remove,
            counts.invalid,
            time.monotonic() - started,
        )
        started = time.monotonic()
        self._waited_before = waited_before = self.client.rate_limit_wait
        requests_before = self.client.requests_made
        status, error = "error", None
        tally = self.result.counts
        self.progress.start(
            self.spec.model,
            counts.to_send + counts.invalid + (counts.remove if self.spec.mirrors else 0),
        )
        try:
            bulk = self.spec.api == "private" and counts.to_send > BULK_THRESHOLD
            self._send(
                make_sender(self.client, self.spec, bulk=bulk, options=self.options), _CHANGES
            )
            if self.spec.mirrors:
                self._send(ListRemover(self.client, self.spec), ("remove",))
            elif not self.spec.once:
                # Upserts and updates leave Klaviyo alone when a row leaves the model; the
                # row is forgotten, so it is sent again if it comes back.
                tally.removed = counts.remove
                if not self.dry_run:
                    self.state.forget_removed(self.sid, diff.CHANGES)
            status = self.result.status
        except Exception as exc:
            error = _error_text(exc)
            raise
        finally:
            self.progress.finish()
            tally.unchanged = counts.model_rows - counts.to_send - counts.invalid
            tally.requests = self.client.requests_made - requests_before
            if not self.dry_run:
                self.state.finish_run(self.run_id, tally, status, error)
                log.info(
                    "%s: sent in %.1f s, %d requests, %.1f s waiting for rate limits",
                    self.spec.model,
                    time.monotonic() - started,
                    tally.requests,
                    self.client.rate_limit_wait - waited_before,
                )
        return self.result

    def _send(self, sender: Sender, kinds: tuple[str, ...]) -> None:
        """Stream the rows of these kinds through the sender, a few units in flight, and
        commit each unit's answer as it arrives. A dry run stops after preparing."""
        units = sender.units(self._prepared(sender, kinds))
        if self.dry_run:
            for unit in units:
                records = [p.record for p in unit]
                if kinds == ("remove",):
                    self._tally(Outcome(removed=records))
                else:
                    self._tally(Outcome(accepted=[(r, None) for r in records]), planned=True)
            self._sample_old_values()
            return
        with ThreadPoolExecutor(self.options.concurrency, "klaviyo-send") as pool:
            in_flight: set[Future[Outcome]] = set()
            try:
                for unit in units:
                    in_flight.add(pool.submit(sender.send, unit))
                    while len(in_flight) >= self.options.concurrency * 2:
                        done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                        self._answered(done)
                while in_flight:
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    self._answered(done)
            finally:
                self._flush()

    def _prepared(self, sender: Sender, kinds: tuple[str, ...]) -> Iterator[Prepared]:
        """Changed rows, converted and shaped; rejects found on the way are committed
        (or, in a dry run, counted) straight away."""
        for batch in diff.batches(self.state.con, kinds):
            records, rejects = payloads.records(self.spec, batch)
            ready, refused = sender.prepare(records)
            self._commit(Outcome(rejected=rejects + refused))
            yield from ready

    def _answered(self, done: set[Future[Outcome]]) -> None:
        """Count answers at once; commit them a few seconds' or records' worth at a time,
        as each commit scans the snapshot. A crash loses only uncommitted answers, and
        those records are sent again: safe, as every request is idempotent or deduplicated."""
        for future in done:
            outcome = future.result()
            self._tally(outcome)
            self._pending.merge(outcome)
        pending = self._pending
        size = len(pending.accepted) + len(pending.rejected) + len(pending.removed)
        if size >= COMMIT_RECORDS or time.monotonic() - self._committed_at >= COMMIT_SECONDS:
            self._flush()

    def _flush(self) -> None:
        if not self.dry_run:
            self.state.commit_batch(
                self.sid, self.run_id, self.spec.model, _outcome_table(self._pending)
            )
        self._pending, self._committed_at = Outcome(), time.monotonic()

    def _commit(self, outcome: Outcome) -> None:
        if not self.dry_run:
            self.state.commit_batch(self.sid, self.run_id, self.spec.model, _outcome_table(outcome))
        self._tally(outcome)

    def _tally(self, outcome: Outcome, planned: bool = False) -> None:
        """Count as the summary table shows it: an accepted record is added, updated or
        removed in Klaviyo depending on the behaviour and on whether it was sent before."""
        result, tally = self.result, self.result.counts
        if planned:
            self._sample([r for r, _ in outcome.accepted] + outcome.removed)
        for record, _ in outcome.accepted:
            if self.spec.behavior == "delete":
                tally.removed += 1
            elif record.change == "update" or self.spec.behavior == "update_only":
                tally.updated += 1
            else:
                tally.added += 1
            if planned and self.spec.behavior == "delete":
                result.planned.append(record.key)
        tally.removed += len(outcome.removed)
        tally.rejected += len(outcome.rejected)
        tally.failed += len(outcome.failed)
        result.rejects += outcome.rejected[: max(0, PRINTED_REJECTS - len(result.rejects))]
        for record, reason in outcome.failed[: max(0, PRINTED_REJECTS - len(result.failures))]:
            result.failures.append(f"{record.key}: {reason}")
        self.progress.advance(
            len(outcome.accepted)
            + len(outcome.rejected)
            + len(outcome.failed)
            + len(outcome.removed),
            self.client.rate_limit_wait - self._waited_before,
        )

    def _sample(self, records: list[Record]) -> None:
        """Keep the first few records of each kind of change, to show in the plan."""
        for record in records:
            if self._sampled[record.change] < SAMPLE_SIZE:
                self._sampled[record.change] += 1
                self._samples.append(record)

    def _sample_old_values(self) -> None:
        """Each sample's changed fields, old value against new, as the plan shows them."""
        old = self.state.accepted_values(self.sid, [r.key for r in self._samples])
        self.result.samples = [
            # Compared as JSON, the form Klaviyo received them in.
            Change(r.key, r.change, changed_fields(old.get(r.key), self._as_sent(r)))
            for r in self._samples
        ]

    @staticmethod
    def _as_sent(record: Record) -> dict[str, Any]:
        return {} if record.change == "remove" else orjson.loads(payloads.dumps(record.values))


def _error_text(exc: Exception) -> str:
    """Why a model stopped, for its result and its row in the runs table; keys scrubbed."""
    return redact(f"{type(exc).__name__}: {exc}")


def _outcome_table(outcome: Outcome) -> pa.Table:
    """A batch's answers in the shape `State.commit_batch` takes."""
    rows = [
        {
            "key": r.key,
            "outcome": "accepted",
            "fingerprint": r.fingerprint,
            "accepted_values": payloads.dumps(r.values).decode(),
            "klaviyo_id": klaviyo_id or r.klaviyo_id,
            "in_snapshot": r.in_snapshot,
        }
        for r, klaviyo_id in outcome.accepted
    ]
    rows += [
        {
            "key": j.key,
            "outcome": "invalid" if j.invalid_row else "rejected",
            "fingerprint": j.fingerprint,
            "in_snapshot": j.in_snapshot,
            "column_name": j.column,
            "field": j.field,
            "code": j.code,
            "reason": j.reason,
        }
        for j in outcome.rejected
    ]
    rows += [{"key": r.key, "outcome": "removed", "in_snapshot": True} for r in outcome.removed]
    return pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA)
