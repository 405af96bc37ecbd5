"""Rows to Klaviyo values and JSON:API resources.

Conversion happens here and nowhere else: dates and timestamps become ISO 8601, decimals
become JSON numbers, phone numbers become E.164, emails are checked. A value Klaviyo would
refuse is rejected here, with the reason, before anything is sent; the rest of the batch
goes on. A converter is chosen once per column and batch, not once per value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import orjson
import phonenumbers
import pyarrow as pa
from email_validator import EmailNotValidError, validate_email

from dbt_klaviyo_sync.diff import field_column
from dbt_klaviyo_sync.spec import SyncSpec

#: Klaviyo's limits on what one profile may carry (API.md §2.1, §2.2).
MAX_PROFILE_BYTES = 100 * 1024
MAX_STRING_BYTES = 100 * 1024

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NUMERIC_FIELDS = {"location.latitude", "location.longitude", "value"}


class InvalidValue(ValueError):
    """A value that cannot be sent; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Record:
    """One row, converted and ready to be shaped into a request."""

    key: str
    fingerprint: str
    change: str
    in_snapshot: bool
    klaviyo_id: str | None
    values: dict[str, Any]  # Klaviyo field -> value; None where the model has NULL


@dataclass(frozen=True)
class Reject:
    """A row that will not be sent, and why. Stored in the rejects table."""

    key: str | None
    fingerprint: str | None
    in_snapshot: bool
    code: str
    reason: str
    column: str | None = None
    field: str | None = None

    @property
    def invalid_row(self) -> bool:
        """Rejects of the row's shape (NULL or duplicated key) are reported every run."""
        return self.code in ("null_key", "duplicate_key")


