"""Events (Send): each `unique_id` reaches Klaviyo once.

Events go through the bulk create endpoint: at most 1,000 events and 5 MB per request,
grouped per profile (API.md §2.9). Each carries its `unique_id`, so Klaviyo drops a repeat
for the same profile and metric; that makes a resend after a crash harmless, while the state
makes sure nothing accepted is ever sent again, not even by `--full-refresh`. A request must
never hold one `unique_id` twice for a profile and metric (Klaviyo then refuses all of it);
sync keys are unique, so it cannot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import orjson

from dbt_klaviyo_sync.changeset import Record, Reject
from dbt_klaviyo_sync.errors import TransientApiError
from dbt_klaviyo_sync.identifiers import InvalidValue
from dbt_klaviyo_sync.klaviyo.client import ApiError, KlaviyoClient
from dbt_klaviyo_sync.klaviyo.outcomes import Outcome, Prepared, Unit, send_isolating
from dbt_klaviyo_sync.payloads import dumps, event_resources
from dbt_klaviyo_sync.spec import SyncSpec

MAX_EVENTS_PER_REQUEST = 1000
MAX_REQUEST_BYTES = 5_000_000  # "5MB"; decimal, to stay under however Klaviyo counts it
# An error points at an event of a group, or at the group's profile (its first event then).
_POINTER = re.compile(
    r"^/data/attributes/events-bulk-create/data/(\d+)(?:/attributes/events/data/(\d+))?"
)
_HEAD = b'{"data":{"type":"event-bulk-create-job","attributes":{"events-bulk-create":{"data":['
_TAIL = b"]}}}}"


@dataclass(frozen=True)
class PreparedEvent(Prepared):
    """An event with its serialized profile; events of one profile share a group."""

    profile: bytes = b""

    def journal_body(self) -> str | None:
        """The profile and the event exactly as sent: Klaviyo drops a repeated unique_id
        only for the same profile and metric, so an event that may have arrived goes again
        with the profile it first had, even if the row's email was corrected since."""
        return orjson.dumps([self.profile.decode(), self.body.decode()]).decode()


class EventSender:
    journaled = True  # an event that may have arrived must go again exactly as it went

    def __init__(self, client: KlaviyoClient, spec: SyncSpec) -> None:
        self.client = client
        self.spec = spec

    def prepare(self, records: list[Record]) -> tuple[list[Prepared], list[Reject]]:
        ready: list[Prepared] = []
        rejects = []
        for record in records:
            try:
                profile, event = event_resources(self.spec, record)
            except InvalidValue as exc:
                rejects.append(
                    Reject(
                        record.key,
                        record.fingerprint,
                        record.in_snapshot,
                        "invalid_value",
                        str(exc),
                    )
                )
                continue
            ready.append(PreparedEvent(record, dumps(event), dumps(profile)))
        return ready, rejects

    @staticmethod
    def restore(record: Record, journaled: str) -> Prepared:
        """An event an earlier run sent without seeing the answer, exactly as it went."""
        profile, event = orjson.loads(journaled)
        return PreparedEvent(record, event.encode(), profile.encode())

    def units(self, prepared: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        """Requests as full as Klaviyo allows: 1,000 events and 5 MB."""
        unit: list[Prepared] = []
        size = len(_HEAD) + len(_TAIL)
        for item in prepared:
            assert isinstance(item, PreparedEvent)
            cost = len(item.body) + len(item.profile) + 120  # the group's envelope, at worst
            if unit and (len(unit) == MAX_EVENTS_PER_REQUEST or size + cost > MAX_REQUEST_BYTES):
                yield unit
                unit, size = [], len(_HEAD) + len(_TAIL)
            unit.append(item)
            size += cost
        if unit:
            yield unit

    def send(self, unit: Unit) -> Outcome:
        return send_isolating(unit.items, self._attempt, self._locate, self._reject)

    def _attempt(self, unit: Sequence[Prepared]) -> Outcome:
        records = [p.record for p in unit]
        try:
            self.client.call("bulk_create_events", body=self._request(unit)[0])
        except TransientApiError as exc:
            return Outcome(failed=[(r, str(exc)) for r in records])
        return Outcome(accepted=[(r, None) for r in records])

    def _locate(self, unit: Sequence[Prepared], error: ApiError) -> int | None:
        """The unit's event an error points at: by group and event, or a group's first."""
        match = _POINTER.match(error.pointer or "")
        if not match:
            return None
        return self._request(unit)[1].get((int(match.group(1)), int(match.group(2) or 0)))

    def _request(self, unit: Sequence[Prepared]) -> tuple[bytes, dict[tuple[int, int], int]]:
        """The request body, and where each event of the unit sits in it."""
        groups: dict[bytes, list[int]] = {}
        for index, item in enumerate(unit):
            assert isinstance(item, PreparedEvent)
            groups.setdefault(item.profile, []).append(index)
        parts: list[bytes] = []
        positions: dict[tuple[int, int], int] = {}
        # The flag is on each event too: the spec does not say which of the two wins.
        backfill = b'"backfill":true,' if self.spec.backfill else b""
        for g, (profile, members) in enumerate(groups.items()):
            events = b",".join(unit[i].body for i in members)
            parts.append(
                b'{"type":"event-bulk-create","attributes":{'
                + backfill
                + b'"profile":{"data":'
                + profile
                + b'},"events":{"data":['
                + events
                + b"]}}}"
            )
            positions |= {(g, e): i for e, i in enumerate(members)}
        return _HEAD + b",".join(parts) + _TAIL, positions

    def _reject(self, record: Record, error: ApiError) -> Reject:
        return Reject(
            record.key,
            record.fingerprint,
            record.in_snapshot,
            error.code or "rejected",
            error.detail,
        )
