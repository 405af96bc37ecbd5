"""An in-memory Klaviyo account: who it is, and its profiles, lists, bulk import jobs,
events and deletion requests, behind one lock.

Every public method takes the lock for its whole run, so concurrent requests see each
other's effects whole, never half. Methods hand out snapshots, never the live records.

Bulk jobs and deletions have no thread of their own: every call first advances the work
that is due (`_advance`), so a job completes on time whether or not anybody polls it, and
there is nothing running in the background to race with.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import string
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any, Literal

import orjson

from .consent import (
    LIFTED_BY_SUBSCRIBING,
    USER_SUPPRESSED,
    ChannelConsent,
    Entry,
    checked_entry,
)
from .errors import ApiError, invalid, not_found
from .events import Batch, Event, Submission, checked_event
from .events import state as event_state
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
#: Where a bulk import job's request holds its profiles.
JOB_PROFILES = "/data/attributes/profiles/data"
#: How long a finished job stays readable. Klaviyo does not document it.
JOB_RETENTION_SECONDS = 7 * 24 * 3600
#: What a deletion request names a profile by, exactly one at a time (API.md §2.6).
DELETION_IDENTIFIERS = ("id", "email", "phone_number")
#: Where consent and suppression jobs carry their profiles.
_JOB_PROFILES = "/data/attributes/profiles/data"
#: Identifiers an event's profile may carry that the emulator does not match on.
_UNMATCHED_IDENTIFIERS = ("anonymous_id", "_kx")

JobStatus = Literal["queued", "processing", "complete"]


@dataclass(frozen=True)
class Identity:
    """Who an account is: what GET /api/accounts shows, and the keys that reach it.

    The keys stay out of `repr`, so an assertion or a log that shows an identity cannot
    show a key.
    """

    id: str
    name: str
    #: What a client request names as `company_id`; GET /api/accounts shows it.
    public_api_key: str = field(repr=False)
    #: None: any private key that names no other account reaches this one.
    private_key: str | None = field(repr=False)
    #: Any `company_id` that names no other account reaches this one too.
    any_public_key: bool = False


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
    records: Sequence[dict[str, Any]] | range  # a range in a sink: the count, not the data
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


@dataclass
class SuppressionJob:
    """A bulk suppress (`suppress`) or unsuppress job: like an import job, it runs
    `job_seconds` after it was made."""

    id: str
    suppress: bool
    emails: tuple[str, ...]
    created_at: float
    stuck: bool = False
    status: JobStatus = "queued"
    started_at: float | None = None
    completed_at: float | None = None
    skipped_count: int = 0

    @property
    def total_count(self) -> int:
        return len(self.emails)


@dataclass
class Deletion:
    """A data-privacy deletion request. Like a job, it runs `job_seconds` after it was made."""

    identifier: str  # one of DELETION_IDENTIFIERS
    value: str
    created_at: float
    completed_at: float | None = None
    profile_ids: tuple[str, ...] = ()  # the profiles it deleted


class Account:
    """One Klaviyo account with Klaviyo's semantics for profiles, lists, bulk jobs, events
    and deletions. `clock` gives seconds since the epoch: timestamps and job timing."""

    def __init__(
        self,
        identity: Identity,
        job_seconds: float,
        clock: Callable[[], float],
        *,
        sink: bool = False,
    ) -> None:
        self.identity = identity
        self._lock = threading.Lock()
        self._job_seconds = job_seconds
        self._sink = sink
        self._clock = clock
        self._clear()

    def _clear(self) -> None:
        self._profiles: dict[str, Profile] = {}
        self._index: dict[str, dict[str, str]] = {name: {} for name in IDENTIFIERS}
        self._lists: dict[str, KlaviyoList] = {}
        # list id -> profile id -> when it joined, in the order they joined
        self._members: dict[str, dict[str, float]] = {}
        self._jobs: dict[str, BulkJob] = {}
        self._metrics: dict[str, str] = {}  # name -> id
        self._events: dict[str, Event] = {}
        # The (profile, metric, dedup id) of each recorded event, for finding repeats.
        self._event_keys: set[tuple[str, str, str]] = set()
        # Events accepted with a 202, those of them dropped as repeats (a client that
        # resends only what it must keeps that at zero), and those lost because their
        # profile's id names no profile (accepted all the same, as Klaviyo does).
        self.events_received = 0
        self.events_repeated = 0
        self.events_lost = 0
        # Every metric has a live flow here: each event recorded without `backfill` fires
        # it once (API.md §2.9). Metric name -> how many times.
        self._flow_triggers: Counter[str] = Counter()
        self._deletions: list[Deletion] = []
        # Consent per profile and channel, global email suppressions by profile, and every
        # global unsubscribe (tests assert that a sync never caused one by accident).
        self._consent: dict[str, dict[str, ChannelConsent]] = {}
        self._suppressions: dict[str, str] = {}
        self._global_unsubscribes: list[dict[str, Any]] = []
        self._suppression_jobs: dict[str, SuppressionJob] = {}

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def advance(self) -> None:
        """Run the bulk jobs and deletions that are due."""
        with self._lock:
            self._advance()

    # Profiles

    def upsert(self, resource: dict[str, Any]) -> tuple[Profile, bool]:
        """Create or update a profile from a profile-import resource; True when created."""
        with self._lock:
            self._advance()
            profile, created = self._upsert(resource, client=False)
            return profile.snapshot(), created

    def client_upsert(self, resource: dict[str, Any]) -> None:
        """POST /client/profiles, accepted with a 202 and applied as `_accepted` says;
        identifiers a profile already has are not changed (API.md §2.3)."""
        with self._lock:
            self._advance()
            self._accepted(resource, client=True)

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
        # An existing profile is changed on a copy, stored at the end: `_all_or_nothing`
        # relies on profiles being replaced, never changed in place.
        if profile_id is not None:
            found = self._profiles.get(profile_id)
            if found is None:
                raise RecordError(404, "not_found", "Not found.", _no_profile(profile_id), "/id")
            if any(owner != profile_id for owner in matched):
                # Reported as 404 rather than 409 when the id is given (API.md §5).
                detail = f"Another profile has one of the identifiers given for {profile_id}."
                raise RecordError(404, "not_found", "Not found.", detail, "/id")
            profile, created = replace(found), False
        elif len(matched) > 1:
            # The identifiers are tried in IDENTIFIERS order: the first match is the profile
            # meant, the next different one is the duplicate.
            raise _duplicate(matched[1])
        elif matched:
            profile, created = replace(self._profiles[matched[0]]), False
        elif not any(value is not None for value in given.values()):
            raise _no_identifier()
        else:
            now = self._clock()
            profile, created = Profile(_ulid(now), now, now), True
        before = profile.content()
        self._set_identifiers(profile, given, keep_existing=client and not created)
        merge(profile, attributes, resource.get("meta"))
        if not created and profile.content() != before:
            profile.updated = self._clock()
        self._profiles[profile.id] = profile
        return profile, created

    def _accepted(self, resource: dict[str, Any], *, client: bool) -> Profile | None:
        """Apply a profile that Klaviyo accepted with a 202 before looking at the account:
        the client endpoint's, or an event's. What only the account can refuse is not
        refused: an identifier another profile holds is left where it is ("will return a
        202, however the identifier field(s) will not be updated", API.md §2.3), and a
        resource `id` that no profile has changes nothing (None). The profile meant is the
        one the id names, else the first the identifiers find (in IDENTIFIERS order)."""
        attributes = resource["attributes"]
        owners = {
            name: owner
            for name, value in checked_identifiers(attributes).items()
            if (owner := self._owner(name, value)) is not None
        }
        meant = resource.get("id") or next(iter(owners.values()), None)
        if meant is not None and meant not in self._profiles:
            return None
        kept = {k: v for k, v in attributes.items() if owners.get(k, meant) == meant}
        profile, _ = self._upsert({**resource, "attributes": kept}, client=client)
        return profile

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """Undo the profile changes made inside when it raises.

        `_upsert`, the only change made inside, replaces a profile rather than changing it in
        place, so copies of the maps are enough, and cheap.
        """
        profiles = dict(self._profiles)
        index = {name: dict(owners) for name, owners in self._index.items()}
        try:
            yield
        except BaseException:
            self._profiles, self._index = profiles, index
            raise

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

    def create_list(
        self, name: str, opt_in_process: str | None = None, list_id: str | None = None
    ) -> KlaviyoList:
        with self._lock:
            self._advance()
            list_id = list_id or _new_id(self._lists, 6)
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

    def members_joined(self, list_id: str) -> list[tuple[Profile, float]]:
        """The list's members, each with when it joined, in the order they joined."""
        with self._lock:
            self._advance()
            return [(self._profiles[i], at) for i, at in self._known_list(list_id).items()]

    def add_members(self, list_id: str, profile_ids: Sequence[str]) -> None:
        with self._lock:
            self._advance()
            members = self._known_list(list_id)
            self._known_profiles(profile_ids)
            _join(members, profile_ids, self._clock())

    def remove_members(self, list_id: str, profile_ids: Sequence[str]) -> None:
        with self._lock:
            self._advance()
            members = self._known_list(list_id)
            self._known_profiles(profile_ids)
            for profile_id in profile_ids:
                members.pop(profile_id, None)

    def _known_list(self, list_id: str) -> dict[str, float]:
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
            if not self._sink:  # a sink keeps only the count, for benchmarks of the client
                _check_job_records(records)
            now = self._clock()
            kept = range(len(records)) if self._sink else records  # a sink keeps the count
            job = BulkJob(_ulid(now), kept, tuple(list_ids), now, stuck)
            self._jobs[job.id] = job
            return replace(job)

    def job(self, job_id: str) -> BulkJob | None:
        with self._lock:
            self._advance()
            job = self._jobs.get(job_id)
            return None if job is None else replace(job)

    def _advance(self) -> None:
        """Start the jobs that are half-way, then run the jobs and deletions that are due,
        in the order they were made: a deletion must not undo a later import, nor miss an
        earlier one."""
        now = self._clock()
        jobs: list[BulkJob | SuppressionJob] = [
            *self._jobs.values(),
            *self._suppression_jobs.values(),
        ]
        for job in jobs:
            if job.status == "queued" and now >= job.created_at + self._job_seconds / 2:
                job.status, job.started_at = "processing", now
        due: list[BulkJob | SuppressionJob | Deletion] = [
            job
            for job in jobs
            if job.status == "processing"
            and not job.stuck
            and now >= job.created_at + self._job_seconds
        ]
        due += [
            deletion
            for deletion in self._deletions
            if deletion.completed_at is None and now >= deletion.created_at + self._job_seconds
        ]
        for work in sorted(due, key=attrgetter("created_at")):
            if isinstance(work, BulkJob):
                self._run(work, now)
            elif isinstance(work, SuppressionJob):
                self._run_suppression(work, now)
            else:
                self._delete(work, now)

    def _run(self, job: BulkJob, now: float) -> None:
        """Upsert every record exactly as profile-import would. The records were checked
        when the job was created (`_check_job_records`); what only the account can refuse
        (identifiers on two profiles, an `id` no profile has) becomes an import error, the
        per-profile report GET …/import-errors gives (API.md §2.2)."""
        if isinstance(job.records, range):  # a sink: nothing was kept to import
            job.status, job.completed_at = "complete", now
            return
        failures: list[Failure] = []
        profile_ids: dict[str, None] = {}
        for index, record in enumerate(job.records):
            try:
                profile, _ = self._upsert(_without_nulls(record), client=False)
            except RecordError as error:
                payload = record.get("attributes") or {}
                failures.append(Failure(_ulid(now), index, error, payload))
                continue
            profile_ids[profile.id] = None
        for list_id in job.list_ids:
            _join(self._members[list_id], profile_ids, now)
        job.failures, job.profile_ids = failures, list(profile_ids)
        job.status, job.completed_at = "complete", now

    # Consent (API.md §2.8, §2.14)

    def subscribe(
        self,
        resources: Sequence[dict[str, Any]],
        list_id: str | None,
        *,
        historical: bool,
        custom_source: str | None,
    ) -> None:
        """A bulk subscribe job, checked whole before anything changes (a bad entry is a
        400 pointing at it): each profile found or created, its channels subscribed, added
        to the list, and its UNSUBSCRIBE, SPAM and USER_SUPPRESSED suppressions lifted."""
        with self._lock:
            self._advance()
            entries = self._checked(resources, list_id, subscribe=True, historical=historical)
            for entry, profile_id in zip(entries, self._consent_profiles(entries), strict=True):
                for name in entry.channels:
                    consent = self._channel(profile_id, name)
                    consent.status = "SUBSCRIBED"
                    consent.consented_at = entry.consented_at
                    consent.historical_import = historical
                    consent.custom_source = custom_source
                    if list_id is not None:
                        consent.lists = {**(consent.lists or {}), list_id: "SUBSCRIBED"}
                if self._suppressions.get(profile_id) in LIFTED_BY_SUBSCRIBING:
                    del self._suppressions[profile_id]
                if list_id is not None:
                    _join(self._members[list_id], [profile_id], self._clock())

    def unsubscribe(self, resources: Sequence[dict[str, Any]], list_id: str | None) -> None:
        """A bulk unsubscribe job: a member of the list given is removed from it and
        unsubscribed for that list; any other profile is unsubscribed globally ("Profiles
        not in the specified list will be globally unsubscribed"), created first if unknown."""
        with self._lock:
            self._advance()
            entries = self._checked(resources, list_id, subscribe=False, historical=False)
            for entry, profile_id in zip(entries, self._consent_profiles(entries), strict=True):
                members = self._members.get(list_id or "", {})
                member = profile_id in members
                for name in entry.channels:
                    consent = self._channel(profile_id, name)
                    if member and list_id is not None:
                        consent.lists = {**(consent.lists or {}), list_id: "UNSUBSCRIBED"}
                        continue
                    consent.status = "UNSUBSCRIBED"
                    self._global_unsubscribes.append(
                        {"profile_id": profile_id, "channel": name, "list_id": list_id}
                    )
                    if name == "email_marketing":
                        self._suppressions[profile_id] = "UNSUBSCRIBE"
                members.pop(profile_id, None)

    def _checked(
        self,
        resources: Sequence[dict[str, Any]],
        list_id: str | None,
        *,
        subscribe: bool,
        historical: bool,
    ) -> list[Entry]:
        if list_id is not None and list_id not in self._lists:
            raise not_found(
                f"A list with id {list_id} does not exist.",
                pointer="/data/relationships/list/data/id",
            )
        now = self._clock()
        entries = []
        for index, resource in enumerate(resources):
            try:
                entries.append(
                    checked_entry(
                        index, resource, subscribe=subscribe, historical=historical, now=now
                    )
                )
            except RecordError as error:
                raise error.in_request(f"{_JOB_PROFILES}/{index}") from None
        return entries

    def _consent_profiles(self, entries: Sequence[Entry]) -> list[str]:
        """The profile each entry means, created when no profile matches; all or none."""
        ids = []
        with self._all_or_nothing():
            for entry in entries:
                resource: dict[str, Any] = {"type": "profile", "attributes": entry.identifiers}
                if entry.profile_id is not None:
                    resource["id"] = entry.profile_id
                try:
                    profile, _ = self._upsert(resource, client=False)
                except RecordError as error:
                    raise error.in_request(f"{_JOB_PROFILES}/{entry.index}") from None
                ids.append(profile.id)
        return ids

    def _channel(self, profile_id: str, name: str) -> ChannelConsent:
        return self._consent.setdefault(profile_id, {}).setdefault(name, ChannelConsent())

    # Suppression (API.md §2.12)

    def create_suppression_job(self, emails: Sequence[str], *, suppress: bool) -> SuppressionJob:
        """Queue a suppress or unsuppress job for these emails, checked first."""
        with self._lock:
            self._advance()
            checked = []
            for index, email in enumerate(emails):
                try:
                    checked.append(str(checked_identifiers({"email": email})["email"]))
                except RecordError as error:
                    raise error.in_request(f"{_JOB_PROFILES}/{index}") from None
            now = self._clock()
            job = SuppressionJob(_ulid(now), suppress, tuple(checked), now)
            self._suppression_jobs[job.id] = job
            return replace(job)

    def suppression_job(self, job_id: str, *, suppress: bool) -> SuppressionJob | None:
        with self._lock:
            self._advance()
            job = self._suppression_jobs.get(job_id)
            return None if job is None or job.suppress != suppress else replace(job)

    def _run_suppression(self, job: SuppressionJob, now: float) -> None:
        """Suppress creates a profile for an unknown email; unsuppress skips it, and lifts
        only USER_SUPPRESSED (an unsubscribe or a bounce stays)."""
        for email in job.emails:
            owner = self._owner("email", email)
            if job.suppress:
                if owner is None:
                    owner = self._upsert({"attributes": {"email": email}}, client=False)[0].id
                self._suppressions.setdefault(owner, USER_SUPPRESSED)
            elif owner is None:
                job.skipped_count += 1
            elif self._suppressions.get(owner) == USER_SUPPRESSED:
                del self._suppressions[owner]
        job.status, job.completed_at = "complete", now

    def consent(self) -> list[dict[str, Any]]:
        """Every profile with consent or a suppression: its identifiers, each channel's
        consent, and its suppression reason."""
        with self._lock:
            self._advance()
            return self._consent_state()

    def _consent_state(self) -> list[dict[str, Any]]:
        ids = dict.fromkeys([*self._consent, *self._suppressions])
        return [
            {
                "id": profile_id,
                "email": self._profiles[profile_id].fields.get("email"),
                "phone_number": self._profiles[profile_id].fields.get("phone_number"),
                "channels": {
                    name: consent.state()
                    for name, consent in self._consent.get(profile_id, {}).items()
                },
                "suppression": self._suppressions.get(profile_id),
            }
            for profile_id in ids
            if profile_id in self._profiles
        ]

    def global_unsubscribes(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(item) for item in self._global_unsubscribes]

    # Events

    def record_events(self, batches: Sequence[Batch]) -> None:
        """Record the events of POST /api/events or of a bulk create job, all or none.

        Each batch's profile is found or created as profile-import would, except that what
        only the account could refuse is accepted (`_accepted`): both endpoints answer 202,
        "validated and submitted for processing" (API.md §2.9). An event repeating
        a recorded one (same profile, metric and unique_id) is dropped; a unique_id repeated
        for one profile and metric within the request refuses it whole (API.md §2.9).
        """
        with self._lock:
            self._advance()
            now = self._clock()
            given = [
                (index, pointer, checked_event(attributes, pointer, now, batch.backfill))
                for index, batch in enumerate(batches)
                for pointer, attributes in batch.events
            ]
            with self._all_or_nothing():
                owners = [self._event_profile(batch) for batch in batches]
                keyed = [
                    (owner, pointer, event)
                    for index, pointer, event in given
                    if (owner := owners[index]) is not None
                ]
                _refuse_repeats(keyed)
            self.events_received += len(given)
            self.events_lost += len(given) - len(keyed)
            for profile_id, _, submission in keyed:
                self._record(profile_id, submission)

    def events(self, conditions: Iterable[Condition] = ()) -> list[Event]:
        """The recorded events meeting every condition, in the order they were recorded."""
        with self._lock:
            self._advance()
            found = list(self._events.values())
        for condition in conditions:
            found = [
                event for event in found if getattr(event, condition.field) in condition.values
            ]
        return found

    def _event_profile(self, batch: Batch) -> str | None:
        """The id of the profile that events name, found or created as profile-import would
        but applied as accepted (`_accepted`); None when the resource's id names no profile."""
        resource = batch.profile
        attributes = resource["attributes"]
        if resource.get("id") is None and all(attributes.get(n) is None for n in IDENTIFIERS):
            if any(attributes.get(name) is not None for name in _UNMATCHED_IDENTIFIERS):
                raise ApiError(
                    501,
                    "not_implemented",
                    "Not implemented.",
                    "The emulator does not match profiles by anonymous_id or _kx yet; "
                    "give id, email, phone_number or external_id.",
                    pointer=batch.pointer + "/attributes",
                )
            raise invalid(
                "An event's profile needs at least one of id, email, phone_number or external_id.",
                pointer=batch.pointer + "/attributes",
            )
        try:
            profile = self._accepted(resource, client=False)
        except RecordError as error:
            raise error.in_request(batch.pointer) from None
        return None if profile is None else profile.id

    def _record(self, profile_id: str, submission: Submission) -> None:
        """Record one event, creating its metric by name, unless it repeats a recorded one."""
        metric_id = self._metrics.get(submission.metric)
        if metric_id is None:
            metric_id = self._metrics[submission.metric] = _new_id(self._metrics.values(), 6)
        key = (profile_id, metric_id, submission.dedup_id)
        if key in self._event_keys:
            self.events_repeated += 1
            return
        self._event_keys.add(key)
        event = Event(
            _new_id(self._events, 11), str(uuid.uuid4()), profile_id, metric_id, submission
        )
        self._events[event.id] = event
        if not submission.backfill:
            self._flow_triggers[submission.metric] += 1

    def flow_triggers(self) -> dict[str, int]:
        """How many times each metric's flow fired: once per event recorded without
        `backfill` (a repeat Klaviyo drops fires nothing)."""
        with self._lock:
            return dict(self._flow_triggers)

    # Deletion requests

    def request_deletion(self, identifier: str, value: str) -> None:
        """Queue the deletion of the profile that `identifier` (see DELETION_IDENTIFIERS) names."""
        with self._lock:
            self._advance()
            self._deletions.append(Deletion(identifier, value, self._clock()))

    def deletions(self) -> list[Deletion]:
        with self._lock:
            self._advance()
            return [replace(deletion) for deletion in self._deletions]

    def _delete(self, deletion: Deletion, now: float) -> None:
        """Delete the profile a request named, if any, with its list memberships and events."""
        owner = self._condition_owner(deletion.identifier, deletion.value)
        if owner is not None:
            profile = self._profiles.pop(owner)
            cleared: dict[str, str | None] = dict.fromkeys(IDENTIFIERS)
            self._set_identifiers(profile, cleared, keep_existing=False)
            for members in self._members.values():
                members.pop(owner, None)
            self._events = {i: e for i, e in self._events.items() if e.profile_id != owner}
            self._event_keys = {key for key in self._event_keys if key[0] != owner}
        deletion.profile_ids = () if owner is None else (owner,)
        deletion.completed_at = now

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
                "events": [event_state(event) for event in self._events.values()],
                "flow_triggers": dict(self._flow_triggers),
                "deletions": [deletion_state(deletion) for deletion in self._deletions],
                "consent": self._consent_state(),
                "global_unsubscribes": [dict(item) for item in self._global_unsubscribes],
            }


