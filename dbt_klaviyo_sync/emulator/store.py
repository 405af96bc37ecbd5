"""The in-memory Klaviyo account: profiles, lists and bulk import jobs, behind one lock.

Every public method takes the lock for its whole run, so concurrent requests see each
other's effects whole, never half. Methods hand out snapshots, never the live records.

Bulk jobs have no thread of their own: every call first advances the jobs that are due
(`_advance`), so a job completes on time whether or not anybody polls it, and there is
nothing running in the background to race with.
"""

from __future__ import annotations

import secrets
import string
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import orjson

from .errors import not_found
from .filters import Condition
from .profiles import (
    IDENTIFIERS,
    Profile,
    RecordError,
    checked_identifiers,
    index_key,
    merge,
    record_invalid,
    render,
    timestamp,
)

#: "The maximum allowed payload size per-profile is 100KB." (API.md §2.2)
PROFILE_MAX_BYTES = 100 * 1024
#: How long a finished job stays readable. Klaviyo does not document it.
JOB_RETENTION_SECONDS = 7 * 24 * 3600

JobStatus = Literal["queued", "processing", "complete"]


@dataclass(frozen=True)
class KlaviyoList:
    id: str
    name: str
    created: float
    opt_in_process: str | None


@dataclass(frozen=True)
class Failure:
    """One record of a bulk job that Klaviyo refused: an import error."""

    id: str
    index: int
    error: RecordError
    payload: dict[str, Any]


@dataclass
class BulkJob:
    """A profile bulk import job.

    `failures` and `profile_ids` are assigned once, when the job runs, never appended to,
    so a snapshot taken earlier cannot see them change.
    """

    id: str
    records: Sequence[dict[str, Any]]
    list_ids: tuple[str, ...]
    created_at: float
    stuck: bool
    status: JobStatus = "queued"
    started_at: float | None = None
    completed_at: float | None = None
    failures: Sequence[Failure] = ()
    profile_ids: Sequence[str] = ()

    @property
    def total_count(self) -> int:
        return len(self.records)

    @property
    def failed_count(self) -> int:
        return len(self.failures)

    @property
    def completed_count(self) -> int:
        return self.total_count - self.failed_count if self.status == "complete" else 0

    @property
    def expires_at(self) -> float | None:
        return None if self.completed_at is None else self.completed_at + JOB_RETENTION_SECONDS


