"""A Klaviyo event: the checks Klaviyo makes on one event, and the event as recorded.

This module knows one event at a time. Which profile and metric it belongs to, and whether
it repeats one already recorded, is the store's job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import invalid
from .profiles import timestamp

#: "Must be less than 128 characters." (SPEC `MetricCreateQueryResourceObject.name`)
METRIC_NAME_MAX = 127
#: "Properties of this event (must not exceed 400 properties)" (API.md §2.9)
MAX_PROPERTIES = 400
#: "A single string cannot exceed 100KB." (API.md §2.9)
MAX_STRING_BYTES = 100 * 1024
#: "The time must be after the year 1990 and can only be up to 1 year in the future."
EARLIEST = datetime(1990, 1, 1, tzinfo=UTC).timestamp()
AHEAD_SECONDS = 365 * 24 * 3600
#: "The ISO 4217 currency code of the value associated with the event." (SPEC): three
#: capital letters.
_CURRENCY = re.compile(r"[A-Z]{3}")


@dataclass(frozen=True)
class Batch:
    """The events of one profile as a request gives them, with where they sit in its body."""

    profile: dict[str, Any]  # the profile resource, with any `meta` beside its attributes
    pointer: str  # to the profile resource
    events: Sequence[tuple[str, dict[str, Any]]]  # (pointer to the event, its attributes)
    backfill: bool | None = None  # a bulk job's per-profile flag, for events without one


@dataclass(frozen=True)
class Submission:
    """One event as a request gives it, checked, not yet tied to a profile and a metric."""

    metric: str
    time: int  # seconds since the epoch, truncated to the second as Klaviyo does
    unique_id: str | None
    value: float | None
    value_currency: str | None
    properties: dict[str, Any]
    backfill: bool = False  # recorded without triggering flows

    @property
    def dedup_id(self) -> str:
        """What makes it a repeat: its unique_id, else its time to the second (API.md §2.9)."""
        return self.unique_id if self.unique_id is not None else str(self.time)


@dataclass(frozen=True)
class Event:
    """A recorded event. Never changed once recorded, so the store hands it out as it is."""

    id: str
    uuid: str
    profile_id: str
    metric_id: str
    submission: Submission


def checked_event(
    attributes: dict[str, Any], pointer: str, now: float, backfill: bool | None = None
) -> Submission:
    """The event at `pointer`, checked against the limits API.md §2.9 documents. Its own
    `backfill` flag wins over the one its bulk entry gives (`backfill`): the spec says
    neither way, and this is the reading that fires no flow the event itself did not ask
    to spare."""
    at = pointer + "/attributes"
    name: str = attributes["metric"]["data"]["attributes"]["name"]
    if not 0 < len(name) <= METRIC_NAME_MAX:
        raise invalid(
            f"A metric name must have 1 to {METRIC_NAME_MAX} characters; this one has {len(name)}.",
            pointer=at + "/metric/data/attributes/name",
        )
    properties: dict[str, Any] = attributes["properties"]
    if len(properties) > MAX_PROPERTIES:
        raise invalid(
            f"An event may have at most {MAX_PROPERTIES} properties; this one has "
            f"{len(properties)}.",
            pointer=at + "/properties",
        )
    currency = attributes.get("value_currency")
    if currency is not None and not _CURRENCY.fullmatch(currency):
        raise invalid(
            f"'{currency}' is not an ISO 4217 currency code.", pointer=at + "/value_currency"
        )
    return Submission(
        name,
        _seconds(attributes.get("time"), at + "/time", now),
        attributes.get("unique_id"),
        attributes.get("value"),
        currency,
        properties,
        bool(own if (own := attributes.get("backfill")) is not None else backfill),
    )


def _seconds(text: str | None, pointer: str, now: float) -> int:
    """An event's time: the time of receipt unless given, and within Klaviyo's window."""
    if text is None:
        return math.floor(now)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(f"'{text}' is not a valid date-time.", pointer=pointer) from None
    seconds = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    if not EARLIEST <= seconds <= now + AHEAD_SECONDS:
        raise invalid(
            f"{text} is out of range: the time must be after 1990-01-01 and no more than "
            "1 year in the future.",
            pointer=pointer,
        )
    return math.floor(seconds)


def check_strings(node: Any, pointer: str = "") -> None:
    """Refuse a request with a string over 100 KB anywhere in it, pointing at the string."""
    if isinstance(node, str):
        size = len(node.encode())
        if size > MAX_STRING_BYTES:
            raise invalid(
                f"A string may be at most {MAX_STRING_BYTES:,} bytes; this one has {size:,}.",
                pointer=pointer,
            )
    elif isinstance(node, dict):
        for key, value in node.items():
            check_strings(value, f"{pointer}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            check_strings(value, f"{pointer}/{index}")


def state(event: Event) -> dict[str, Any]:
    """The event as `Emulator.events()` and the account state show it."""
    given = event.submission
    return {
        "id": event.id,
        "metric": given.metric,
        "metric_id": event.metric_id,
        "profile_id": event.profile_id,
        "unique_id": given.unique_id,
        "time": timestamp(given.time),
        "value": given.value,
        "value_currency": given.value_currency,
        "properties": dict(given.properties),
        "backfill": given.backfill,
    }
