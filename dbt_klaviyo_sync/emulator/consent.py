"""Consent and suppression as Klaviyo keeps them (API.md §2.8, §2.12, §2.14): what one
profile entry of a subscribe or unsubscribe job asks, checked as Klaviyo checks it, and the
state a profile's channels and suppression are in.

This module knows one entry at a time; which profile it means, list membership and the
job's all-or-nothing application are the store's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .profiles import checked_identifiers, record_invalid

#: The channels the emulator keeps consent for, as (channel, message type) in the body.
CHANNELS = {
    ("email", "marketing"): "email_marketing",
    ("sms", "marketing"): "sms_marketing",
    ("sms", "transactional"): "sms_transactional",
}
#: "This API will remove any UNSUBSCRIBE, SPAM_REPORT or USER_SUPPRESSED suppressions"
#: (SPAM_COMPLAINT in the suppression reason enum).
LIFTED_BY_SUBSCRIBING = frozenset({"UNSUBSCRIBE", "SPAM_COMPLAINT", "USER_SUPPRESSED"})
#: The only suppression unsuppress removes (API.md §2.12).
USER_SUPPRESSED = "USER_SUPPRESSED"


@dataclass(frozen=True)
class Entry:
    """One profile of a consent job, checked: its identifiers and the channels it names."""

    index: int
    profile_id: str | None  # subscribe only: "used to perform the lookup"
    identifiers: dict[str, str]  # email and/or phone_number, normalised
    channels: tuple[str, ...]  # email_marketing, sms_marketing, sms_transactional
    consented_at: str | None


@dataclass
class ChannelConsent:
    """A channel's consent on one profile: the global status, and per list the status a
    list-scoped subscribe or unsubscribe left."""

    status: str = "NEVER_SUBSCRIBED"
    consented_at: str | None = None
    historical_import: bool = False
    custom_source: str | None = None
    lists: dict[str, str] | None = None

    def state(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "consented_at": self.consented_at,
            "historical_import": self.historical_import,
            "custom_source": self.custom_source,
            "lists": dict(self.lists or {}),
        }


def checked_entry(
    index: int, resource: dict[str, Any], *, subscribe: bool, historical: bool, now: float
) -> Entry:
    """A subscribe or unsubscribe job's profile entry, or the `RecordError` Klaviyo answers
    for it (its pointer relative to the entry)."""
    attributes = resource["attributes"]
    given = {n: v for n, v in checked_identifiers(attributes).items() if v is not None}
    given.pop("external_id", None)
    subscriptions = attributes["subscriptions"]
    channels: list[str] = []
    consented: set[str | None] = set()
    for (channel, kind), name in CHANNELS.items():
        parameters = (subscriptions.get(channel) or {}).get(kind)
        if parameters is None:
            continue
        channels.append(name)
        consented.add(parameters.get("consented_at"))
        at = f"/attributes/subscriptions/{channel}/{kind}/consented_at"
        if parameters.get("consented_at") is not None and not historical:
            raise record_invalid(
                "consented_at may only be given when historical_import is true.", at
            )
        if historical and subscribe and parameters.get("consented_at") is None:
            raise record_invalid("consented_at is required when historical_import is true.", at)
        if parameters.get("consented_at") is not None and _instant(
            parameters["consented_at"], at
        ) > datetime.fromtimestamp(now, UTC):
            raise record_invalid("consented_at must be in the past.", at)
    if any(c.startswith("sms_") for c in channels) and "phone_number" not in given:
        raise record_invalid(
            "'phone_number' must not be empty when the sms channel is included in 'subscriptions'.",
            "/attributes/phone_number",
        )
    if "email_marketing" in channels and "email" not in given:
        raise record_invalid(
            "'email' must not be empty when the email channel is included in 'subscriptions'.",
            "/attributes/email",
        )
    if not given and resource.get("id") is None:
        raise record_invalid("Either email or phone number is required.", "/attributes")
    dates = [c for c in consented if c is not None]
    return Entry(index, resource.get("id"), given, tuple(channels), dates[0] if dates else None)


def _instant(text: str, pointer: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise record_invalid(f"{text!r} is not a valid date-time.", pointer) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