class Account:
    """One Klaviyo account with Klaviyo's semantics for profiles, lists and bulk jobs."""

    def __init__(self, job_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._job_seconds = job_seconds
        self._clock = clock
        self._clear()

    def _clear(self) -> None:
        self._profiles: dict[str, Profile] = {}
        self._index: dict[str, dict[str, str]] = {name: {} for name in IDENTIFIERS}
        self._lists: dict[str, KlaviyoList] = {}
        self._members: dict[str, dict[str, None]] = {}  # list id -> ordered set of profile ids
        self._jobs: dict[str, BulkJob] = {}

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def advance(self) -> None:
        """Run the bulk jobs that are due."""
        with self._lock:
            self._advance()

    # Profiles

    def upsert(self, resource: dict[str, Any], *, client: bool = False) -> tuple[Profile, bool]:
        """Create or update a profile from a profile-import resource; True when created.

        `client` is POST /client/profiles: identifiers a profile already has are not changed.
        """
        with self._lock:
            self._advance()
            profile, created = self._upsert(resource, client=client)
            return profile.snapshot(), created

    def update(self, profile_id: str, resource: dict[str, Any]) -> Profile:
        """PATCH /api/profiles/{id}: a partial update of a known profile (API.md §2.5)."""
        with self._lock:
            self._advance()
            profile = self._profiles.get(profile_id)
            if profile is None:
                raise RecordError(404, "not_found", "Not found.", _no_profile(profile_id), "/id")
            given = checked_identifiers(resource["attributes"])
            for name, value in given.items():
                owner = self._owner(name, value)
                if owner is not None and owner != profile.id:
                    raise _duplicate(owner)
            before = profile.content()
            self._set_identifiers(profile, given, keep_existing=False)
            merge(profile, resource["attributes"], resource.get("meta"))
            if profile.content() != before:
                profile.updated = self._clock()
            return profile.snapshot()

    def profile_ids(self, conditions: Iterable[Condition] = ()) -> list[str]:
        """Ids of the profiles meeting every condition, oldest first."""
        with self._lock:
            self._advance()
            wanted: set[str] | None = None
            for condition in conditions:
                matching = {
                    owner
                    for value in condition.values
                    if (owner := self._condition_owner(condition.field, value)) is not None
                }
                wanted = matching if wanted is None else wanted & matching
            if wanted is None:
                return list(self._profiles)
            return [profile_id for profile_id in self._profiles if profile_id in wanted]

    def profiles(self, profile_ids: Iterable[str]) -> list[Profile]:
        with self._lock:
            return [self._profiles[i].snapshot() for i in profile_ids if i in self._profiles]

    def _condition_owner(self, name: str, value: str) -> str | None:
        if name == "id":
            return value if value in self._profiles else None
        return self._owner(name, value)

    def _owner(self, name: str, value: str | None) -> str | None:
        return None if value is None else self._index[name].get(index_key(name, value))

    def _upsert(self, resource: dict[str, Any], *, client: bool) -> tuple[Profile, bool]:
        attributes = resource["attributes"]
        given = checked_identifiers(attributes)
        owners = [self._owner(name, value) for name, value in given.items()]
        matched = list(dict.fromkeys(owner for owner in owners if owner is not None))
        profile_id = resource.get("id")
        if profile_id is not None:
            profile = self._profiles.get(profile_id)
            if profile is None:
                raise RecordError(404, "not_found", "Not found.", _no_profile(profile_id), "/id")
            if any(owner != profile_id for owner in matched):
                # Reported as 404 rather than 409 when the id is given (API.md §5).
                detail = f"Another profile has one of the identifiers given for {profile_id}."
                raise RecordError(404, "not_found", "Not found.", detail, "/id")
            created = False
        elif len(matched) > 1:
            # The identifiers are tried in IDENTIFIERS order: the first match is the profile
            # meant, the next different one is the duplicate.
            raise _duplicate(matched[1])
        elif matched:
            profile, created = self._profiles[matched[0]], False
        elif not any(value is not None for value in given.values()):
            raise record_invalid(
                "A profile needs at least one of email, phone_number or external_id.",
                "/attributes",
            )
        else:
            now = self._clock()
            profile, created = Profile(_ulid(now), now, now), True
            self._profiles[profile.id] = profile
        before = profile.content()
        self._set_identifiers(profile, given, keep_existing=client and not created)
        merge(profile, attributes, resource.get("meta"))
        if not created and profile.content() != before:
            profile.updated = self._clock()
        return profile, created

    def _set_identifiers(
        self, profile: Profile, given: dict[str, str | None], *, keep_existing: bool
    ) -> None:
        """Set or clear identifiers, keeping the index in step.

        With `keep_existing` (client endpoints, API.md §2.3) an identifier the profile
        already has is left as it is; an empty one may still be filled in.
        """
        fields = dict(profile.fields)
        for name, value in given.items():
            current = fields.get(name)
            if keep_existing and current is not None:
                continue
            if current is not None:
                del self._index[name][index_key(name, current)]
                del fields[name]
            if value is not None:
                fields[name] = value
                self._index[name][index_key(name, value)] = profile.id
        profile.fields = fields

    # Lists

    def create_list(self, name: str, opt_in_process: str | None = None) -> KlaviyoList:
        with self._lock:
            self._advance()
            list_id = _list_id()
            while list_id in self._lists:
                list_id = _list_id()
            created = KlaviyoList(list_id, name, self._clock(), opt_in_process)
            self._lists[list_id] = created
            self._members[list_id] = {}
            return created

    def get_list(self, list_id: str) -> KlaviyoList | None:
        with self._lock:
            self._advance()
            return self._lists.get(list_id)

    def lists(self, conditions: Iterable[Condition] = ()) -> list[KlaviyoList]:
        with self._lock:
            self._advance()
            found = list(self._lists.values())
        for condition in conditions:
            found = [item for item in found if getattr(item, condition.field) in condition.values]
        return found

    def members(self, list_id: str) -> list[str]:
        with self._lock:
            self._advance()
            return list(self._known_list(list_id))

    def add_members(self, list_id: str, profile_ids: Sequence[str]) -> None:
        with self._lock:
            self._advance()
            members = self._known_list(list_id)
            self._known_profiles(profile_ids)
            members.update(dict.fromkeys(profile_ids))

    def remove_members(self, list_id: str, profile_ids: Sequence[str]) -> None:
        with self._lock:
            self._advance()
            members = self._known_list(list_id)
            self._known_profiles(profile_ids)
            for profile_id in profile_ids:
                members.pop(profile_id, None)

    def _known_list(self, list_id: str) -> dict[str, None]:
        if list_id not in self._members:
            raise not_found(f"A list with id {list_id} does not exist.")
        return self._members[list_id]

    def _known_profiles(self, profile_ids: Sequence[str]) -> None:
        for index, profile_id in enumerate(profile_ids):
            if profile_id not in self._profiles:
                raise not_found(_no_profile(profile_id), pointer=f"/data/{index}/id")

    # Bulk import jobs

    def create_job(
        self, records: Sequence[dict[str, Any]], list_ids: Sequence[str], *, stuck: bool
    ) -> BulkJob:
        """Queue a bulk import; it runs `job_seconds` later (never, when `stuck`)."""
        with self._lock:
            self._advance()
            for index, list_id in enumerate(list_ids):
                if list_id not in self._lists:
                    raise not_found(
                        f"A list with id {list_id} does not exist.",
                        pointer=f"/data/relationships/lists/data/{index}/id",
                    )
            now = self._clock()
            job = BulkJob(_ulid(now), records, tuple(list_ids), now, stuck)
            self._jobs[job.id] = job
            return replace(job)

    def job(self, job_id: str) -> BulkJob | None:
        with self._lock:
            self._advance()
            job = self._jobs.get(job_id)
            return None if job is None else replace(job)

    def _advance(self) -> None:
        now = self._clock()
        for job in self._jobs.values():
            if job.status == "queued" and now >= job.created_at + self._job_seconds / 2:
                job.status, job.started_at = "processing", now
            if (
                job.status == "processing"
                and not job.stuck
                and now >= job.created_at + self._job_seconds
            ):
                self._run(job, now)

    def _run(self, job: BulkJob, now: float) -> None:
        """Upsert every record exactly as profile-import would; refused ones become failures."""
        failures: list[Failure] = []
        profile_ids: dict[str, None] = {}
        for index, record in enumerate(job.records):
            try:
                if len(orjson.dumps(record)) > PROFILE_MAX_BYTES:
                    raise record_invalid("The profile payload exceeds the 100KB limit.", "")
                profile, _ = self._upsert(record, client=False)
            except RecordError as error:
                payload = record.get("attributes") or {}
                failures.append(Failure(_ulid(now), index, error, payload))
                continue
            profile_ids[profile.id] = None
        for list_id in job.list_ids:
            self._members[list_id].update(profile_ids)
        job.failures, job.profile_ids = failures, list(profile_ids)
        job.status, job.completed_at = "complete", now

    # The whole account, for tests and the control endpoint

    def state(self, base_url: str) -> dict[str, Any]:
        with self._lock:
            self._advance()
            return {
                "profiles": [render(profile, base_url) for profile in self._profiles.values()],
                "lists": [
                    {
                        "id": item.id,
                        "name": item.name,
                        "opt_in_process": item.opt_in_process,
                        "members": list(self._members[item.id]),
                    }
                    for item in self._lists.values()
                ],
                "bulk_jobs": [_job_state(job) for job in self._jobs.values()],
            }


def _job_state(job: BulkJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "created_at": timestamp(job.created_at),
        "total_count": job.total_count,
        "completed_count": job.completed_count,
        "failed_count": job.failed_count,
        "list_ids": list(job.list_ids),
        "profile_ids": list(job.profile_ids),
        "errors": [
            {"index": failure.index, "code": failure.error.code, "detail": failure.error.detail}
            for failure in job.failures
        ],
    }


def _duplicate(profile_id: str) -> RecordError:
    """Klaviyo's 409, exactly as API.md §3 shows it."""
    return RecordError(
        409,
        "duplicate_profile",
        "Conflict.",
        "A profile already exists with one of these identifiers.",
        "/attributes",
        meta={"duplicate_profile_id": profile_id},
    )


def _no_profile(profile_id: str) -> str:
    return f"A profile with id {profile_id} does not exist."


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_LIST_ID_ALPHABET = string.ascii_letters + string.digits


def _ulid(now: float) -> str:
    """A 26-character ULID, the shape of Klaviyo's profile and job ids."""
    value = (int(now * 1000) << 80) | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def _list_id() -> str:
    """Six letters and digits, the shape of Klaviyo's list ids (e.g. `Y6nRLr`)."""
    return "".join(secrets.choice(_LIST_ID_ALPHABET) for _ in range(6))
