"""Consent and suppression (`object: subscription`, `object: suppression`).

Subscribing goes through Klaviyo's bulk subscribe jobs into the model's list, at most 1,000
profiles a call; rows with a `consented_at` go in jobs of their own, as historical imports
(API.md §2.8, §2.14). Unsubscribing is scoped to the model's list, at most 100 profiles a
call, and only ever for profiles that are members of that list: Klaviyo unsubscribes a
profile that is not in the list *globally*, from every list. So before each unsubscribe call
the members among its rows are read (`GET /api/lists/{id}/profiles` filtered by the rows'
keys), and the others are left alone. Suppression (email only) goes through the suppression
jobs, at most 100 emails a call, each job followed to its end (API.md §2.12).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from dbt_klaviyo_sync.changeset import Record, Reject
from dbt_klaviyo_sync.errors import TransientApiError
from dbt_klaviyo_sync.klaviyo import lookup
from dbt_klaviyo_sync.klaviyo.client import ApiError, KlaviyoClient, KlaviyoRejected, dig
from dbt_klaviyo_sync.klaviyo.outcomes import (
    Outcome,
    Prepared,
    Unit,
    grouped,
    send_isolating,
    wait_for_job,
)
from dbt_klaviyo_sync.klaviyo.profiles import profile_index, profile_reject
from dbt_klaviyo_sync.payloads import (
    consent_resource,
    dumps,
    flag_reject,
    identifier,
    withdraws,
)
from dbt_klaviyo_sync.spec import SMS_CHANNELS, SyncSpec

log = logging.getLogger(__name__)

#: Klaviyo's batch maxima (API.md §2.14).
MAX_SUBSCRIBE = 1000
MAX_UNSUBSCRIBE = 100
MAX_SUPPRESS = 100
#: The largest page of list members, and so of keys looked up at once (API.md §2.13).
MEMBERS_PAGE = 100
#: How a row that asks nothing of Klaviyo is sent: not at all (see `ConsentSender`).
NOTHING = "nothing"
LEFT_ALONE = (
    "not in list {list_id}, left alone: unsubscribing them with the list would unsubscribe "
    "them globally"
)


@dataclass(frozen=True)
class Consent(Prepared):
    """A record and what it asks: subscribe, unsubscribe, or nothing; `historical` when
    it carries a `consented_at`, which only a historical import may send."""

    action: str = "subscribe"
    historical: bool = False


def _job(
    kind: str, profiles: list[bytes], attributes: dict[str, Any], list_id: str | None
) -> bytes:
    """A bulk job's body around profiles already serialized."""
    data: dict[str, Any] = {
        "type": kind,
        "attributes": {**attributes, "profiles": {"data": [orjson.Fragment(p) for p in profiles]}},
    }
    if list_id is not None:
        data["relationships"] = {"list": {"data": {"type": "list", "id": list_id}}}
    return orjson.dumps({"data": data})


class Unsubscriber:
    """Unsubscribes rows from the consent of the model's list, members only.

    The profile to unsubscribe is the list member that holds the row's key now; the
    identifiers sent are that member's, as Klaviyo has them, so an SMS unsubscribe reaches
    the member's phone even when the model keys it by email. A member without the identifier
    a channel needs is unsubscribed from the channels it has."""

    def __init__(self, client: KlaviyoClient, spec: SyncSpec) -> None:
        self.client = client
        self.spec = spec
        self.list_id = str(spec.list_id)

    def unsubscribe(
        self,
        records: list[Record],
        done: Callable[[list[Record]], Outcome],
        left_alone: Callable[[list[Record]], Outcome],
    ) -> Outcome:
        """Unsubscribe the members among `records` (at most 100); `done` says what the
        unsubscribed records become, `left_alone` what the others do."""
        try:
            members = self._members(records)
        except (KlaviyoRejected, TransientApiError) as exc:
            return Outcome.unanswered(records, exc, "list membership not read")
        items: list[Prepared] = []
        alone: list[Record] = []
        for record in records:
            member = members.get(record.key)
            resource = member and consent_resource(
                self.spec.channels, "UNSUBSCRIBED", member.get("email"), member.get("phone_number")
            )
            if resource:
                items.append(Prepared(record, dumps(resource)))
            else:
                alone.append(record)
        # A member holding no identifier of the model's channels has no such consent.
        strangers = sum(r.key not in members for r in alone)
        if strangers:
            log.info(
                "%s: %d %s", self.spec.model, strangers, LEFT_ALONE.format(list_id=self.list_id)
            )
        outcome = left_alone(alone) if alone else Outcome()
        if items:
            outcome.merge(
                send_isolating(
                    items,
                    lambda part: self._attempt(part, done),
                    lambda _, error: profile_index(error),
                    self.reject,
                )
            )
        return outcome

    def _members(self, records: list[Record]) -> dict[str, dict[str, Any]]:
        """The list members that hold the records' keys, by key: their attributes."""
        field = self.spec.key_field
        by_value = {
            lookup.normalise(field, value): r.key
            for r in records
            if (value := identifier(field, r.key)) is not None
        }
        if not by_value:
            return {}
        quoted = ",".join(orjson.dumps(v).decode() for v in sorted(by_value))
        params = {"filter": f"any({field},[{quoted}])", "page[size]": str(MEMBERS_PAGE)}
        found: dict[str, dict[str, Any]] = {}
        for profile in self.client.pages(
            "get_profiles_for_list", path_params=(self.list_id,), params=params
        ):
            attributes = profile.get("attributes") or {}
            value = attributes.get(field)
            key = by_value.get(lookup.normalise(field, str(value))) if value else None
            if key is not None:
                found[key] = attributes
        return found

    def _attempt(
        self, part: Sequence[Prepared], done: Callable[[list[Record]], Outcome]
    ) -> Outcome:
        body = _job(
            "profile-subscription-bulk-delete-job", [p.body for p in part], {}, self.list_id
        )
        records = [p.record for p in part]
        try:
            self.client.call("bulk_unsubscribe_profiles", body=body)
        except TransientApiError as exc:
            return Outcome(failed=[(r, f"not unsubscribed: {exc}") for r in records])
        return done(records)

    def reject(self, record: Record, error: ApiError) -> Reject:
        return profile_reject(self.spec, record, error)


