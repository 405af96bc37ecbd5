"""Profile upserts: one at a time through profile-import, or many through bulk import jobs.

Klaviyo's bulk import takes up to 10,000 profiles and 5 MB per job and reports failures per
profile, asynchronously; it is meant for volume, not for a handful of changes, so small
change sets go through `/api/profile-import` (or `/client/profiles` with `api: client`),
which answers per profile at once and tells us the profile's Klaviyo id.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from dbt_klaviyo_sync.errors import TransientApiError
from dbt_klaviyo_sync.klaviyo import lookup
from dbt_klaviyo_sync.klaviyo.client import ApiError, KlaviyoClient, KlaviyoRejected
from dbt_klaviyo_sync.payloads import Record, Reject, dumps, profile_resource, profile_size_reject
from dbt_klaviyo_sync.spec import SyncSpec

MAX_JOB_PROFILES = 10_000
MAX_JOB_BYTES = 5_000_000  # "5MB"; decimal, to stay under however Klaviyo counts it
_JOB_HEAD = b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":['
_JOB_TAIL = b"]}}}}"
_INDEX = re.compile(r"^/data/attributes/profiles/data/(\d+)")


@dataclass
class Outcome:
    """Klaviyo's answer for a group of records."""

    accepted: list[tuple[Record, str | None]] = field(default_factory=list)  # with Klaviyo id
    rejected: list[Reject] = field(default_factory=list)
    failed: list[tuple[Record, str]] = field(default_factory=list)  # with the passing reason

    def merge(self, other: Outcome) -> Outcome:
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.failed += other.failed
        return self


@dataclass(frozen=True)
class Prepared:
    """A record and its serialized `profile` resource."""

    record: Record
    body: bytes


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


def pack_jobs(prepared: Iterable[Prepared]) -> Iterator[list[Prepared]]:
    """Group records into jobs as full as Klaviyo allows: 10,000 profiles and 5 MB."""
    job: list[Prepared] = []
    size = len(_JOB_HEAD) + len(_JOB_TAIL)
    for item in prepared:
        if job and (len(job) == MAX_JOB_PROFILES or size + len(item.body) + 1 > MAX_JOB_BYTES):
            yield job
            job, size = [], len(_JOB_HEAD) + len(_JOB_TAIL)
        job.append(item)
        size += len(item.body) + 1
    if job:
        yield job


def _field(spec: SyncSpec, pointer: str | None) -> tuple[str | None, str | None]:
    """The (column, field) a JSON pointer into a profile resource names, if any."""
    if not pointer or "/attributes/" not in pointer:
        return None, None
    path = pointer.rsplit("/attributes/", 1)[1].replace("/", ".")
    for mapping in spec.fields:
        if mapping.field == path:
            return mapping.column, mapping.field
    return None, path or None


def _reject(spec: SyncSpec, record: Record, error: ApiError) -> Reject:
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
    "Merge those profiles in Klaviyo or correct the row; it is sent again when the row "
    "changes, or with --full-refresh."
)


def name_conflicts(client: KlaviyoClient, records: list[Record], outcome: Outcome) -> None:
    """Spell out each identifier conflict: which profile holds which of the row's
    identifiers. One lookup per identifier field and hundred conflicts."""
    by_key = {r.key: r for r in records}
    conflicts = {
        i: by_key[reject.key]
        for i, reject in enumerate(outcome.rejected)
        if reject.code == "duplicate_profile" and reject.key in by_key
    }
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


