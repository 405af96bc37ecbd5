"""What every sender shares: prepared records, Klaviyo's answers, and how to isolate a bad
record when Klaviyo refuses a whole request for it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from dbt_klaviyo_sync.klaviyo.client import ApiError, KlaviyoRejected
from dbt_klaviyo_sync.payloads import Record, Reject


@dataclass(frozen=True)
class Prepared:
    """A record and its serialized request part (empty when the request needs none)."""

    record: Record
    body: bytes = b""


@dataclass
class Outcome:
    """Klaviyo's answer for a group of records."""

    accepted: list[tuple[Record, str | None]] = field(default_factory=list)  # with Klaviyo id
    rejected: list[Reject] = field(default_factory=list)
    failed: list[tuple[Record, str]] = field(default_factory=list)  # with the passing reason
    removed: list[Record] = field(default_factory=list)  # no longer in Klaviyo's list

    def merge(self, other: Outcome) -> Outcome:
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.failed += other.failed
        self.removed += other.removed
        return self


class Sender(Protocol):
    """One sync behaviour's way of turning records into requests."""

    def prepare(self, records: list[Record]) -> tuple[list[Prepared], list[Reject]]:
        """Shape each record for its request; refuse, with the reason, what Klaviyo would."""

    def units(self, prepared: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        """Group records into what one worker sends and one commit records."""

    def send(self, unit: list[Prepared]) -> Outcome:
        """Send a unit; every record ends accepted, rejected, failed or removed."""


def chunks(items: Iterable[Prepared], size: int) -> Iterator[list[Prepared]]:
    chunk: list[Prepared] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def send_isolating(
    unit: list[Prepared],
    attempt: Callable[[list[Prepared]], Outcome],
    locate: Callable[[list[Prepared], ApiError], int | None],
    reject: Callable[[Record, ApiError], Reject],
) -> Outcome:
    """Send a unit with `attempt`, which raises KlaviyoRejected when Klaviyo refuses the
    whole request (so nothing in it was taken). Then reject the records the errors point
    at and send the rest again; when they point at none, halve the request until the bad
    record stands alone. One bad row never sinks its neighbours. A loop, not recursion:
    Klaviyo may name one bad record per answer, and there may be many."""
    outcome = Outcome()
    parts = [unit]
    while parts:
        part = parts.pop()
        try:
            outcome.merge(attempt(part))
        except KlaviyoRejected as refusal:
            named = {
                index: error
                for error in refusal.errors
                if (index := locate(part, error)) is not None and index < len(part)
            }
            if len(part) == 1 and not named:
                named = {0: refusal.errors[0]}
            if named:
                outcome.rejected += [reject(part[i].record, e) for i, e in named.items()]
                rest = [p for i, p in enumerate(part) if i not in named]
                parts += [rest] if rest else []
            else:
                half = len(part) // 2
                parts += [part[half:], part[:half]]
    return outcome