def _check_job_records(records: Sequence[dict[str, Any]]) -> None:
    """Refuse a bulk import job as Klaviyo does when it is created: a 400 with a pointer at
    each invalid profile, e.g. `/data/attributes/profiles/data/0/attributes/last_name`
    (API.md §3); nothing of it is imported."""
    errors = [
        error.in_request(f"{JOB_PROFILES}/{index}")
        for index, record in enumerate(records)
        if (error := _import_record_error(record)) is not None
    ]
    if errors:
        raise replace(errors[0], more=tuple(errors[1:]))


def _import_record_error(record: dict[str, Any]) -> RecordError | None:
    """Why Klaviyo refuses a bulk import job for this profile when the job is created (a
    payload over 100KB, an invalid email or phone, no identifier), or None."""
    if len(orjson.dumps(record)) > PROFILE_MAX_BYTES:
        return record_invalid("The profile payload exceeds the 100KB limit.", "")
    try:
        given = checked_identifiers(record["attributes"])
    except RecordError as error:
        return error
    if record.get("id") is None and all(value is None for value in given.values()):
        return _no_identifier()
    return None


def _join(members: dict[str, float], profile_ids: Iterable[str], now: float) -> None:
    """Add profiles to a list; a member already in it keeps the time it joined."""
    for profile_id in profile_ids:
        members.setdefault(profile_id, now)