def _json_value(value: Any) -> Any:
    """Plain JSON for any value DuckDB hands us: ISO dates, numbers, nested lists/objects."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        if len(value.encode("utf-8", "surrogatepass")) > MAX_STRING_BYTES:
            raise InvalidValue(
                f"the text is {len(value.encode('utf-8', 'surrogatepass')) // 1024} KB; "
                "Klaviyo accepts at most 100 KB per string"
            )
        if _CONTROL.search(value):
            raise InvalidValue("the text contains control characters; remove them in the model")
        return value
    if isinstance(value, float | Decimal):
        if not math.isfinite(value):
            raise InvalidValue(
                f"{value} is not a number JSON can carry; use NULL or a finite value"
            )
        return (
            int(value)
            if isinstance(value, Decimal) and value == value.to_integral()
            else float(value)
        )
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, bytes):
        try:
            return _json_value(value.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidValue("the value is binary, not UTF-8 text") from exc
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        # DuckDB MAPs arrive as lists of (key, value) pairs.
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return {str(k): _json_value(v) for k, v in value}
        return [_json_value(v) for v in value]
    raise InvalidValue(f"values of type {type(value).__name__} cannot be sent to Klaviyo")


def _text(value: Any) -> Any:
    """Standard attributes are strings in Klaviyo; numbers are sent as their text."""
    converted = _json_value(value)
    if isinstance(converted, dict | list):
        raise InvalidValue("a nested value cannot be sent as a text attribute")
    if converted is None or isinstance(converted, str):
        return converted
    return str(converted).lower() if isinstance(converted, bool) else str(converted)


def _number(value: Any) -> Any:
    converted = _json_value(value)
    if converted is None or (
        isinstance(converted, int | float) and not isinstance(converted, bool)
    ):
        return converted
    if isinstance(converted, str):
        try:
            return _json_value(float(converted))
        except ValueError as exc:
            raise InvalidValue(f"{converted!r} is not a number") from exc
    raise InvalidValue(f"{converted!r} is not a number")


def _email(value: Any) -> Any:
    text = _text(value)
    if text is None:
        return None
    text = text.strip()
    try:
        validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidValue(f"{text!r} is not a valid email address: {exc}") from exc
    return text


def _phone(value: Any) -> Any:
    text = _text(value)
    if text is None:
        return None
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidValue(
            f"{text!r} is not a phone number Klaviyo accepts: it must be in E.164 form, "
            "starting with + and the country code (e.g. +14155550123)"
        ) from exc
    if not phonenumbers.is_valid_number(number):
        raise InvalidValue(
            f"{text!r} is not a valid phone number for its country code; Klaviyo needs a "
            "valid number in E.164 form (e.g. +14155550123)"
        )
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _converter(field: str) -> Callable[[Any], Any]:
    if field == "email":
        return _email
    if field == "phone_number":
        return _phone
    if field in _NUMERIC_FIELDS:
        return _number
    if field.startswith("properties."):
        return _json_value
    return _text


def records(spec: SyncSpec, batch: pa.RecordBatch) -> tuple[list[Record], list[Reject]]:
    """Convert a batch of changed rows; rows with any bad value become rejects."""
    columns = {name: batch.column(name).to_pylist() for name in batch.schema.names}
    converters = [_converter(f.field) for f in spec.fields]
    good: list[Record] = []
    bad: list[Reject] = []
    for i in range(batch.num_rows):
        key, fingerprint = columns["__key"][i], columns["__fingerprint"][i]
        in_snapshot, change = bool(columns["__in_snapshot"][i]), columns["__change"][i]
        if change in ("null_key", "duplicate_key"):
            bad.append(_shape_reject(spec, key, change))
            continue
        values: dict[str, Any] = {}
        for index, (mapping, convert) in enumerate(zip(spec.fields, converters, strict=True)):
            try:
                values[mapping.field] = convert(columns[field_column(index)][i])
            except InvalidValue as exc:
                bad.append(
                    Reject(
                        key,
                        fingerprint,
                        in_snapshot,
                        "invalid_value",
                        str(exc),
                        mapping.column,
                        mapping.field,
                    )
                )
                break
        else:
            good.append(
                Record(key, fingerprint, change, in_snapshot, columns["__klaviyo_id"][i], values)
            )
    return good, bad


def _shape_reject(spec: SyncSpec, key: str | None, change: str) -> Reject:
    if change == "null_key":
        reason = (
            f"the sync key column '{spec.key_column}' is NULL; filter such rows out in the "
            "model or give them a key"
        )
    else:
        reason = (
            f"several rows share this {spec.key_field}; make '{spec.key_column}' unique "
            "in the model (the klaviyo_sync.check() post-hook catches this at build time)"
        )
    return Reject(key, None, False, change, reason, spec.key_column, spec.key_field)


def profile_resource(spec: SyncSpec, record: Record) -> dict[str, Any]:
    """A `profile` resource object for profile-import, bulk jobs and the client endpoint.

    With `nulls: skip` a NULL is left out (Klaviyo keeps its value); with `nulls: clear` it
    is sent as null, and custom properties are unset through `meta.patch_properties`.
    """
    attributes: dict[str, Any] = {}
    location: dict[str, Any] = {}
    properties: dict[str, Any] = {}
    unset: list[str] = []
    for field, value in record.values.items():
        if value is None and spec.nulls == "skip":
            continue
        if field.startswith("location."):
            location[field.removeprefix("location.")] = value
        elif field.startswith("properties."):
            name = field.removeprefix("properties.")
            if value is None:
                unset.append(name)
            else:
                properties[name] = value
        else:
            attributes[field] = value
    if location:
        attributes["location"] = location
    if properties:
        attributes["properties"] = properties
    resource: dict[str, Any] = {"type": "profile", "attributes": attributes}
    if unset:
        resource["meta"] = {"patch_properties": {"unset": unset}}
    return resource


def profile_size_reject(spec: SyncSpec, record: Record, body: bytes) -> Reject | None:
    """Klaviyo refuses a profile over 100 KB; say so before sending it."""
    if len(body) <= MAX_PROFILE_BYTES:
        return None
    return Reject(
        record.key,
        record.fingerprint,
        record.in_snapshot,
        "too_large",
        f"the profile is {len(body) // 1024} KB as JSON; Klaviyo accepts at most 100 KB "
        "per profile. Send fewer or shorter properties.",
    )


def dumps(payload: Any) -> bytes:
    return orjson.dumps(payload)
