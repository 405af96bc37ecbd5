"""Profiles: upserts (Update or Create) and updates of existing profiles (Update Only).

Klaviyo's bulk import takes up to 10,000 profiles and 5 MB per job. It refuses a job with an
invalid profile at once (a 400 pointing at each), and reports what only the account shows
(identifiers on two profiles) per profile, asynchronously, as import errors. It is meant
for volume, not for a handful of changes, so small change sets go one request per profile:
`/api/profile-import` (or `/client/profiles` with `api: client`), or
`PATCH /api/profiles/{id}` for updates, which answer at once and tell us the profile's
Klaviyo id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import orjson
import pyarrow.compute as pc

from dbt_klaviyo_sync.changeset import Record, Reject
from dbt_klaviyo_sync.errors import TransientApiError
from dbt_klaviyo_sync.klaviyo import lookup
from dbt_klaviyo_sync.klaviyo.client import ApiError, KlaviyoClient, KlaviyoRejected, dig
from dbt_klaviyo_sync.klaviyo.outcomes import (
    Block,
    Outcome,
    Prepared,
    Unit,
    about_the_record,
    chunks,
    each,
    records_of,
    send_each,
    send_isolating,
    wait_for_job,
)
from dbt_klaviyo_sync.payloads import dumps, profile_resource, profile_size_reject
from dbt_klaviyo_sync.spec import SyncSpec

MAX_JOB_PROFILES = 10_000
MAX_JOB_BYTES = 5_000_000  # "5MB"; decimal, to stay under however Klaviyo counts it
#: Profiles sent one request each are grouped so that each group is one state commit.
SINGLES_PER_UNIT = 50
_JOB_HEAD = b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":['
_INDEX = re.compile(r"^/data/attributes/profiles/data/(\d+)")
_IDENTIFIERS = ("email", "phone_number", "external_id")


def prepare(spec: SyncSpec, records: Iterable[Record]) -> tuple[list[Prepared], list[Reject]]:
    """Serialize each record once; the bytes are reused for size checks and for sending."""
    ready, too_large = [], []
    for record in records:
        body = dumps(profile_resource(spec, record))
        reject = profile_size_reject(spec, record, body)
        if reject:
            too_large.append(reject)
        else:
            ready.append(Prepared(record, body))
    return ready, too_large


def with_id(body: bytes, klaviyo_id: str) -> bytes:
    """A serialized profile resource, targeted at one Klaviyo profile."""
    return b'{"id":' + orjson.dumps(klaviyo_id) + b"," + body[1:]


def _job_tail(list_id: str | None) -> bytes:
    if list_id is None:
        return b"]}}}}"
    lists = {"lists": {"data": [{"type": "list", "id": list_id}]}}
    return b']}},"relationships":' + orjson.dumps(lists) + b"}}"


def pack_jobs(
    prepared: Iterable[Prepared | Block], list_id: str | None = None
) -> Iterator[Sequence[Prepared]]:
    """Group records into jobs as full as Klaviyo allows: 10,000 profiles and 5 MB. Blocks
    of rows shaped in Arrow are packed in jobs of their own, a few vectorised steps a job."""
    empty = len(_JOB_HEAD) + len(_job_tail(list_id)) + 64  # room for an id per profile
    job: list[Prepared] = []
    size = empty
    rows: Block | None = None
    for item in prepared:
        if isinstance(item, Block):
            rows = item if rows is None else rows.joined(item)
            while rows is not None and (fits := _rows_that_fit(rows, empty)) is not None:
                full, rest = rows.split(fits)
                yield full
                rows = rest if len(rest) else None
            continue
        cost = len(item.body) + _PROFILE_OVERHEAD
        if job and (len(job) == MAX_JOB_PROFILES or size + cost > MAX_JOB_BYTES):
            yield job
            job, size = [], empty
        job.append(item)
        size += cost
    for last in (job, rows):
        if last:
            yield last


#: What a profile adds to a job's body beyond its own: a comma, and an id if the job
#: targets profiles by id.
_PROFILE_OVERHEAD = 40


def _rows_that_fit(block: Block, empty: int) -> int | None:
    """How many of the block's first rows make a full job; None while they do not fill one."""
    costs = pc.add(block.body_sizes(), _PROFILE_OVERHEAD)
    within = pc.less_equal(pc.cumulative_sum(costs), MAX_JOB_BYTES - empty)
    fits = min(int(pc.sum(within).as_py() or 0), MAX_JOB_PROFILES)
    if fits == len(block) < MAX_JOB_PROFILES:
        return None
    return max(fits, 1)