def _identifier_of(channel: str) -> str:
    """What a channel's consent is tied to: a phone number for SMS, else an email."""
    return "phone_number" if channel in SMS_CHANNELS else "email"


def _accepted(records: list[Record]) -> Outcome:
    return Outcome(accepted=[(r, None) for r in records])


class ConsentSender:
    """The rows of a subscription model that joined or changed: consent true subscribes
    into the list; consent false unsubscribes from the list's consent (`behavior: mirror`)
    or asks nothing (`behavior: subscribe`, which never unsubscribes)."""

    journaled = False  # subscribing or unsubscribing twice changes nothing more

    def __init__(self, client: KlaviyoClient, spec: SyncSpec) -> None:
        self.client = client
        self.spec = spec
        self.unsubscriber = Unsubscriber(client, spec)

    def prepare(self, records: list[Record]) -> tuple[list[Prepared], list[Reject]]:
        ready: list[Prepared] = []
        refused: list[Reject] = []
        for record in records:
            reject = flag_reject(self.spec, record)
            if reject is not None:
                refused.append(reject)
            elif withdraws(self.spec, record):
                mirror = self.spec.behavior == "mirror"
                ready.append(Consent(record, action="unsubscribe" if mirror else NOTHING))
            elif isinstance(subscription := self._subscription(record), Reject):
                refused.append(subscription)
            else:
                ready.append(subscription)
        return ready, refused

    def _subscription(self, record: Record) -> Prepared | Reject:
        """The row's subscribe resource, or why Klaviyo could not take it: each channel
        needs its identifier, and a row is sent whole or not at all."""
        values = record.values
        channels = self.spec.channels
        missing = [c for c in channels if not values.get(_identifier_of(c))]
        if missing:
            channel, need = missing[0], _identifier_of(missing[0])
            column = next((f.column for f in self.spec.fields if f.field == need), None)
            return Reject(
                record.key,
                record.fingerprint,
                record.in_snapshot,
                "missing_identifier",
                f"{channel.split('_')[0]} consent needs {need}, and this row has none; the "
                f"row is not sent (not even its other channels): fill {need} in the model, "
                "or put such rows in a model without that channel",
                column,
                need,
            )
        consented_at = values.get("consented_at")
        resource = consent_resource(
            channels, "SUBSCRIBED", values.get("email"), values.get("phone_number"), consented_at
        )
        return Consent(record, dumps(resource), historical=consented_at is not None)

    def units(self, prepared: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        def group(item: Prepared) -> Hashable:
            assert isinstance(item, Consent)
            return item.action, item.historical

        def size(key: Hashable) -> int:
            return MAX_UNSUBSCRIBE if key == ("unsubscribe", False) else MAX_SUBSCRIBE

        return grouped(prepared, group, size)

    def send(self, unit: Unit) -> Outcome:
        first = unit.items[0]
        assert isinstance(first, Consent)
        if first.action == NOTHING:
            return Outcome(already=list(unit.records))
        if first.action == "unsubscribe":
            # A non-member asked to withdraw holds no consent of this list: nothing to do.
            return self.unsubscriber.unsubscribe(
                unit.records, _accepted, lambda rs: Outcome(already=rs)
            )
        return send_isolating(
            unit.items,
            lambda part: self._subscribe(part, historical=first.historical),
            lambda _, error: profile_index(error),
            self.unsubscriber.reject,
        )

    def _subscribe(self, part: Sequence[Prepared], *, historical: bool) -> Outcome:
        attributes: dict[str, Any] = {"historical_import": True} if historical else {}
        if self.spec.custom_source:
            attributes["custom_source"] = self.spec.custom_source
        body = _job(
            "profile-subscription-bulk-create-job",
            [p.body for p in part],
            attributes,
            self.spec.list_id,
        )
        records = [p.record for p in part]
        try:
            self.client.call("bulk_subscribe_profiles", body=body)
        except TransientApiError as exc:
            return Outcome(failed=[(r, f"not subscribed: {exc}") for r in records])
        return _accepted(records)


class ConsentRemover:
    """Rows that left a subscription mirror: unsubscribed from the list's consent when they
    are members, left alone when they are not; either way the sync is done with them."""

    journaled = False

    def __init__(self, client: KlaviyoClient, spec: SyncSpec) -> None:
        self.unsubscriber = Unsubscriber(client, spec)

    def prepare(self, records: list[Record]) -> tuple[list[Prepared], list[Reject]]:
        return [Prepared(r) for r in records], []

    def units(self, prepared: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        return grouped(prepared, lambda _: None, lambda _: MAX_UNSUBSCRIBE)

    def send(self, unit: Unit) -> Outcome:
        def removed(records: list[Record]) -> Outcome:
            return Outcome(removed=records)

        return self.unsubscriber.unsubscribe(list(unit.records), removed, removed)


_SUPPRESSION_JOBS = {
    True: ("bulk_suppress_profiles", "get_bulk_suppress_profiles_job"),
    False: ("bulk_unsuppress_profiles", "get_bulk_unsuppress_profiles_job"),
}
_SUPPRESSION_KINDS = {
    True: "profile-suppression-bulk-create-job",
    False: "profile-suppression-bulk-delete-job",
}


class Suppressor:
    """A suppression mirror: rows in the model are suppressed, rows whose `suppressed` turns
    false (`remove=False`) or that leave the model (`remove=True`) are unsuppressed. Each
    job is followed to its end; one that does not finish in time fails its rows, which go
    again next run (suppressing twice changes nothing more)."""

    journaled = False

    def __init__(
        self, client: KlaviyoClient, spec: SyncSpec, job_deadline: float, *, remove: bool = False
    ) -> None:
        self.client = client
        self.spec = spec
        self.job_deadline = job_deadline
        self.remove = remove

    def prepare(self, records: list[Record]) -> tuple[list[Prepared], list[Reject]]:
        ready: list[Prepared] = []
        refused: list[Reject] = []
        for record in records:
            reject = None if self.remove else flag_reject(self.spec, record)
            if reject is not None:
                refused.append(reject)
                continue
            body = dumps({"type": "profile", "attributes": {"email": record.key}})
            suppress = not self.remove and not withdraws(self.spec, record)
            ready.append(Consent(record, body, action="suppress" if suppress else "unsuppress"))
        return ready, refused

    def units(self, prepared: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        def group(item: Prepared) -> Hashable:
            assert isinstance(item, Consent)
            return item.action

        return grouped(prepared, group, lambda _: MAX_SUPPRESS)

    def send(self, unit: Unit) -> Outcome:
        first = unit.items[0]
        assert isinstance(first, Consent)
        suppress = first.action == "suppress"
        return send_isolating(
            unit.items,
            lambda part: self._attempt(part, suppress),
            lambda _, error: profile_index(error),
            lambda record, error: profile_reject(self.spec, record, error),
        )

    def _attempt(self, part: Sequence[Prepared], suppress: bool) -> Outcome:
        create, status = _SUPPRESSION_JOBS[suppress]
        body = _job(_SUPPRESSION_KINDS[suppress], [p.body for p in part], {}, None)
        records = [p.record for p in part]
        verb = "suppress" if suppress else "unsuppress"
        try:  # a refusal of the job itself propagates, to reject the records it names
            created = self.client.call(create, body=body)
            job_id = str(dig(created, "data", "id", operation=create))
        except TransientApiError as exc:
            return Outcome(failed=[(r, f"not sent to {verb}: {exc}") for r in records])
        try:
            ended = wait_for_job(self.client, status, job_id, self.job_deadline)
        except (TransientApiError, KlaviyoRejected) as exc:
            return Outcome(
                failed=[(r, f"{verb} job {job_id} not followed: {exc}") for r in records]
            )
        if ended != "complete":
            reason = f"{verb} job {job_id} " + (
                f"ended {ended}" if ended else f"did not finish within {self.job_deadline:.0f} s"
            )
            return Outcome(failed=[(r, reason) for r in records])
        if self.remove:
            return Outcome(removed=records)
        return _accepted(records)
