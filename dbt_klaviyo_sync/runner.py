"""Orchestration only: for each annotated model, diff, then send, then commit.

Everything is checked before anything is sent: the annotations of every selected model,
that each model is built and has its columns, and the credentials. Then each model is
diffed in DuckDB, its changed rows are streamed in batches, shaped into requests and sent
by a small pool of workers, and each answer is committed as soon as it arrives: accepted
records to the snapshot, rejected ones to the rejects table. A crash loses at most the
batches in flight, which the next run sends again.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from dbt_klaviyo_sync import diff, payloads
from dbt_klaviyo_sync.dbt import DbtProject, ensure_manifest, load_warehouse
from dbt_klaviyo_sync.errors import (
    AnnotationErrors,
    ApiUnavailableError,
    ConfigurationError,
    TransientApiError,
)
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient, KlaviyoRejected
from dbt_klaviyo_sync.klaviyo.profiles import Outcome, Prepared, ProfileUpserter, pack_jobs, prepare
from dbt_klaviyo_sync.manifest import ModelNode, read_models
from dbt_klaviyo_sync.payloads import Reject
from dbt_klaviyo_sync.spec import SyncSpec, build_spec
from dbt_klaviyo_sync.state import (
    OUTCOME_SCHEMA,
    RunCounts,
    State,
    default_path,
    open_state,
    sync_id,
)

log = logging.getLogger(__name__)

#: Above this many changed profiles, bulk import jobs are cheaper than one request each.
BULK_THRESHOLD = 100
#: Profiles sent one by one are grouped so that each group is one state commit.
SINGLES_PER_UNIT = 50

_SUPPORTED = {("profile", "upsert")}


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
    allow_insecure_http: bool = False


@dataclass
class ModelResult:
    """What happened to one model; the CLI prints it, and exit statuses derive from it."""

    model: str
    counts: RunCounts = field(default_factory=RunCounts)
    rejects: list[Reject] = field(default_factory=list)  # a sample, for the console
    failures: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.counts.failed:
            return "failed"
        return "rejects" if self.counts.rejected else "ok"


def select(models: list[ModelNode], names: Iterable[str]) -> list[ModelNode]:
    """Models matching the selection (names, unique ids or glob patterns); all if empty."""
    wanted = [n for name in names for n in name.split()]
    if not wanted:
        return models
    chosen = [
        m for m in models if any(fnmatch.fnmatchcase(m.name, w) or m.unique_id == w for w in wanted)
    ]
    unmatched = [
        w
        for w in wanted
        if not any(fnmatch.fnmatchcase(m.name, w) or m.unique_id == w for m in models)
    ]
    if unmatched:
        known = ", ".join(m.name for m in models) or "none"
        raise ConfigurationError(
            f"--select {' '.join(unmatched)} matches no model with `klaviyo` meta "
            f"(annotated models: {known})"
        )
    return chosen


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
    for spec in specs:
        if (spec.object, spec.behavior) not in _SUPPORTED:
            raise ConfigurationError(
                f"model '{spec.model}': {spec.object} {spec.behavior} is not supported by "
                "this version yet; profile upsert is."
            )
    return specs


def run(
    project: DbtProject,
    names: Iterable[str],
    options: SyncOptions,
) -> list[ModelResult]:
    """Sync the selected annotated models of a dbt project."""
    specs = build_specs(select(read_models(ensure_manifest(project)), names))
    warehouse = load_warehouse(project)
    state_path = options.state_path or default_path(project.project_dir)
    if options.dry_run and not state_path.exists():
        state_path_or_none: Path | None = None  # nothing synced yet: diff against nothing
    else:
        state_path_or_none = state_path
    client = None
    if not options.dry_run:
        client = KlaviyoClient(
            options.base_url,
            options.private_key,
            options.public_key,
            allow_insecure=options.allow_insecure_http,
        )
        _preflight(client, specs)
    results = []
    try:
        with open_state(
            state_path_or_none,
            warehouse.databases,
            read_only=options.dry_run and state_path_or_none is not None,
        ) as state:
            for spec in specs:
                diff.check_columns(state.con, spec)
            for spec in specs:
                results.append(ModelSync(state, client, spec, warehouse.target_name, options).run())
    finally:
        if client:
            client.close()
    return results


def _preflight(client: KlaviyoClient, specs: list[SyncSpec]) -> None:
    """One cheap authenticated read, so bad keys or an unreachable API stop the run
    before any state changes."""
    if not any(spec.api == "private" for spec in specs):
        return
    try:
        client.call("get_profiles", params={"page[size]": "1"})
    except (TransientApiError, KlaviyoRejected) as exc:
        raise ApiUnavailableError(
            f"cannot reach Klaviyo at {client.base_url}: {exc}. Check KLAVIYO_BASE_URL and "
            "your network, then run again; nothing was sent."
        ) from exc


class ModelSync:
    """One model's sync: diff, send in batches, commit each answer."""

    def __init__(
        self,
        state: State,
        client: KlaviyoClient | None,
        spec: SyncSpec,
        target: str,
        options: SyncOptions,
    ) -> None:
        self.state = state
        self.target = target
        self.client = client
        self.spec = spec
        self.sid = sync_id(spec, target, options.base_url)
        self.options = options
        self.result = ModelResult(spec.model)
        self.run_id = ""

    def run(self) -> ModelResult:
        dry = self.client is None
        if not dry:
            self.state.register(self.sid, self.spec, self.target, self.options.base_url)
            if self.options.full_refresh:
                self.state.forget(self.sid)
            self.run_id = self.state.start_run(
                self.sid, self.spec.model, dry_run=False, full_refresh=self.options.full_refresh
            )
        counts = diff.compute(self.state.con, self.spec, self.sid)
        log.info(
            "%s: %d rows; %d to add, %d to update, %d left the model (an upsert leaves "
            "them in Klaviyo), %d with a NULL or duplicated sync key",
            self.spec.model,
            counts.model_rows,
            counts.add,
            counts.update,
            counts.remove,
            counts.invalid,
        )
        requests_before = self.client.requests_made if self.client else 0
        status = "error"
        try:
            self._send_changes(bulk=self.spec.api == "private" and counts.to_send > BULK_THRESHOLD)
            if not dry:
                self.state.forget_removed(self.sid, diff.CHANGES)
            status = self.result.status
        finally:
            tally = self.result.counts
            tally.removed = counts.remove
            tally.unchanged = counts.model_rows - counts.to_send - counts.invalid
            if self.client:
                tally.requests = self.client.requests_made - requests_before
                self.state.finish_run(self.run_id, tally, status)
        return self.result

    def _send_changes(self, *, bulk: bool) -> None:
        kinds = ("add", "update", "null_key", "duplicate_key")
        if self.client is None:
            for batch in diff.batches(self.state.con, kinds):
                prepared, rejects = self._prepare(batch)
                self._count_dry(prepared, rejects)
            return
        sender = ProfileUpserter(self.client, self.spec, job_deadline=self.options.job_deadline)
        with ThreadPoolExecutor(self.options.concurrency, "klaviyo-send") as pool:
            in_flight: set[Future[Outcome]] = set()
            for unit in self._units(bulk, kinds):
                send = sender.send_job if bulk else _send_each(sender)
                in_flight.add(pool.submit(send, unit))
                while len(in_flight) >= self.options.concurrency * 2:
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    self._commit_done(done)
            while in_flight:
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                self._commit_done(done)

    def _prepare(self, batch: pa.RecordBatch) -> tuple[list[Prepared], list[Reject]]:
        records, rejects = payloads.records(self.spec, batch)
        prepared, too_large = prepare(self.spec, records)
        return prepared, rejects + too_large

    def _units(self, bulk: bool, kinds: tuple[str, ...]) -> Iterator[list[Prepared]]:
        """Requests' worth of records: bulk jobs, or small groups of single upserts.
        Rejects found while preparing are committed straight away."""

        def prepared() -> Iterator[Prepared]:
            for batch in diff.batches(self.state.con, kinds):
                ready, rejects = self._prepare(batch)
                self._commit(Outcome(rejected=rejects))
                yield from ready

        if bulk:
            yield from pack_jobs(prepared())
            return
        unit: list[Prepared] = []
        for item in prepared():
            unit.append(item)
            if len(unit) == SINGLES_PER_UNIT:
                yield unit
                unit = []
        if unit:
            yield unit

    def _commit_done(self, done: set[Future[Outcome]]) -> None:
        for future in done:
            self._commit(future.result())

    def _commit(self, outcome: Outcome) -> None:
        rows = [
            {
                "key": r.key,
                "outcome": "accepted",
                "fingerprint": r.fingerprint,
                "accepted_values": payloads.dumps(r.values).decode(),
                "klaviyo_id": klaviyo_id,
                "in_snapshot": r.in_snapshot,
            }
            for r, klaviyo_id in outcome.accepted
        ] + [
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
        self.state.commit_batch(
            self.sid,
            self.run_id,
            self.spec.model,
            pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA),
        )
        self._tally(outcome)

    def _tally(self, outcome: Outcome) -> None:
        result, tally = self.result, self.result.counts
        for record, _ in outcome.accepted:
            if record.change == "add":
                tally.added += 1
            else:
                tally.updated += 1
        tally.rejected += len(outcome.rejected)
        tally.failed += len(outcome.failed)
        result.rejects += outcome.rejected[: max(0, 20 - len(result.rejects))]
        for record, reason in outcome.failed[: max(0, 20 - len(result.failures))]:
            result.failures.append(f"{record.key}: {reason}")

    def _count_dry(self, prepared: list[Prepared], rejects: list[Reject]) -> None:
        self._tally(Outcome(accepted=[(p.record, None) for p in prepared], rejected=rejects))


def _send_each(sender: ProfileUpserter) -> Callable[[list[Prepared]], Outcome]:
    def send(unit: list[Prepared]) -> Outcome:
        outcome = Outcome()
        for item in unit:
            outcome.merge(sender.send_one(item))
        return outcome

    return send
