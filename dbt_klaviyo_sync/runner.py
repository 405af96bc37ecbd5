"""Orchestration only: for each annotated model, diff, then send, then commit.

Everything is checked before anything is sent: the annotations of every selected model,
the credentials and the Klaviyo account they belong to, and each list. Then each model
follows up what an earlier run left unanswered, is diffed in DuckDB, its changed rows are
streamed in batches, shaped into requests and sent by a small pool of workers, and each
answer is committed as soon as it arrives: accepted records to the snapshot, rejected
ones to the rejects table. Events and bulk jobs are written to a journal before they are
sent, so that a killed run resends an event exactly as it went and follows a job instead of
sending its rows again. A crash loses at most the answers in flight, whose records the
next run sends again. A model that cannot be synced stops alone; the others go on.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from dbt_klaviyo_sync import payloads
from dbt_klaviyo_sync.ahead import read_ahead
from dbt_klaviyo_sync.changeset import (
    CHANGE,
    FINGERPRINT,
    IN_SNAPSHOT,
    JOURNAL_SCHEMA,
    KEY,
    KLAVIYO_ID,
    MEMO,
    OUTCOME_SCHEMA,
    SENT,
    ChangeCounts,
    Record,
    Reject,
    SyncIdentity,
)
from dbt_klaviyo_sync.dbt import DbtProject
from dbt_klaviyo_sync.errors import (
    AnnotationErrors,
    ApiUnavailableError,
    ConfigurationError,
    CredentialsError,
    ModelError,
    TransientApiError,
)
from dbt_klaviyo_sync.klaviyo import lists
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient, KlaviyoRejected, dig
from dbt_klaviyo_sync.klaviyo.consent import ConsentRemover, ConsentSender, Suppressor
from dbt_klaviyo_sync.klaviyo.deletions import ProfileDeleter
from dbt_klaviyo_sync.klaviyo.events import EventSender
from dbt_klaviyo_sync.klaviyo.lists import ListRemover, check_list
from dbt_klaviyo_sync.klaviyo.outcomes import (
    MAX_REFUSALS_IN_A_ROW,
    Block,
    Outcome,
    Prepared,
    Sender,
    Unit,
    each,
    records_of,
)
from dbt_klaviyo_sync.klaviyo.profiles import BulkImport, ProfileUpdater, ProfileUpserter
from dbt_klaviyo_sync.logs import redact
from dbt_klaviyo_sync.manifest import ModelNode
from dbt_klaviyo_sync.progress import NoProgress, ProgressReporter
from dbt_klaviyo_sync.spec import SyncSpec, build_spec
from dbt_klaviyo_sync.summary import (
    PRINTED_REJECTS,
    SAMPLE_SIZE,
    Change,
    ModelResult,
    RunSummary,
    changed_fields,
    in_words,
    quantity,
)
from dbt_klaviyo_sync.warehouse import Warehouse, open_warehouse

log = logging.getLogger(__name__)

#: Above this many changed profiles, bulk import jobs are cheaper than one request each.
BULK_THRESHOLD = 100
#: Answers are committed when this many seconds have passed, or the warehouse's
#: `commit_records` have gathered.
COMMIT_SECONDS = 2.0
#: How often the sending loop looks whether the run was asked to stop.
STOP_POLL_SECONDS = 0.2
#: Units journaled and waiting beyond those being sent. While Klaviyo's rate limit holds
#: the senders, the sync prepares these, so that when it lets them go a stall of the
#: sync's own (a commit of a second or so) leaves no slot of the limit unused. Each holds
#: a bulk job's rows (about 7 MB with their values' JSON): 24 cost 170 MB at the peak.
READY_UNITS = 8
#: When every request waiting for Klaviyo's rate limit has this long left to wait, the
#: warehouse may do its upkeep (`Warehouse.idle`; a checkpoint of a 10M sync's state takes
#: 2-3.5 s). Shorter waits come and go within the limit's 1-second burst window.
IDLE_SECONDS = 5.0
#: Allocations between two of Python's youngest collections while sending (700 by default).
FEW_COLLECTIONS = 50_000
#: The safety brake ignores fewer removals or deletions than this, whatever their share.
BRAKE_MINIMUM = 10
#: What a mirror does to the rows that left its model, for the safety brake's message.
_WITHDRAWING = {
    "list": "remove from list {}",
    "subscription": "unsubscribe from list {}",
    "suppression": "unsuppress",
}
#: The rows a sync acts on first: new and changed ones, and rows it must report.
_CHANGES = ("add", "update", "null_key", "duplicate_key")
#: A first sync of an event model warns about events older than this sent without the
#: `backfill` flag: Klaviyo would fire flows for them as if they had just happened.
BACKFILL_WARNING_AFTER = timedelta(hours=24)


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
    max_wait: float = 300.0
    allow_removals: bool = False  # go past every model's safety brake
    reconcile: bool = False  # read every mirrored list back and remove its strays
    allow_insecure_http: bool = False


class StopRequest:
    """A request to stop the run, from a signal handler: no new work is taken, answers
    already received are committed, the run is recorded as interrupted. The handler only
    sets a flag; the sending loop notices it within `STOP_POLL_SECONDS`."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def request(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


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
    stop: StopRequest | None = None,
) -> None:
    """Sync the annotated models (from `dbt.select_models`) of a dbt project, adding each
    model's result to `summary` as it starts, so that a run that stops midway still says how
    far it got."""
    specs = build_specs(models)
    stop = stop or StopRequest()
    client = make_client(options)  # a dry run builds requests to show them, sends none
    try:
        with open_warehouse(project, models, options.state_path, dry_run=options.dry_run) as (
            warehouse,
            target,
            state_location,
        ):
            ready = [spec for spec in specs if _readable(warehouse, spec, summary)]
            for spec in ready:
                warehouse.describe(spec)
            if not options.dry_run and not warehouse.has_syncs():
                _warn_fresh_state(ready, state_location)
            if not options.dry_run:
                account = identify_account(client, ready, options)
                preflight(client, ready)
            else:
                account = _account_for_plan(warehouse, client, ready, options, target)
            summary.account = None if account is None else str(account)
            for spec in ready:
                if stop.requested:
                    log.warning("the run was interrupted: %s not synced", spec.model)
                    continue
                identity = SyncIdentity.of(
                    spec, target, client.base_url, None if account is None else account.id
                )
                model = ModelSync(warehouse, client, spec, identity, options, progress, stop)
                summary.models.append(model.result)
                try:
                    model.run()
                except ModelError:
                    continue  # its result says why; the other models go on
    finally:
        client.close()
        summary.interrupted = stop.requested


