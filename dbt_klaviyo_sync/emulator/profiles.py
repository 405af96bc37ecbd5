"""A Klaviyo profile: its fields, the checks Klaviyo makes on them, and how updates merge.

This module knows one profile at a time. Which profile a request means (identifier
matching, conflicts) is the store's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from .errors import ApiError
from .identifiers import InvalidValue, checked_email, e164

#: The identifiers that upserts match on (API.md §5), in the order the emulator tries them.
IDENTIFIERS = ("email", "phone_number", "external_id")
#: Plain string attributes: null clears them, omitting them leaves them alone.
STANDARD = (*IDENTIFIERS, "first_name", "last_name", "organization", "locale", "title", "image")
LOCATION = (
    "address1",
    "address2",
    "city",
    "country",
    "latitude",
    "longitude",
    "region",
    "zip",
    "timezone",
    "ip",
)


class RecordError(Exception):
    """Klaviyo refuses one profile record.

    `pointer` is relative to the profile resource (`/attributes/email`, `/id`, or `""` for the
    whole record), so a single request and a bulk job can each place it in their own body.
    """

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        pointer: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.pointer = pointer
        self.meta = meta or {}

    def in_request(self, at: str = "/data") -> ApiError:
        """This error as the answer to a request that holds the record at pointer `at`."""
        return ApiError(
            self.status, self.code, self.title, self.detail, at + self.pointer, None, self.meta
        )


def record_invalid(detail: str, pointer: str) -> RecordError:
    return RecordError(400, "invalid", "Invalid input.", detail, pointer)


@dataclass
class Profile:
    """One stored profile.

    Updates replace its dicts (and the lists in them) rather than mutate them, so a shallow
    `snapshot()` stays consistent after the store's lock is released, and `content()` taken
    before an update still shows the old values.
    """

    id: str
    created: float
    updated: float
    fields: dict[str, str] = field(default_factory=dict)
    location: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)

    def snapshot(self) -> Profile:
        return Profile(
            self.id,
            self.created,
            self.updated,
            dict(self.fields),
            dict(self.location),
            dict(self.properties),
        )

    def content(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        """What an update can change; comparing two of these tells whether it changed."""
        return self.fields, self.location, self.properties


def checked_identifiers(attributes: dict[str, Any]) -> dict[str, str | None]:
    """The identifiers a request gives, checked; None where it sets one to null.

    Raises `RecordError` for an email Klaviyo would refuse or a phone number that is not a
    valid E.164 number (the emulator's own checks, in .identifiers).
    """
    given: dict[str, str | None] = {}
    for name in IDENTIFIERS:
        if name not in attributes:
            continue
        value = attributes[name]
        if value is not None and name == "email":
            value = _checked_email(value)
        elif value is not None and name == "phone_number":
            value = _checked_phone(value)
        given[name] = value
    return given


# Syncs resend the same values, and bulk jobs hold the lock: remember the verdicts.
@lru_cache(maxsize=65_536)
def _checked_email(value: str) -> str:
    try:
        return checked_email(value)
    except InvalidValue:
        raise record_invalid(
            f"{value} is not a valid email address.", "/attributes/email"
        ) from None


@lru_cache(maxsize=65_536)
def _checked_phone(value: str) -> str:
    try:
        return e164(value)
    except InvalidValue:
        raise record_invalid(
            f"{value} is not a valid phone number.", "/attributes/phone_number"
        ) from None


def index_key(name: str, value: str) -> str:
    """How identifiers compare: emails ignore case, the others are exact."""
    return value.casefold() if name == "email" else value


def merge(profile: Profile, attributes: dict[str, Any], meta: dict[str, Any] | None) -> None:
    """Apply the non-identifier attributes and `meta.patch_properties` of an upsert or PATCH.

    Null clears a field, an omitted field is left alone, `location` and `properties` merge
    key by key, and a null `location` or `properties` clears it all.
    """
    fields = dict(profile.fields)
    for name in STANDARD:
        if name in IDENTIFIERS or name not in attributes:
            continue
        if attributes[name] is None:
            fields.pop(name, None)
        else:
            fields[name] = attributes[name]
    profile.fields = fields
    if "location" in attributes:
        location = attributes["location"]
        profile.location = {} if location is None else _merged(profile.location, location)
    if "properties" in attributes:
        given = attributes["properties"]
        profile.properties = {} if given is None else {**profile.properties, **given}
    patch = (meta or {}).get("patch_properties") or {}
    if patch:
        profile.properties = _patched(profile.properties, patch)


def _merged(location: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    merged = {**location, **given}
    return {key: value for key, value in merged.items() if value is not None}


def _patched(properties: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`unset` removes keys; `append` and `unappend` add to or remove from array values."""
    result = dict(properties)
    unset = patch.get("unset")
    for key in [unset] if isinstance(unset, str) else unset or []:
        result.pop(key, None)
    for key, value in (patch.get("append") or {}).items():
        current = result.get(key)
        existing = [] if current is None else current if isinstance(current, list) else [current]
        result[key] = [*existing, *(value if isinstance(value, list) else [value])]
    for key, value in (patch.get("unappend") or {}).items():
        current = result.get(key)
        if isinstance(current, list):
            removed = value if isinstance(value, list) else [value]
            result[key] = [item for item in current if item not in removed]
    return result


def timestamp(seconds: float) -> str:
    """Klaviyo's datetime format, e.g. `2026-07-15T12:00:00+00:00`."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def render(profile: Profile, base_url: str) -> dict[str, Any]:
    """The profile as GET /api/profiles and POST /api/profile-import show it."""
    attributes: dict[str, Any] = {name: profile.fields.get(name) for name in STANDARD}
    attributes.update(
        created=timestamp(profile.created),
        updated=timestamp(profile.updated),
        last_event_date=None,
        location={name: profile.location.get(name) for name in LOCATION},
        properties=dict(profile.properties),
    )
    own = f"{base_url}/api/profiles/{profile.id}"
    return {
        "type": "profile",
        "id": profile.id,
        "attributes": attributes,
        "relationships": {
            name: {"links": {"self": f"{own}/relationships/{name}/", "related": f"{own}/{name}/"}}
            for name in ("lists", "segments")
        },
        "links": {"self": f"{own}/"},
    }