def _field(spec: SyncSpec, pointer: str | None) -> tuple[str | None, str | None]:
    """The (column, field) a JSON pointer into a profile resource names, if any."""
    if not pointer or "/attributes/" not in pointer:
        return None, None
    path = pointer.rsplit("/attributes/", 1)[1].replace("/", ".")
    for mapping in spec.fields:
        if mapping.field == path:
            return mapping.column, mapping.field
    return None, path or None


def profile_reject(spec: SyncSpec, record: Record, error: ApiError) -> Reject:
    column, field_name = _field(spec, error.pointer)
    reason = error.detail
    if error.code == "duplicate_profile" or error.meta.get("duplicate_profile_id"):
        other = error.meta.get("duplicate_profile_id")
        reason = (
            f"Klaviyo holds this row's identifiers on different profiles (the other one: "
            f"{other or 'not named by Klaviyo'}). {_CONFLICT_ADVICE}"
        )
        return Reject(
            record.key, record.fingerprint, record.in_snapshot, "duplicate_profile", reason
        )
    return Reject(
        record.key,
        record.fingerprint,
        record.in_snapshot,
        error.code or "rejected",
        reason,
        column,
        field_name,
    )


_CONFLICT_ADVICE = (
    "Merge those profiles in Klaviyo or correct the row; it is tried again on every run "
    "until one of them is done."
)


def name_conflicts(client: KlaviyoClient, records: Sequence[Record], outcome: Outcome) -> None:
    """Spell out each identifier conflict: which profile holds which of the row's
    identifiers. One lookup per identifier field and hundred conflicts."""
    rejected = enumerate(outcome.rejected)
    duplicates = [(i, reject) for i, reject in rejected if reject.code == "duplicate_profile"]
    if not duplicates:
        return  # most jobs: nothing to look at per profile
    by_key = {r.key: r for r in records}
    conflicts = {i: by_key[reject.key] for i, reject in duplicates if reject.key in by_key}
    if not conflicts:
        return
    try:
        owners = {
            field: lookup.profile_ids(
                client,
                field,
                [str(r.values[field]) for r in conflicts.values() if r.values.get(field)],
            )
            for field in lookup.LOOKUP_FIELDS
        }
    except (TransientApiError, KlaviyoRejected):
        return  # keep Klaviyo's own words; the lookup only adds detail
    for i, record in conflicts.items():
        held = {
            field: (value, owner)
            for field in lookup.LOOKUP_FIELDS
            if (value := record.values.get(field))
            and (owner := owners[field].get(lookup.normalise(field, str(value))))
        }
        if len({owner for _, owner in held.values()}) > 1:
            where = ", ".join(f"{f} {v!r} on profile {o}" for f, (v, o) in held.items())
            reason = f"Klaviyo holds this row's identifiers on different profiles: {where}. "
            outcome.rejected[i] = replace(outcome.rejected[i], reason=reason + _CONFLICT_ADVICE)


def clears_a_value(spec: SyncSpec, record: Record) -> bool:
    """Whether an update may clear a value Klaviyo holds (`nulls: clear`), which bulk import
    jobs do not do: they do "not support setting fields to null to clear them". A row sent
    for the first time goes in a job all the same: its NULLs have nothing of ours to clear,
    and sending every new row with a NULL one by one would make a first sync take days."""
    return (
        spec.nulls == "clear"
        and record.change == "update"
        and any(value is None for value in record.values.values())
    )


