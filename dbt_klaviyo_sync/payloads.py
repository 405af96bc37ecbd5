"""Rows to Klaviyo values and JSON:API resources.

Conversion happens here and nowhere else: dates and timestamps become ISO 8601, decimals
become JSON numbers, phone numbers become E.164, emails are checked. A value Klaviyo would
refuse is rejected here, with the reason, before anything is sent; the rest of the batch
goes on. A converter is chosen once per column and batch, not once per value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from functools import cache
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from dbt_klaviyo_sync.diff import field_column
from dbt_klaviyo_sync.identifiers import InvalidValue, checked_email, e164, maybe_invalid_emails
from dbt_klaviyo_sync.spec import EVENT_FIELDS, SyncSpec

#: Klaviyo's limits on what one profile may carry (API.md §2.1, §2.2).
MAX_PROFILE_BYTES = 100 * 1024
MAX_STRING_BYTES = 100 * 1024

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: Klaviyo's limits on events (API.md §2.9).
EARLIEST_EVENT = datetime(1990, 1, 1, tzinfo=UTC)
MAX_METRIC_NAME = 128  # "fewer than 128 characters"
MAX_EVENT_PROPERTIES = 400
_CURRENCY = re.compile(r"^[A-Z]{3}$")


@dataclass(frozen=True)
class Record:
    """One row, converted and ready to be shaped into a request."""

    key: str
    fingerprint: int
    change: str
    in_snapshot: bool
    klaviyo_id: str | None
    values: dict[str, Any]  # Klaviyo field -> value; None where the model has NULL


@dataclass(frozen=True)
class Reject:
    """A row that will not be sent, and why. Stored in the rejects table."""

    key: str | None
    fingerprint: int | None
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
        return float(value)
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
    return None if text is None else checked_email(text)


def _phone(value: Any) -> Any:
    """E.164, or a reject; whether the number exists for its country is Klaviyo's to say
    (checking costs more than all the rest of a row)."""
    text = _text(value)
    return None if text is None else e164(text, strict=False)


def _time(value: Any) -> Any:
    """An event's time: ISO 8601 with a zone, within Klaviyo's window (API.md §2.9)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise InvalidValue(f"{value!r} is not an ISO 8601 time") from exc
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise InvalidValue(f"{value!r} is not a time; use a TIMESTAMP or DATE column")
    when = value if value.tzinfo else value.replace(tzinfo=UTC)
    if when < EARLIEST_EVENT:
        raise InvalidValue(f"{when.isoformat()} is before 1990; Klaviyo refuses such events")
    if when > datetime.now(UTC) + timedelta(days=365):
        raise InvalidValue(
            f"{when.isoformat()} is more than a year ahead; Klaviyo refuses such events"
        )
    return when.isoformat()


def _currency(value: Any) -> Any:
    text = _text(value)
    if text is not None and not _CURRENCY.match(text):
        raise InvalidValue(f"{text!r} is not an ISO 4217 currency code such as USD")
    return text


def _metric(value: Any) -> Any:
    text = _text(value)
    if text is not None and not 0 < len(text) < MAX_METRIC_NAME:
        raise InvalidValue(
            f"the metric name has {len(text)} characters; Klaviyo needs 1 to {MAX_METRIC_NAME - 1}"
        )
    return text


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "email": _email,
    "phone_number": _phone,
    "location.latitude": _number,
    "location.longitude": _number,
    "value": _number,
    "time": _time,
    "value_currency": _currency,
    "metric": _metric,
}


#: Fields whose every value goes through its converter, whatever the column type.
_PER_VALUE = frozenset({"phone_number", "time", "value_currency", "metric"})


def _converter(field: str) -> Callable[[Any], Any]:
    if field.startswith("properties."):
        return _json_value
    return _CONVERTERS.get(field, _text)


def identifier(field: str, value: str) -> str | None:
    """A sync key as Klaviyo stores it (an E.164 phone, a trimmed email), or None when
    Klaviyo could not hold it."""
    try:
        converted = _converter(field)(value)
    except InvalidValue:
        return None
    return None if converted is None else str(converted)


def _column(field: str, array: pa.Array) -> tuple[list[Any], dict[int, str]]:
    """Convert one column of a batch: its values, and the reason of each row that fails.

    Whole columns are checked at once with Arrow compute where the type allows (lengths,
    control characters, finite numbers, the plain-email shape); only the rows those checks
    cannot clear go through the per-value converter. That keeps the common case to a few
    vectorised passes instead of a Python call per value.
    """
    convert = _converter(field)
    kind = array.type
    suspects: Iterable[int]
    if field in _PER_VALUE or (pa.types.is_temporal(kind) and not pa.types.is_date(kind)):
        values, suspects = array.to_pylist(), range(len(array))
    elif (pa.types.is_string(kind) or pa.types.is_large_string(kind)) and convert in (
        _text,
        _json_value,
        _email,
    ):
        values = array.to_pylist()
        odd = pc.or_kleene(
            pc.greater(pc.binary_length(array), MAX_STRING_BYTES),
            pc.match_substring_regex(array, _CONTROL.pattern),
        )
        if field == "email":
            odd = pc.or_kleene(odd, maybe_invalid_emails(array))
        suspects = _true_rows(odd)
    elif pa.types.is_date(kind):
        values, suspects = pc.strftime(array, "%Y-%m-%d").to_pylist(), ()
    elif pa.types.is_decimal(kind):
        # Arrow's decimal-to-float cast is not correctly rounded (51.5072 -> 51.50720..05).
        values, suspects = [None if v is None else float(v) for v in array.to_pylist()], ()
    elif pa.types.is_floating(kind):
        values, suspects = array.to_pylist(), _true_rows(pc.invert(pc.is_finite(array)))
    elif pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        values, suspects = array.to_pylist(), () if convert is _json_value else range(len(array))
    else:
        values, suspects = array.to_pylist(), range(len(array))
    errors: dict[int, str] = {}
    for i in suspects:
        try:
            values[i] = convert(values[i])
        except InvalidValue as exc:
            errors[i] = str(exc)
    return values, errors