def _without_nulls(resource: dict[str, Any]) -> dict[str, Any]:
    """A bulk job's profile as Klaviyo applies it: "The Bulk Import Profiles API does not
    support setting fields to null to clear them" (its guide), so a null changes nothing."""
    attributes = {k: v for k, v in (resource.get("attributes") or {}).items() if v is not None}
    for name in ("location", "properties"):
        if isinstance(attributes.get(name), dict):
            attributes[name] = {k: v for k, v in attributes[name].items() if v is not None}
    return {**resource, "attributes": attributes}


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


def deletion_state(deletion: Deletion) -> dict[str, Any]:
    """A deletion request as `Emulator.deletions()` and the account state show it."""
    completed_at = deletion.completed_at
    return {
        "identifier": deletion.identifier,
        "value": deletion.value,
        "requested_at": timestamp(deletion.created_at),
        "completed_at": None if completed_at is None else timestamp(completed_at),
        "profile_ids": list(deletion.profile_ids),
    }


def _refuse_repeats(keyed: Sequence[tuple[str, str, Submission]]) -> None:
    """Refuse a request that repeats a unique_id for one profile and metric (API.md §2.9)."""
    seen: set[tuple[str, str, str]] = set()
    for profile_id, pointer, submission in keyed:
        if submission.unique_id is None:
            continue
        key = (profile_id, submission.metric, submission.unique_id)
        if key in seen:
            raise invalid(
                f"The unique_id '{submission.unique_id}' is repeated for the same profile and "
                f"the metric '{submission.metric}'; no events were processed.",
                pointer=pointer + "/attributes/unique_id",
            )
        seen.add(key)


def _no_identifier() -> RecordError:
    return record_invalid(
        "A profile needs at least one of email, phone_number or external_id.", "/attributes"
    )


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
_ID_ALPHABET = string.ascii_letters + string.digits


def _ulid(now: float) -> str:
    """A 26-character ULID, the shape of Klaviyo's profile and job ids."""
    value = (int(now * 1000) << 80) | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def derived_id(seed: str, length: int = 6) -> str:
    """Letters and digits that depend only on `seed`: an account's id and public key stay
    the same for the same private key, across emulator restarts, as a real key's do."""
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(_ID_ALPHABET[byte % len(_ID_ALPHABET)] for byte in digest[:length])


def _new_id(taken: Collection[str], length: int) -> str:
    """Letters and digits not in `taken`: the shape of Klaviyo's list and metric ids (six,
    e.g. `Y6nRLr`) and event ids (eleven, e.g. `4sDShKQjrdT`)."""
    while True:
        found = "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))
        if found not in taken:
            return found