class BulkImport:
    """One bulk import job: create it, record its id, wait for it, and map its import
    errors to rows. A job whose answer a killed run never saw is followed by the next run
    (`resume`) instead of being sent again."""

    def __init__(
        self, client: KlaviyoClient, spec: SyncSpec, job_deadline: float, list_id: str | None
    ) -> None:
        self.client = client
        self.spec = spec
        self.job_deadline = job_deadline
        self.list_id = list_id

    def send(self, unit: Unit, ids: dict[str, str] | None = None) -> Outcome:
        """Import the unit's records; with `ids`, each profile is updated by its Klaviyo id
        (a key's id). Klaviyo validates a job when it is created: a refusal that points at
        profiles rejects those, and the rest go again in a new job."""
        return send_isolating(
            unit.items,
            lambda part: self._attempt(unit, part, ids),
            lambda _, e: profile_index(e),
            self._reject,
        )

    def _attempt(self, unit: Unit, job: Sequence[Prepared], ids: dict[str, str] | None) -> Outcome:
        """Create the job (a refusal of it propagates), record its id, follow it."""
        records = records_of(job)
        try:
            job_id = self._create(job, ids)
        except TransientApiError as exc:
            return Outcome(failed=[(r, str(exc)) for r in records])
        unit.job_created(job_id)
        return self.follow(job_id, records, ids or {})

    def _create(self, job: Sequence[Prepared], ids: dict[str, str] | None) -> str:
        """Create the job; its id. The body (up to 5 MB) lives only here, not while the
        job is followed."""
        tail = _job_tail(self.list_id)
        if isinstance(job, Block) and not ids:
            body = job.bodies(_JOB_HEAD, tail)
        else:
            profiles = b",".join(with_id(p.body, ids[p.record.key]) if ids else p.body for p in job)
            body = _JOB_HEAD + profiles + tail
        created = self.client.call("bulk_import_profiles", body=body)
        return str(dig(created, "data", "id", operation="bulk_import_profiles"))

    def resume(self, job_id: str, records: list[Record], *, within: float) -> Outcome | None:
        """Follow a job an earlier run created, for what is left of its job timeout
        (`within` seconds, at least one look): its outcome once it is complete; None when
        Klaviyo no longer knows it, cancelled it, or it outlived its timeout, so that its
        records are sent again. When it cannot be followed now, its records come back
        failed: they wait for it (sent meanwhile, they could land before its older values)."""
        try:
            status = self._wait_for(job_id, max(within, 0.0))
        except KlaviyoRejected as exc:
            if exc.status == 404:
                return None
            return self._unfollowed(job_id, records, exc)
        except TransientApiError as exc:
            return self._unfollowed(job_id, records, exc)
        if status != "complete":
            return None
        return self._ended(job_id, status, records, {})

    def follow(self, job_id: str, records: Sequence[Record], ids: dict[str, str]) -> Outcome:
        """Wait for a job just created, then map its import errors to its records."""
        try:
            status = self._wait_for(job_id, self.job_deadline)
        except (TransientApiError, KlaviyoRejected) as exc:
            return self._unfollowed(job_id, records, exc)
        return self._ended(job_id, status, records, ids)

    def _ended(
        self, job_id: str, status: str | None, records: Sequence[Record], ids: dict[str, str]
    ) -> Outcome:
        if status != "complete":
            reason = (
                f"bulk import job {job_id} ended {status}"
                if status
                else f"bulk import job {job_id} did not finish within {self.job_deadline:.0f} s"
            )
            return Outcome(failed=[(r, reason) for r in records])
        try:
            errors = list(
                self.client.pages(
                    "get_errors_for_bulk_import_profiles_job",
                    path_params=(job_id,),
                    params={"page[size]": "100"},
                )
            )
        except (TransientApiError, KlaviyoRejected) as exc:
            return self._unfollowed(job_id, records, exc)
        outcome = self._map_errors(job_id, records, errors, ids)
        name_conflicts(self.client, records, outcome)
        return outcome

    @staticmethod
    def _unfollowed(job_id: str, records: Sequence[Record], error: Exception) -> Outcome:
        reason = f"bulk import job {job_id} could not be followed: {error}"
        return Outcome(failed=[(r, reason) for r in records])

    def _reject(self, record: Record, error: ApiError) -> Reject:
        return profile_reject(self.spec, record, error)

    def _wait_for(self, job_id: str, seconds: float) -> str | None:
        return wait_for_job(self.client, "get_bulk_import_profiles_job", job_id, seconds)

    def _map_errors(
        self,
        job_id: str,
        records: Sequence[Record],
        errors: list[dict[str, Any]],
        ids: dict[str, str],
    ) -> Outcome:
        """Each import error names its profile by index (or by its payload); every other
        profile was imported. An error we cannot place makes the unplaced profiles pending,
        so nothing is recorded as synced that might not be."""
        if not errors:
            return Outcome.accepting(records, ids)
        by_key = {r.key: r for r in records}
        outcome = Outcome()
        rejected: set[str] = set()
        unplaced = 0
        for error in errors:
            attributes = _object(error, "attributes")
            source = _object(attributes, "source")
            record = self._place(records, by_key, source.get("pointer"), attributes)
            if record is None or record.key in rejected:
                unplaced += record is None
                continue
            rejected.add(record.key)
            detail = str(attributes.get("detail") or attributes.get("title") or "")
            code = str(attributes.get("code", "invalid"))
            outcome.rejected.append(
                self._reject(record, ApiError(400, code, detail, source.get("pointer")))
            )
        for record in records:
            if record.key in rejected:
                continue
            if unplaced:
                reason = (
                    f"bulk import job {job_id} reported errors that could not be matched to "
                    "rows; sending again next run"
                )
                outcome.failed.append((record, reason))
            else:
                outcome.accepted.append((record, ids.get(record.key)))
        return outcome

    def _place(
        self,
        records: Sequence[Record],
        by_key: dict[str, Record],
        pointer: str | None,
        attributes: dict[str, Any],
    ) -> Record | None:
        index = profile_index(ApiError(400, "", "", pointer if isinstance(pointer, str) else None))
        if index is not None and index < len(records):
            return records[index]
        payload = attributes.get("original_payload") or {}
        payload = payload.get("attributes", payload) if isinstance(payload, dict) else {}
        key = payload.get(self.spec.key_field) if isinstance(payload, dict) else None
        return by_key.get(str(key)) if key is not None else None