def _true_rows(mask: pa.Array) -> list[int]:
    return pc.indices_nonzero(pc.fill_null(mask, False)).to_pylist()  # type: ignore[no-any-return]


def records(spec: SyncSpec, batch: pa.RecordBatch) -> tuple[list[Record], list[Reject]]:
    """Convert a batch of changed rows; rows with any bad value become rejects."""
    meta = {
        name: batch.column(name).to_pylist()
        for name in ("__key", "__fingerprint", "__in_snapshot", "__change", "__klaviyo_id")
    }
    converted = [_column(f.field, batch.column(field_column(i))) for i, f in enumerate(spec.fields)]
    names = [f.field for f in spec.fields]
    first_failure: dict[int, int] = {}  # row -> the first field that failed in it
    for j, (_, errors) in reversed(list(enumerate(converted))):
        first_failure |= dict.fromkeys(errors, j)
    good: list[Record] = []
    bad: list[Reject] = []
    for i in range(batch.num_rows):
        key, fingerprint = meta["__key"][i], meta["__fingerprint"][i]
        in_snapshot, change = bool(meta["__in_snapshot"][i]), meta["__change"][i]
        if change in ("null_key", "duplicate_key"):
            bad.append(_shape_reject(spec, key, change))
            continue
        failed = first_failure.get(i)
        if failed is not None:
            mapping = spec.fields[failed]
            reason = converted[failed][1][i]
            bad.append(
                Reject(
                    key,
                    fingerprint,
                    in_snapshot,
                    "invalid_value",
                    reason,
                    mapping.column,
                    mapping.field,
                )
            )
            continue
        values = {name: column[i] for name, (column, _) in zip(names, converted, strict=True)}
        good.append(Record(key, fingerprint, change, in_snapshot, meta["__klaviyo_id"][i], values))
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


@cache
def _placement(field: str) -> tuple[str, str]:
    """Where a field goes in a profile resource: ("id" | "attributes" | "location" |
    "properties", its name there)."""
    if field == "klaviyo_id":
        return "id", "id"
    for part in ("location", "properties"):
        if field.startswith(part + "."):
            return part, field.removeprefix(part + ".")
    return "attributes", field


def _profile_shape(values: dict[str, Any], clear: bool) -> dict[str, Any]:
    """A `profile` resource from profile fields: standard attributes, `location.*`,
    `properties.*`, and `klaviyo_id` as the resource id. A NULL is left out (Klaviyo keeps
    its value) unless `clear`, which sends null and unsets custom properties."""
    attributes: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {"location": {}, "properties": {}, "attributes": attributes}
    unset: list[str] = []
    resource: dict[str, Any] = {"type": "profile"}
    for field, value in values.items():
        if value is None and not clear:
            continue
        part, name = _placement(field)
        if part == "id":
            resource["id"] = value
        elif part == "properties" and value is None:
            unset.append(name)
        else:
            parts[part][name] = value
    for part in ("location", "properties"):
        if parts[part]:
            attributes[part] = parts[part]
    resource["attributes"] = attributes
    if unset:
        resource["meta"] = {"patch_properties": {"unset": unset}}
    return resource


def profile_resource(spec: SyncSpec, record: Record) -> dict[str, Any]:
    """A `profile` resource for profile-import, bulk jobs, the client endpoint and PATCH,
    with NULLs handled as the model's `nulls` setting says."""
    return _profile_shape(record.values, clear=spec.nulls == "clear")


def event_resources(spec: SyncSpec, record: Record) -> tuple[dict[str, Any], dict[str, Any]]:
    """The profile and the event of one row, for a bulk create request.

    `properties.*` are the event's properties here; the other fields describe its profile.
    Klaviyo ties an event to a profile by email, Klaviyo id or external id; phone numbers
    alone do not work reliably (the Census guide says so), so such rows are rejected.
    """
    values = record.values
    if not any(values.get(f) for f in ("email", "external_id", "klaviyo_id")):
        raise InvalidValue(
            "the event has no email, external_id or klaviyo_id; Klaviyo ties events to a "
            "profile by those, and a phone number alone does not work reliably"
        )
    properties = {
        f.removeprefix("properties."): v
        for f, v in values.items()
        if f.startswith("properties.") and v is not None
    }
    if len(properties) > MAX_EVENT_PROPERTIES:
        raise InvalidValue(
            f"the event has {len(properties)} properties; Klaviyo accepts at most "
            f"{MAX_EVENT_PROPERTIES}"
        )
    profile_fields = {
        f: v
        for f, v in values.items()
        if not f.startswith("properties.") and f not in EVENT_FIELDS and f != "unique_id"
    }
    metric = spec.metric or values.get("metric")
    if not metric:
        raise InvalidValue("the metric column is NULL; every event needs a metric name")
    attributes: dict[str, Any] = {
        "properties": properties,
        "metric": {"data": {"type": "metric", "attributes": {"name": metric}}},
        "unique_id": record.key,
    }
    attributes.update(
        {f: values[f] for f in ("time", "value", "value_currency") if values.get(f) is not None}
    )
    return _profile_shape(profile_fields, clear=False), {"type": "event", "attributes": attributes}


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