def _readable(warehouse: Warehouse, spec: SyncSpec, summary: RunSummary) -> bool:
    """Whether the model's relation can be read; if not, its result says why (exit 2) and
    the other models go on."""
    try:
        warehouse.readable(spec)
    except ModelError as exc:
        summary.models.append(
            ModelResult(spec.model, spec.object, spec.behavior, error=_error_text(exc))
        )
        return False
    return True


def make_client(options: SyncOptions) -> KlaviyoClient:
    return KlaviyoClient(
        options.base_url,
        options.private_key,
        options.public_key,
        timeout=(10.0, options.read_timeout),
        max_wait=options.max_wait,
        allow_insecure=options.allow_insecure_http,
    )


def _warn_fresh_state(specs: list[SyncSpec], path: str) -> None:
    """Without a sync state nothing looks sent: fine for a first sync, but if the state was
    lost, events and deletions are requested again. Say so, loudly, before sending."""
    once = [spec.model for spec in specs if spec.once]
    log.warning(
        "no sync state at %s: every row counts as new and is sent. If this is not your "
        "first sync, stop now and point --state (or DBT_KLAVIYO_STATE) at the state%s.",
        path,
        f": {', '.join(once)} would otherwise send each of "
        f"{'their' if len(once) > 1 else 'its'} events and deletions a second time "
        "(Klaviyo drops events it already has by unique_id)"
        if once
        else "",
    )


@dataclass(frozen=True)
class KlaviyoAccount:
    """Which Klaviyo account the keys write to: `id` is part of every sync's identity; the
    organization `name` is only shown, so that a user sees where a run writes."""

    id: str
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.name} ({self.id})" if self.name else self.id


def identify_account(
    client: KlaviyoClient, specs: list[SyncSpec], options: SyncOptions
) -> KlaviyoAccount | None:
    """The Klaviyo account the keys write to, part of every sync's identity: another
    account behind the same URL is another sync, with nothing sent yet. The private key's
    account is read from `GET /api/accounts` (once: it allows 15 calls a minute); models
    that use only the public key (`api: client`) are identified by that key, the site id."""
    if not specs:
        return None
    if options.private_key:
        try:
            accounts = client.call("get_accounts", attempts=3)
            account_id = str(dig(accounts, "data", 0, "id", operation="get_accounts"))
            return KlaviyoAccount(account_id, _organization(accounts["data"][0]))
        except TransientApiError as exc:
            raise ApiUnavailableError(
                f"cannot reach Klaviyo at {client.base_url} to learn which account the key "
                f"belongs to: {exc}. Check KLAVIYO_BASE_URL and your network, then run "
                "again; nothing was sent."
            ) from exc
        except KlaviyoRejected as exc:
            raise ApiUnavailableError(f"Klaviyo refused a first, harmless read: {exc}") from exc
    if options.public_key:
        return KlaviyoAccount(f"site:{options.public_key}")
    if options.dry_run:
        return None  # a plan without keys compares with the state of no account
    raise CredentialsError("KLAVIYO_PRIVATE_API_KEY is not set; export your private key (pk_...)")


def _organization(account: Any) -> str | None:
    """The account's organization name, if its answer has one where Klaviyo puts it."""
    for name in ("attributes", "contact_information", "organization_name"):
        account = account.get(name) if isinstance(account, dict) else None
    return str(account) if account else None


def _account_for_plan(
    warehouse: Warehouse,
    client: KlaviyoClient,
    specs: list[SyncSpec],
    options: SyncOptions,
    target: str,
) -> KlaviyoAccount | None:
    """A dry run asks Klaviyo which account the keys write to only when the state holds
    syncs of one of its models for several accounts; otherwise it compares with the one
    sync it has (or none), and sends no request at all."""
    if any(len(warehouse.accounts(spec, target, client.base_url)) > 1 for spec in specs):
        return identify_account(client, specs, options)
    return None