def _object(parent: Any, name: str) -> dict[str, Any]:
    """`parent[name]` when both are JSON objects, else an empty one: an import error that
    lacks a part is simply not placed."""
    found = parent.get(name) if isinstance(parent, dict) else None
    return found if isinstance(found, dict) else {}


def profile_index(error: ApiError) -> int | None:
    match = _INDEX.match(error.pointer or "")
    return int(match.group(1)) if match else None


class ProfileUpserter:
    """Update or Create: upsert each changed row's profile; for a list mirror, also make
    it a member of the list (a bulk job adds to the list in the same request)."""

    @property
    def journaled(self) -> bool:
        """Bulk jobs are journaled, to be followed after a kill; single upserts are not:
        sending one again does no harm."""
        return self.bulk

    def __init__(
        self,
        client: KlaviyoClient,
        spec: SyncSpec,
        *,
        bulk: bool,
        job_deadline: float,
        list_id: str | None = None,
    ) -> None:
        self.client = client
        self.spec = spec
        self.bulk = bulk
        self.list_id = list_id
        self.jobs = BulkImport(client, spec, job_deadline, list_id)

    def prepare(self, records: list[Record]) -> tuple[list[Prepared], list[Reject]]:
        return prepare(self.spec, records)

    def units(self, prepared: Iterable[Prepared | Block]) -> Iterator[Sequence[Prepared]]:
        if self.bulk:
            return self._bulk_units(prepared)
        return chunks(each(prepared), SINGLES_PER_UNIT)

    def _bulk_units(self, prepared: Iterable[Prepared | Block]) -> Iterator[Sequence[Prepared]]:
        """Import jobs, except for records that clear a value: a bulk job ignores nulls,
        so those go one by one (after each job, so that few wait in memory). A block's
        rows clear nothing: a NULL under `nulls: clear` is never shaped in Arrow."""
        clearing: list[Prepared] = []

        def for_jobs() -> Iterator[Prepared | Block]:
            for item in prepared:
                if isinstance(item, Prepared) and clears_a_value(self.spec, item.record):
                    clearing.append(item)
                else:
                    yield item

        for job in pack_jobs(for_jobs(), self.list_id):
            yield job
            yield from chunks(clearing, SINGLES_PER_UNIT)
            clearing.clear()
        yield from chunks(clearing, SINGLES_PER_UNIT)

    def send(self, unit: Unit) -> Outcome:
        if self.bulk and (
            isinstance(unit.items, Block) or not clears_a_value(self.spec, unit.items[0].record)
        ):
            return self.jobs.send(unit)
        outcome = send_each(unit.items, self._send_one)
        if self.list_id and outcome.accepted:
            outcome = self._add_to_list(outcome)
        return outcome

    def _send_one(self, item: Prepared) -> Outcome:
        """profile-import (or the client endpoint): an immediate answer for one profile."""
        client_api = self.spec.api == "client"
        operation_id = "create_client_profile" if client_api else "create_or_update_profile"
        try:
            answer = self.client.call(operation_id, body=b'{"data":' + item.body + b"}")
            klaviyo_id = None if client_api else dig(answer, "data", "id", operation=operation_id)
        except KlaviyoRejected as exc:
            error = about_the_record(exc)
            if error is None:
                return Outcome.refused([item.record], exc)
            outcome = Outcome(rejected=[profile_reject(self.spec, item.record, error)])
            name_conflicts(self.client, [item.record], outcome)
            return outcome
        except TransientApiError as exc:
            return Outcome(failed=[(item.record, str(exc))])
        return Outcome(accepted=[(item.record, klaviyo_id and str(klaviyo_id))])

    def _add_to_list(self, outcome: Outcome) -> Outcome:
        """Add the upserted profiles to the list by id (a unit is far below 1,000). If that
        fails, they count as failed and are sent again: both steps are idempotent."""
        ids = [{"type": "profile", "id": klaviyo_id} for _, klaviyo_id in outcome.accepted]
        try:
            self.client.call(
                "add_profiles_to_list",
                path_params=(str(self.list_id),),
                body=orjson.dumps({"data": ids}),
            )
        except KlaviyoRejected as exc:
            records = [record for record, _ in outcome.accepted]
            outcome.accepted = []
            return outcome.merge(Outcome.refused(records, exc))
        except TransientApiError as exc:
            reason = f"upserted, but not added to list {self.list_id}: {exc}"
            outcome.failed += [(record, reason) for record, _ in outcome.accepted]
            outcome.accepted = []
        return outcome