class ProfileUpserter:
    """Sends profile upserts for one sync spec and reports per record."""

    def __init__(self, client: KlaviyoClient, spec: SyncSpec, *, job_deadline: float = 1800.0):
        self.client = client
        self.spec = spec
        self.job_deadline = job_deadline

    def send_one(self, item: Prepared) -> Outcome:
        """profile-import (or the client endpoint): an immediate answer for one profile."""
        client_api = self.spec.api == "client"
        operation_id = "create_client_profile" if client_api else "create_or_update_profile"
        body = b'{"data":' + item.body + b"}"
        try:
            answer = self.client.call(operation_id, body=body)
        except KlaviyoRejected as exc:
            outcome = Outcome(rejected=[_reject(self.spec, item.record, exc.errors[0])])
            name_conflicts(self.client, [item.record], outcome)
            return outcome
        except TransientApiError as exc:
            return Outcome(failed=[(item.record, str(exc))])
        klaviyo_id = None if client_api else (answer or {}).get("data", {}).get("id")
        return Outcome(accepted=[(item.record, klaviyo_id)])

    def send_job(self, job: list[Prepared]) -> Outcome:
        """One bulk import job: create it, wait for it, map its import errors to rows."""
        body = _JOB_HEAD + b",".join(p.body for p in job) + _JOB_TAIL
        records = [p.record for p in job]
        try:
            created = self.client.call("bulk_import_profiles", body=body)
            job_id = created["data"]["id"]
            status = self._wait_for(job_id)
            if status != "complete":
                reason = (
                    f"bulk import job {job_id} ended {status}"
                    if status
                    else (
                        f"bulk import job {job_id} did not finish within {self.job_deadline:.0f} s"
                    )
                )
                return Outcome(failed=[(r, reason) for r in records])
            errors = self._import_errors(job_id)
        except KlaviyoRejected as exc:
            return self._split(job, exc)
        except TransientApiError as exc:
            return Outcome(failed=[(r, str(exc)) for r in records])
        outcome = self._map_errors(job_id, records, errors)
        name_conflicts(self.client, records, outcome)
        return outcome

    def _split(self, job: list[Prepared], refusal: KlaviyoRejected) -> Outcome:
        """Klaviyo refused the whole job, which imports nothing. Reject the profiles its
        errors point at and send the rest again; when the errors point at none, halve the
        job until the bad profile stands alone, so one bad row never sinks its neighbours."""
        named = {
            int(m.group(1)): e
            for e in refusal.errors
            if (m := _INDEX.match(e.pointer or "")) and int(m.group(1)) < len(job)
        }
        if len(job) == 1 and not named:
            named = {0: refusal.errors[0]}
        if named:
            outcome = Outcome(
                rejected=[_reject(self.spec, job[i].record, e) for i, e in named.items()]
            )
            rest = [p for i, p in enumerate(job) if i not in named]
            return outcome.merge(self.send_job(rest)) if rest else outcome
        half = len(job) // 2
        return self.send_job(job[:half]).merge(self.send_job(job[half:]))

    def _wait_for(self, job_id: str) -> str | None:
        """Poll the job until it ends; None when the deadline passes first."""
        deadline = time.monotonic() + self.job_deadline
        interval = 0.2
        while True:
            job = self.client.call("get_bulk_import_profiles_job", path_params=(job_id,))
            status: str = job["data"]["attributes"]["status"]
            if status in ("complete", "cancelled"):
                return status
            if time.monotonic() + interval > deadline:
                return None
            time.sleep(interval)
            interval = min(interval * 1.5, 5.0)

    def _import_errors(self, job_id: str) -> list[dict[str, Any]]:
        return list(
            self.client.pages(
                "get_errors_for_bulk_import_profiles_job",
                path_params=(job_id,),
                params={"page[size]": "100"},
            )
        )

    def _map_errors(
        self, job_id: str, records: list[Record], errors: list[dict[str, Any]]
    ) -> Outcome:
        """Each import error names its profile by index (or by its payload); every other
        profile was imported. An error we cannot place makes the unplaced profiles pending,
        so nothing is recorded as synced that might not be."""
        by_key = {r.key: r for r in records}
        outcome = Outcome()
        rejected: set[str] = set()
        unplaced = 0
        for error in errors:
            attributes = error.get("attributes") or {}
            source = attributes.get("source") or {}
            record = self._place(records, by_key, source.get("pointer"), attributes)
            if record is None or record.key in rejected:
                unplaced += record is None
                continue
            rejected.add(record.key)
            outcome.rejected.append(
                _reject(
                    self.spec,
                    record,
                    ApiError(
                        400,
                        str(attributes.get("code", "invalid")),
                        str(attributes.get("detail") or attributes.get("title") or ""),
                        source.get("pointer"),
                    ),
                )
            )
        for record in records:
            if record.key in rejected:
                continue
            if unplaced:
                outcome.failed.append(
                    (
                        record,
                        f"bulk import job {job_id} reported errors that could not be "
                        "matched to rows; sending again next run",
                    )
                )
            else:
                outcome.accepted.append((record, None))
        return outcome

    def _place(
        self,
        records: list[Record],
        by_key: dict[str, Record],
        pointer: str | None,
        attributes: dict[str, Any],
    ) -> Record | None:
        match = _INDEX.match(pointer or "")
        if match and int(match.group(1)) < len(records):
            return records[int(match.group(1))]
        payload = attributes.get("original_payload") or {}
        payload = payload.get("attributes", payload) if isinstance(payload, dict) else {}
        key = payload.get(self.spec.key_field) if isinstance(payload, dict) else None
        return by_key.get(str(key)) if key is not None else None