def preflight(client: KlaviyoClient, specs: list[SyncSpec]) -> None:
    """Cheap reads before any state changes: every list a model mirrors or subscribes
    into exists."""
    try:
        for spec in specs:
            if spec.list_id:
                check_list(client, spec)
    except TransientApiError as exc:
        raise ApiUnavailableError(
            f"cannot reach Klaviyo at {client.base_url}: {exc}. Check KLAVIYO_BASE_URL and "
            "your network, then run again; nothing was sent."
        ) from exc


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
        case ("subscription", _):
            return ConsentSender(client, spec)
        case ("suppression", "mirror"):
            return Suppressor(client, spec, deadline)
    raise ConfigurationError(f"model '{spec.model}': no sender for {spec.object} {spec.behavior}")


def make_remover(client: KlaviyoClient, spec: SyncSpec, options: SyncOptions) -> Sender:
    """What undoes, in Klaviyo, the rows that left a mirror: list membership, the list's
    consent, or a suppression."""
    match spec.object:
        case "subscription":
            return ConsentRemover(client, spec)
        case "suppression":
            return Suppressor(client, spec, options.job_deadline, remove=True)
    return ListRemover(client, spec)


class ModelSync:
    """One model's sync: follow up the last run, diff, send in batches, commit each answer."""

    def __init__(
        self,
        warehouse: Warehouse,
        client: KlaviyoClient,
        spec: SyncSpec,
        identity: SyncIdentity,
        options: SyncOptions,
        progress: ProgressReporter | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        self.warehouse = warehouse
        self.client = client
        self.spec = spec
        self.identity = identity
        self.sid = identity.sid
        self.options = options
        self.dry_run = options.dry_run
        self.result = ModelResult(spec.model, spec.object, spec.behavior)
        self.progress = progress or NoProgress()
        self.stop = stop or StopRequest()
        self.run_id = ""
        self._waited_before = 0.0
        self._samples: list[Record] = []  # a dry run's first few changes of each kind
        self._sampled: Counter[str] = Counter()  # how many of each kind
        self._pending = Outcome()  # answers counted but not yet committed
        self._committed_at = time.monotonic()
        self._handled = 0  # records answered or refused, of those planned
        self._already = 0  # records Klaviyo already held as wanted
        self._journaling = True  # the units being answered were journaled (values and all)
        self._refusals_in_a_row: list[str] = []
        self._planned: set[str] = set()  # a dry run's keys to send or remove, for a reconcile

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
        if self.dry_run:
            self.sid = self.warehouse.resolved(self.identity, self.spec)
        else:
            self.warehouse.register(self.identity, self.spec)
        self._rebase()
        if not self.dry_run:
            if self.options.full_refresh:
                self.warehouse.forget(self.sid, keep_accepted=self.spec.once)
            self.run_id = self.warehouse.start_run(
                self.sid, self.spec.model, full_refresh=self.options.full_refresh
            )
        status, error = "error", None
        began = time.monotonic()
        tally = self.result.counts
        self._waited_before = self.client.rate_limit_wait
        requests_before = self.client.requests_made
        try:
            waiting = [] if self.dry_run else self._resume()
            self._handled = 0  # what the follow-up settled is not part of this run's plan
            started = time.monotonic()
            counts = self.warehouse.diff(self.spec, self.sid, waiting)
            standing = self.warehouse.standing_rejects(self.sid)
            self.result.rows = counts.model_rows
            log.info(
                "%s: %d rows; since the last sync %d new, %d changed, %d left the model; %d with "
                "a NULL or duplicated sync key, %d still refused from earlier runs (diff: %.1f s)",
                self.spec.model,
                counts.model_rows,
                counts.add,
                counts.update,
                counts.remove,
                counts.invalid,
                standing,
                time.monotonic() - started,
            )
            if counts.held:
                tally.failed += counts.held
                self.result.failures.append(
                    f"{quantity(counts.held, 'record')}: a bulk job an earlier run created is "
                    "still running in Klaviyo; they wait for it"
                )
            self._brake(counts)
            self._warn_old_events()
            self._settle()
            planned = (
                counts.to_send + counts.invalid + (counts.remove if self.spec.withdraws else 0)
            )
            self.progress.start(self.spec.model, planned)
            bulk = self.spec.api == "private" and counts.to_send > BULK_THRESHOLD
            sending = time.monotonic()
            self._send(
                make_sender(self.client, self.spec, bulk=bulk, options=self.options), _CHANGES
            )
            if self.spec.withdraws:
                self._send(make_remover(self.client, self.spec, self.options), ("remove",))
            elif not self.spec.once:
                # Upserts and updates leave Klaviyo alone when a row leaves the model; the
                # row is forgotten, so it is sent again if it comes back.
                tally.removed = counts.remove
                if not self.dry_run:
                    self.warehouse.forget_removed(self.sid)
            if self._already and self.spec.behavior == "delete":
                log.info(
                    "%s: nothing to delete for %d key(s): no profile holds them any more",
                    self.spec.model,
                    self._already,
                )
            log.info(
                "%s: sent in %.1f s, %.1f s waiting for rate limits",
                self.spec.model,
                time.monotonic() - sending,
                self.client.rate_limit_wait - self._waited_before,
            )
            unsent = planned - self._handled
            if unsent > 0:  # the run stopped early, or Klaviyo kept refusing requests
                tally.failed += unsent
                self.result.failures.append(
                    f"{quantity(unsent, 'record')} not sent: {self._why_stopped()}"
                )
            if len(self._refusals_in_a_row) >= MAX_REFUSALS_IN_A_ROW:
                raise ModelError(
                    f"model '{self.spec.model}': Klaviyo refused {len(self._refusals_in_a_row)} "
                    f"requests in a row as a whole, for no record in them (last: "
                    f"{self._refusals_in_a_row[-1]}). Nothing in them was marked rejected; "
                    "they are sent again next run. Check the model's list and the API key's "
                    "account."
                )
            if self.spec.mirrors and (self.spec.reconcile or self.options.reconcile):
                self._reconcile(waiting)
            tally.rejected += standing
            self.result.interrupted = self.result.interrupted or self.stop.requested
            status = self.result.status
        except Exception as exc:
            error = _error_text(exc)
            raise
        finally:
            self.progress.finish()
            acted = (
                tally.added
                + tally.updated
                + (tally.removed if self.spec.behavior == "delete" else 0)
            )
            tally.unchanged = max(0, self.result.rows - acted - tally.rejected - tally.failed)
            tally.requests = self.client.requests_made - requests_before
            if not self.dry_run:
                self.warehouse.finish_run(
                    self.run_id,
                    tally,
                    status,
                    error,
                    rate_limit_seconds=self.client.rate_limit_wait - self._waited_before,
                )
                log.info(
                    "%s: done in %.1f s: %s; %s",
                    self.spec.model,
                    time.monotonic() - began,
                    in_words(self.spec.object, self.spec.behavior, tally, done=True),
                    quantity(tally.requests, "request"),
                )
        return self.result

    def _why_stopped(self) -> str:
        if self.stop.requested:
            return "the run was interrupted; they go next run"
        return "Klaviyo refused the requests before them as a whole; they go next run"

    def _rebase(self) -> None:
        """Carry a sync recorded by an earlier version over to today's keys and fingerprints
        without sending anything (a dry run does it in what it keeps to itself)."""
        carried = self.warehouse.rebase(self.spec, self.sid)
        if carried is not None:
            log.info(
                "%s: %d rows carried over to fingerprint %s without sending anything",
                self.spec.model,
                carried,
                self.warehouse.fingerprints,
            )

    def _resume(self) -> list[str]:
        """Follow what an earlier run sent and never saw answered. A bulk job it created is
        polled and its answer committed, instead of sending its rows again; rows it left
        without a job are sent afresh (events keep their exact bodies, for the diff). The
        units whose job is still running, whose rows wait for it."""
        units = self.warehouse.journaled_units(self.sid)
        if not units:
            return []
        list_id = self.spec.list_id if self.spec.mirrors else None
        jobs = BulkImport(self.client, self.spec, self.options.job_deadline, list_id)
        resend, waiting = [], []
        for unit in units:
            if unit.job_id is None:
                if self.spec.object != "event":
                    resend.append(unit.unit)
                continue
            records = [_journaled_record(row) for row in unit.records]
            within = self.options.job_deadline - unit.age
            outcome = jobs.resume(unit.job_id, records, within=within)
            if outcome is None:
                resend.append(unit.unit)
                continue
            log.info("%s: followed bulk job %s of an earlier run", self.spec.model, unit.job_id)
            if outcome.failed:
                waiting.append(unit.unit)
                outcome.failed = []  # not counted here: the diff holds their rows
            self._commit(outcome)
        self.warehouse.drop_journal(self.sid, resend)
        return waiting

    def _brake(self, counts: ChangeCounts) -> None:
        """Stop before sending when the model would remove (list) or delete (profiles) more
        than its `max_removal_share` of what the previous sync left in Klaviyo: the sign of a
        wrong database file or a broken model, not of a change anyone meant."""
        if self.spec.withdraws:
            verb = _WITHDRAWING[self.spec.object].format(self.spec.list_id)
            self._stop_if_too_many(counts.remove, verb)
        elif self.spec.behavior == "delete":
            self._stop_if_too_many(counts.add, "delete")

    def _stop_if_too_many(self, acting: int, verb: str) -> None:
        """The safety brake (see `_brake`): `acting` profiles to `verb`."""
        before = self.warehouse.accepted_count(self.sid)
        share = self.spec.max_removal_share
        if self.options.allow_removals or not before or acting < BRAKE_MINIMUM:
            return
        if acting <= share * before:
            return
        message = (
            f"model '{self.spec.model}' would {verb} {quantity(acting, 'profile')}, "
            f"{acting / before:.0%} of the {before:,} the last sync left in Klaviyo, more "
            f"than its max_removal_share ({share:.0%}). Nothing was sent. Check that the "
            "model reads the right data (the log names the database file), then run again "
            "with --allow-removals if this is meant."
        )
        if self.dry_run:
            log.warning("%s (a sync would stop here)", message)
            return
        raise ModelError(message)

    def _warn_old_events(self) -> None:
        """On a first sync of an event model whose `backfill` is unset, say how many events
        are older than `BACKFILL_WARNING_AFTER`: without the flag each fires the flows of its
        metric (last year's orders would get post-purchase emails). A warning, in the log
        and the summary, not a stop: `backfill: false` says live events are meant."""
        spec = self.spec
        if spec.object != "event" or spec.backfill is not None:
            return
        if self.warehouse.accepted_count(self.sid):
            return  # not a first sync: new events are live ones
        cutoff = datetime.now(UTC) - BACKFILL_WARNING_AFTER
        old, oldest = 0, None
        for batch in self.warehouse.changes(("add",)):
            times = [t for t in payloads.event_times(spec, batch) if t < cutoff]
            if times:
                old += len(times)
                oldest = min(times) if oldest is None else min(oldest, *times)
        if not old:
            return
        hours = round(BACKFILL_WARNING_AFTER.total_seconds() / 3600)
        self._note(
            f"first sync of {old:,} events older than {hours} hours (the oldest "
            f"{oldest:%Y-%m-%d}) {'would go' if self.dry_run else 'go'} without Klaviyo's "
            "backfill flag: each fires its metric's flows as if it had just happened. If they "
            "are history, set `backfill: true` on the model (config: meta: klaviyo:) before "
            "syncing; `backfill: false` sends them as live events and silences this.",
            logging.WARNING,
        )

    def _reconcile(self, held: list[str]) -> None:
        """Read the list's members back from Klaviyo and make it hold the model's rows: remove
        members whose sync key is not in the model (added elsewhere, or whose removal a lost
        state forgot), and send again the model rows Klaviyo accepted that the list lacks.
        Only after a run that sent everything: while records failed, the list is not yet
        what the model wants. Removing strays is braked like any removal."""
        spec, tally = self.spec, self.result.counts
        if tally.failed or self.stop.requested:
            self._note("reconcile skipped: not every change reached Klaviyo in this run")
            return
        keys = self.warehouse.model_keys(spec)
        strays: list[str] = []
        present: set[str] = set()
        read = 0
        try:
            for profile_id, key in lists.members(self.client, spec):
                read += 1
                if key is not None and key in keys:
                    present.add(key)
                elif key is None or key not in self._planned:  # a planned removal's own
                    strays.append(profile_id)
        except (TransientApiError, KlaviyoRejected) as exc:
            raise ModelError(
                f"model '{spec.model}': reconcile could not read list {spec.list_id} from "
                f"Klaviyo ({exc}); the sync's own changes were sent and recorded. Run again "
                "to reconcile."
            ) from exc
        missing = [key for key in keys - present if key not in self._planned]
        lost = [
            key
            for at in range(0, len(missing), lists.MAX_MEMBERS_PER_CALL)
            for key in self.warehouse.accepted_values(
                self.sid, missing[at : at + lists.MAX_MEMBERS_PER_CALL]
            )
        ]
        self._stop_if_too_many(len(strays), f"remove from list {spec.list_id} (reconcile)")
        if not self._remove_strays(strays):
            return
        self._add_back(lost, held)
        remove, add = ("would remove", "would add back") if self.dry_run else ("removed", "sent")
        self._note(
            f"reconcile read {read:,} members of list {spec.list_id}: {remove} "
            f"{len(strays):,} not in the model; {add} {len(lost):,} model rows the list lacked"
        )

    def _remove_strays(self, strays: list[str]) -> bool:
        """Remove list members by profile id, 1,000 a request; whether all went."""
        tally = self.result.counts
        for at in range(0, len(strays), lists.MAX_MEMBERS_PER_CALL):
            ids = strays[at : at + lists.MAX_MEMBERS_PER_CALL]
            if not self.dry_run:
                try:
                    lists.remove_members(self.client, str(self.spec.list_id), ids)
                except (TransientApiError, KlaviyoRejected) as exc:
                    tally.failed += len(strays) - at
                    self.result.failures.append(
                        f"{len(strays) - at:,} list members not in the model were not "
                        f"removed: {exc}; the next reconcile tries again"
                    )
                    return False
            tally.removed += len(ids)
        return True

    def _add_back(self, lost: list[str], held: list[str]) -> None:
        """Model rows Klaviyo accepted that are not in the list: forgotten, so that they
        count as new, and sent again as any new row is (which re-creates a deleted
        profile too)."""
        if not lost:
            return
        if self.dry_run:
            self.result.counts.added += len(lost)
            return
        n = len(lost)
        forgotten = pa.table({"key": lost, "outcome": ["forgotten"] * n, "in_snapshot": [True] * n})
        self.warehouse.commit(
            self.sid, self.run_id, self.spec.model, _conform(forgotten, OUTCOME_SCHEMA)
        )
        counts = self.warehouse.diff(self.spec, self.sid, held)
        bulk = self.spec.api == "private" and counts.add > BULK_THRESHOLD
        self._send(make_sender(self.client, self.spec, bulk=bulk, options=self.options), ("add",))

    def _note(self, message: str, level: int = logging.INFO) -> None:
        """Say something about the model in the log and under the summary table."""
        log.log(level, "%s: %s", self.spec.model, message)
        self.result.notes.append(message)

    def _settle(self) -> None:
        """Rows back at the version Klaviyo accepted drop an earlier refusal; events or
        deletions that left the model before Klaviyo took them are forgotten."""
        if self.dry_run:
            return
        for batch in self.warehouse.changes(("settle", "forget")):
            rows = pa.table(
                {
                    "key": batch.column(KEY),
                    "outcome": pc.if_else(
                        pc.equal(batch.column(CHANGE), "settle"), "settled", "forgotten"
                    ),
                    "in_snapshot": batch.column(IN_SNAPSHOT),
                }
            )
            self.warehouse.commit(
                self.sid, self.run_id, self.spec.model, _conform(rows, OUTCOME_SCHEMA)
            )

    def _send(self, sender: Sender, kinds: tuple[str, ...]) -> None:
        """Stream the rows of these kinds through the sender, a few units in flight, and
        commit each unit's answer as it arrives. A dry run stops after preparing."""
        with read_ahead(self._shaped(sender, kinds), self.warehouse.shaped_ahead) as shaped:
            items = self._prepared(shaped)
            # Bulk upserts take rows shaped in Arrow as blocks; the others one by one.
            units = (
                sender.units(items)
                if isinstance(sender, ProfileUpserter)
                else sender.units(each(items))
            )
            if self.dry_run:
                self._plan(units, kinds)
            else:
                self._send_units(sender, units)
        if self.dry_run:
            self._sample_old_values()

    def _plan(self, units: Iterator[Sequence[Prepared]], kinds: tuple[str, ...]) -> None:
        """Count what a real run would send, without sending it."""
        for items in units:
            records = list(records_of(items))
            self._planned.update(r.key for r in records)
            if kinds == ("remove",):
                self._tally(Outcome(removed=records))
            else:
                self._tally(Outcome(accepted=[(r, None) for r in records]), planned=True)

    def _send_units(self, sender: Sender, units: Iterator[Sequence[Prepared]]) -> None:
        """Send the units, a few in flight, and commit each one's answer as it arrives."""
        self._journaling = sender.journaled
        recorder = self.warehouse.job_recorder(self.sid) if sender.journaled else None
        with (
            _few_collections(),
            ThreadPoolExecutor(self.options.concurrency, "klaviyo-send") as pool,
        ):
            in_flight: set[Future[Outcome]] = set()
            try:
                for items in units:
                    if self._stopping():
                        break
                    unit = Unit(uuid.uuid4().hex, items)
                    if recorder is not None:
                        unit.job_created = partial(recorder, unit.id)
                        keep = self.warehouse.values_until_commit
                        self.warehouse.journal(self.sid, unit.id, _journal_table(items, keep))
                        _forget_values(items, keep_json=keep)
                    in_flight.add(pool.submit(sender.send, unit))
                    while len(in_flight) >= self.options.concurrency + READY_UNITS:
                        in_flight = self._await(in_flight)
                while in_flight:
                    in_flight = self._await(in_flight)
            finally:
                self._flush()
                if recorder is not None:
                    recorder.close()

    def _stopping(self) -> bool:
        """Whether to take no more work: the run was asked to stop (then requests waiting
        in the client give up at once), or Klaviyo keeps refusing whole requests."""
        if self.stop.requested:
            if not self.result.interrupted:
                log.warning(
                    "%s: stopping: no new requests; waiting for those in flight, then "
                    "recording their answers",
                    self.spec.model,
                )
                self.result.interrupted = True
                self.client.stop()
            return True
        return len(self._refusals_in_a_row) >= MAX_REFUSALS_IN_A_ROW

    def _await(self, in_flight: set[Future[Outcome]]) -> set[Future[Outcome]]:
        """Wait a little for answers, commit those that came, and notice a stop request."""
        done, left = wait(in_flight, timeout=STOP_POLL_SECONDS, return_when=FIRST_COMPLETED)
        self._stopping()
        if not done and self.client.quiet_for() >= IDLE_SECONDS:
            self.warehouse.idle()
        self._answered(done)
        return left

    def _shaped(
        self, sender: Sender, kinds: tuple[str, ...]
    ) -> Generator[tuple[list[Prepared | Block], list[Reject]], None, None]:
        """Each batch of changed rows, converted and shaped: what is ready to send, and
        the rows refused on the way. An event an earlier run may have delivered goes
        exactly as it went then, whatever its row says now. May run on a thread of its own
        (`read_ahead`): it reads the warehouse and shapes, and touches nothing else."""
        for batch in self.warehouse.changes(kinds):
            ready: list[Prepared | Block] = []
            again = pc.is_valid(batch.column(SENT))
            if isinstance(sender, EventSender) and pc.any(again).as_py():
                for row in batch.filter(again).to_pylist():
                    record = Record(
                        row[KEY],
                        row[FINGERPRINT],
                        row[CHANGE],
                        row[IN_SNAPSHOT],
                        row[KLAVIYO_ID],
                        {},
                        memo=row.get(MEMO),
                    )
                    ready.append(EventSender.restore(record, row[SENT]))
                batch = batch.filter(pc.invert(again))
            if isinstance(sender, ProfileUpserter | ProfileUpdater):
                shaped, batch = payloads.shaped_rows(self.spec, batch)
                if shaped.num_rows:
                    ready.append(Block(shaped))
            records, rejects = payloads.records(self.spec, batch)
            prepared, refused = sender.prepare(records)
            yield [*ready, *prepared], rejects + refused

    def _prepared(
        self, shaped: Iterator[tuple[list[Prepared | Block], list[Reject]]]
    ) -> Iterator[Prepared | Block]:
        """The shaped records, one by one; the rows refused on the way are committed (or,
        in a dry run, counted) as their batch comes."""
        for ready, refused in shaped:
            self._commit(Outcome(rejected=refused))
            yield from ready

    def _answered(self, done: set[Future[Outcome]]) -> None:
        """Count answers at once; commit them a few seconds' or records' worth at a time,
        as each commit scans the snapshot. A crash loses only uncommitted answers, and
        those records are sent again: safe, as every request is idempotent or deduplicated
        (events by their journaled body, bulk jobs by their recorded id)."""
        for future in done:
            outcome = future.result()
            if outcome.answered:
                self._refusals_in_a_row = []
            self._refusals_in_a_row += outcome.refusals
            self._tally(outcome)
            self._pending.merge(outcome)
        if (
            self._pending.to_commit >= self.warehouse.commit_records
            or time.monotonic() - self._committed_at >= COMMIT_SECONDS
        ):
            self._flush(whole=True)

    def _flush(self, *, whole: bool = False) -> None:
        """Commit the answers waiting. With `whole`, in whole multiples of the warehouse's
        `commit_records` when more are waiting: the rest of the last bulk jobs' rows wait
        for the next commit."""
        pending, per = self._pending, self.warehouse.commit_records
        over = pending.to_commit % per if whole and pending.to_commit >= per else 0
        self._pending = pending.hold_back(over)
        self._record(pending)
        self._committed_at = time.monotonic()

    def _commit(self, outcome: Outcome) -> None:
        self._record(outcome)
        self._tally(outcome)

    def _record(self, outcome: Outcome) -> None:
        """Commit answers to the state. The values of journaled records are in the journal
        already: they are not serialized a second time."""
        if not self.dry_run:
            table = _outcome_table(outcome, values=not self._journaling)
            self.warehouse.commit(self.sid, self.run_id, self.spec.model, table)

    def _tally(self, outcome: Outcome, planned: bool = False) -> None:
        """Count as the summary table shows it: an accepted record is added, updated or
        removed in Klaviyo depending on the behaviour and on whether it was sent before."""
        result, tally = self.result, self.result.counts
        if planned:
            self._sample([r for r, _ in outcome.accepted] + outcome.removed)
        for record, _ in outcome.accepted:
            if self.spec.object in ("subscription", "suppression"):
                # Added: subscribed or suppressed; updated: unsubscribed or unsuppressed
                # while still in the model (those that left it are removed).
                if payloads.withdraws(self.spec, record):
                    tally.updated += self.spec.withdraws  # `subscribe` sends nothing for it
                else:
                    tally.added += 1
            elif self.spec.behavior == "delete":
                tally.removed += 1
            elif record.change == "update" or self.spec.behavior == "update_only":
                tally.updated += 1
            else:
                tally.added += 1
            if planned and self.spec.behavior == "delete":
                result.planned.append(record.key)
        for block in outcome.blocks:  # upserts: each row added or updated
            updated = block.updates()
            tally.updated += updated
            tally.added += len(block) - updated
        tally.removed += len(outcome.removed)
        tally.rejected += len(outcome.rejected)
        tally.failed += len(outcome.failed)
        result.rejects += outcome.rejected[: max(0, PRINTED_REJECTS - len(result.rejects))]
        for record, reason in outcome.failed[: max(0, PRINTED_REJECTS - len(result.failures))]:
            result.failures.append(f"{record.key}: {reason}")
        self._already += len(outcome.already)
        handled = (
            outcome.accepted_count
            + len(outcome.rejected)
            + len(outcome.failed)
            + len(outcome.removed)
            + len(outcome.already)
        )
        self._handled += handled
        self.progress.advance(handled, self.client.rate_limit_wait - self._waited_before)

    def _sample(self, records: list[Record]) -> None:
        """Keep the first few records of each kind of change, to show in the plan."""
        for record in records:
            if self._sampled[record.change] < SAMPLE_SIZE:
                self._sampled[record.change] += 1
                self._samples.append(record)

    def _sample_old_values(self) -> None:
        """Each sample's changed fields, old value against new, as the plan shows them."""
        old = self.warehouse.accepted_values(self.sid, [r.key for r in self._samples])
        self.result.samples = [
            # Compared as JSON, the form Klaviyo received them in.
            Change(r.key, r.change, changed_fields(old.get(r.key), self._as_sent(r)))
            for r in self._samples
        ]

    @staticmethod
    def _as_sent(record: Record) -> dict[str, Any]:
        return {} if record.change == "remove" else orjson.loads(record.json())


@contextmanager
def _few_collections() -> Iterator[None]:
    """Sending makes and drops a few Python objects per record, which set off Python's
    cyclic collector every 700 allocations, and each of its full passes walks everything
    loaded before (dbt's manifest among it): about a tenth of the sending's CPU. While
    sending, what exists is kept out of its reach (`gc.freeze`) and it runs far less
    often; both are put back after, so the process (an orchestrator, say) keeps its own."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(threshold[0], FEW_COLLECTIONS), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _error_text(exc: Exception) -> str:
    """Why a model stopped, for its result and its row in the runs table; keys scrubbed."""
    if isinstance(exc, ModelError):
        return redact(str(exc))
    return redact(f"{type(exc).__name__}: {exc}")


def _journaled_record(row: dict[str, Any]) -> Record:
    """A record as the journal remembers it (`JOURNAL_SCHEMA`)."""
    values = row["accepted_values"]
    return Record(
        key=row["key"],
        fingerprint=row["fingerprint"],
        change="update" if row["in_snapshot"] else "add",
        in_snapshot=row["in_snapshot"],
        klaviyo_id=row["klaviyo_id"],
        values=orjson.loads(values) if values else {},
        memo=row.get("memo"),
    )


def _forget_values(items: Sequence[Prepared], *, keep_json: bool) -> None:
    """Each item's values, once the journal has them (see `Prepared.forget_values`)."""
    if isinstance(items, Block):
        items.forget_values(keep_json=keep_json)
        return
    for item in items:
        item.forget_values(keep_json=keep_json)


def _journal_table(items: Sequence[Prepared], kept: bool) -> pa.Table:
    """A unit's records as the journal keeps them (`JOURNAL_SCHEMA`). When the records
    that carry their values' JSON keep it until the commit (`kept`:
    `Warehouse.values_until_commit`), the journal does without it: writing it was over a
    third of a first sync's CPU on DuckDB, only for a run after a crash, which records a
    followed job's rows as accepted with their values unknown (see `Block.journal_rows`)."""
    if isinstance(items, Block):
        return items.journal_rows(values=not kept)
    records = [p.record for p in items]
    return pa.table(
        {
            "position": list(range(len(items))),
            "key": [r.key for r in records],
            "fingerprint": [r.fingerprint for r in records],
            "memo": [r.memo for r in records],
            "in_snapshot": [r.in_snapshot for r in records],
            "klaviyo_id": [r.klaviyo_id for r in records],
            "accepted_values": [None if kept and r.values_json else r.json() for r in records],
            "body": [p.journal_body() for p in items],
        },
        schema=JOURNAL_SCHEMA,
    )


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with every column of `schema`, the missing ones NULL."""
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _outcome_table(outcome: Outcome, *, values: bool) -> pa.Table:
    """A batch's answers in the shape `Warehouse.commit` takes; with `values`, the JSON
    of what each accepted record sent (without, the journal has it, and only records shaped
    in Arrow that kept theirs bring it: `Warehouse.values_until_commit`). Accepted and
    removed records, most of any batch, are built a column at a time; each reject is a row
    of its own. Every text that came from Klaviyo is scrubbed of keys again before it is
    stored."""
    accepted = [*outcome.accepted, *((r, None) for r in outcome.already)]
    records = [r for r, _ in accepted]
    done = pa.table(
        {
            "key": [r.key for r in records],
            "outcome": pa.repeat("accepted", len(records)),
            "fingerprint": pa.array([r.fingerprint for r in records], pa.uint64()),
            "memo": pa.array([r.memo for r in records], pa.uint64()),
            "accepted_values": pa.array(
                [r.json() if values else r.values_json for r in records], pa.string()
            ),
            "klaviyo_id": pa.array([k or r.klaviyo_id for r, k in accepted], pa.string()),
            "in_snapshot": pa.array([r.in_snapshot for r in records], pa.bool_()),
        }
    )
    removed = pa.table(
        {
            "key": pa.array([r.key for r in outcome.removed], pa.string()),
            "outcome": pa.repeat("removed", len(outcome.removed)),
            "in_snapshot": pa.repeat(True, len(outcome.removed)),
        }
    )
    rejected = pa.Table.from_pylist(
        [
            {
                "key": j.key,
                "outcome": "invalid" if j.invalid_row else "rejected",
                "fingerprint": j.fingerprint,
                "in_snapshot": j.in_snapshot,
                "column_name": j.column,
                "field": j.field,
                "code": redact(j.code),
                "reason": redact(j.reason),
                "retry": j.retry,
            }
            for j in outcome.rejected
        ],
        schema=OUTCOME_SCHEMA,
    )
    blocks = [_conform(block.accepted_rows(), OUTCOME_SCHEMA) for block in outcome.blocks]
    return pa.concat_tables(
        [_conform(done, OUTCOME_SCHEMA), *blocks, rejected, _conform(removed, OUTCOME_SCHEMA)]
    )