class ProfileUpdater:
    """Update Only: change profiles Klaviyo already has, never create one.

    Each unit looks its profiles up in bulk (by the Klaviyo id when the model maps one, as
    it wins over other identifiers, else by the sync key). A key with no profile is
    rejected as not found. A row whose email, phone or external id differs from Klaviyo's
    is sent with `PATCH /api/profiles/{id}`, the only way to change an identifier; the
    rest go the same way when few changed, or as bulk import jobs targeted by id.
    """

    #: Records looked up and updated together: ten lookup pages.
    UNIT = 1000

    @property
    def journaled(self) -> bool:
        """Bulk jobs are journaled, to be followed after a kill; single upserts are not:
        sending one again does no harm."""
        return self.bulk

    def __init__(self, client: KlaviyoClient, spec: SyncSpec, *, bulk: bool, job_deadline: float):
        self.client = client
        self.spec = spec
        self.bulk = bulk
        self.jobs = BulkImport(client, spec, job_deadline, None)

    def prepare(self, records: list[Record]) -> tuple[list[Prepared], list[Reject]]:
        return prepare(self.spec, records)

    def units(self, prepared: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        return chunks(prepared, self.UNIT)

    def send(self, unit: Unit) -> Outcome:
        try:
            found = self._find(unit.items)
        except (KlaviyoRejected, TransientApiError) as exc:
            return Outcome.unanswered(unit.records, exc, "looking the profile up failed")
        outcome = Outcome()
        patch, job = [], []
        for item in unit.items:
            profile = found.get(item.record.key)
            if profile is None:
                outcome.rejected.append(self._not_found(item.record))
            elif (
                not self.bulk
                or self._changes_identifiers(item.record, profile)
                or clears_a_value(self.spec, item.record)
            ):
                patch.append((item, profile["id"]))
            else:
                job.append(item)
        ids = {item.record.key: klaviyo_id for item, klaviyo_id in patch}
        patched = [item for item, _ in patch]
        outcome.merge(send_each(patched, lambda item: self._patch(item, ids[item.record.key])))
        if job:
            ids = {p.record.key: found[p.record.key]["id"] for p in job}
            outcome.merge(self.jobs.send(replace(unit, items=job), ids))
        return outcome

    def _find(self, unit: Sequence[Prepared]) -> dict[str, dict[str, Any]]:
        """Each record's current Klaviyo profile, by record key."""
        by_id = [p.record for p in unit if p.record.values.get("klaviyo_id")]
        by_key = [p.record for p in unit if not p.record.values.get("klaviyo_id")]
        found: dict[str, dict[str, Any]] = {}
        if by_id:
            profiles = lookup.profiles_by(
                self.client, "id", [str(r.values["klaviyo_id"]) for r in by_id]
            )
            found |= {
                r.key: profiles[str(r.values["klaviyo_id"])]
                for r in by_id
                if str(r.values["klaviyo_id"]) in profiles
            }
        if by_key:
            field = "id" if self.spec.key_field == "klaviyo_id" else self.spec.key_field
            values = {r.key: str(r.values[self.spec.key_field]) for r in by_key}
            profiles = lookup.profiles_by(self.client, field, values.values())
            found |= {
                key: profiles[lookup.normalise(field, value)]
                for key, value in values.items()
                if lookup.normalise(field, value) in profiles
            }
        return found

    def _changes_identifiers(self, record: Record, profile: dict[str, Any]) -> bool:
        current = profile.get("attributes") or {}
        return any(
            record.values.get(f) is not None
            and lookup.normalise(f, str(record.values[f]))
            != lookup.normalise(f, str(current.get(f) or ""))
            for f in _IDENTIFIERS
        )

    def _not_found(self, record: Record) -> Reject:
        return Reject(
            record.key,
            record.fingerprint,
            record.in_snapshot,
            "not_found",
            f"Klaviyo has no profile with this {self.spec.key_field}; update_only never "
            "creates one (use behavior: upsert to create it)",
        )

    def _patch(self, item: Prepared, klaviyo_id: str) -> Outcome:
        body = b'{"data":' + with_id(item.body, klaviyo_id) + b"}"
        try:
            self.client.call("update_profile", path_params=(klaviyo_id,), body=body)
        except KlaviyoRejected as exc:
            if exc.status == 404:
                return Outcome(rejected=[self._not_found(item.record)])
            error = about_the_record(exc)
            if error is None:
                return Outcome.refused([item.record], exc)
            outcome = Outcome(rejected=[profile_reject(self.spec, item.record, error)])
            name_conflicts(self.client, [item.record], outcome)
            return outcome
        except TransientApiError as exc:
            return Outcome(failed=[(item.record, str(exc))])
        return Outcome(accepted=[(item.record, klaviyo_id)])
