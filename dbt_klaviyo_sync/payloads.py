"""Rows to Klaviyo values and JSON:API resources.

Conversion happens here and nowhere else: dates and timestamps become ISO 8601, decimals
become JSON numbers of exactly their digits, phone numbers become E.164, emails are checked.
Every value arrives exactly (text where Klaviyo takes text, a number where it takes one, any
JSON in a custom property) or its row is rejected here, with the reason, before anything is
sent; the rest of the batch goes on. `value_sql` chooses how DuckDB hands each column over,
for the types Arrow would not carry exactly. A converter is chosen once per column and
batch, not once per value. Profiles whose every value the vectorised checks clear skip
Python's values altogether: `shaped_rows` writes their JSON a column at a time.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from functools import cache
from typing import Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from dbt_klaviyo_sync.changeset import (
    BOOLEAN_FIELDS,
    CHANGE,
    FINGERPRINT,
    IN_SNAPSHOT,
    JSON_TEXT,
    KEY,
    KLAVIYO_ID,
    MEMO,
    NUMBER_FIELDS,
    SEND_TIME_FIELDS,
    Record,
    Reject,
    field_column,
)
from dbt_klaviyo_sync.identifiers import (
    InvalidValue,
    checked_email,
    e164,
    maybe_invalid_emails,
    possible_e164,
)
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
#: Integers a JSON parser such as orjson (the emulator's) keeps exactly; it reads larger
#: ones as rounded floats.
_EXACT_INTEGERS = range(-(2**63), 2**64)
_YEARS = "; Klaviyo takes ISO 8601 dates in years 1-9999"
_INTERVAL = (
    "an INTERVAL cannot be sent: Klaviyo has no durations; cast it in the model to a number "
    "of seconds (epoch(x)) or to text"
)


def _json_value(value: Any) -> Any:
    """Plain JSON for any value DuckDB hands us: ISO dates, exact numbers, nested
    lists/objects."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value not in _EXACT_INTEGERS:
            raise InvalidValue(
                f"{value} is beyond the 64-bit integers Klaviyo keeps exactly (it would keep "
                "a rounded float); cast it to VARCHAR in the model to send its digits as text"
            )
        return value
    if isinstance(value, str):
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidValue(
                "the text holds an unpaired UTF-16 surrogate, which is not text; fix it in "
                "the model"
            ) from exc
        if size > MAX_STRING_BYTES:
            raise InvalidValue(
                f"the text is {size // 1024} KB; Klaviyo accepts at most 100 KB per string"
            )
        if _CONTROL.search(value):
            raise InvalidValue("the text contains control characters; remove them in the model")
        return value
    if isinstance(value, float | Decimal):
        if not math.isfinite(value):
            raise InvalidValue(_not_finite(value))
        return _exact_number(value) if isinstance(value, Decimal) else value
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, bytes):
        try:
            return _json_value(value.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidValue("the value is binary, not UTF-8 text") from exc
    if isinstance(value, pa.MonthDayNano):  # a namedtuple: before the lists
        raise InvalidValue(_INTERVAL)
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    raise InvalidValue(f"values of type {type(value).__name__} cannot be sent to Klaviyo")


def _not_finite(value: Any) -> str:
    return f"{value} is not a number JSON can carry; use NULL or a finite value"


def _exact_number(value: Decimal) -> orjson.Fragment:
    """A decimal as a JSON number of exactly its digits: 12.50 stays 12.50, and 38 digits
    stay 38 digits (a float keeps about 16)."""
    if not math.isfinite(float(value)):  # JSON text can hold 1e400; Klaviyo cannot
        raise InvalidValue(_not_finite(value))
    return orjson.Fragment(_decimal_text(value))


def _decimal_text(value: Decimal) -> str:
    """A decimal's text as DuckDB writes it: all its digits, never an exponent."""
    return format(value, "f")


def _from_json(text: str | None) -> Any:
    """A JSON value from its text, numbers exact: integers as int, the others as Decimal."""
    if text is None:
        return None
    try:
        return json.loads(text, parse_float=Decimal, parse_constant=_json_constant)
    except InvalidValue:
        raise
    except (ValueError, RecursionError) as exc:
        raise InvalidValue(f"the value is not JSON Klaviyo can take: {exc}") from exc


def _json_constant(name: str) -> Any:
    raise InvalidValue(_not_finite(name))


def _text(value: Any) -> Any:
    """Standard attributes are strings in Klaviyo; numbers are sent as their text."""
    if isinstance(value, Decimal):
        return _decimal_text(value)
    converted = _json_value(value)
    if isinstance(converted, dict | list):
        raise InvalidValue("a nested value cannot be sent as a text attribute")
    if converted is None or isinstance(converted, str):
        return converted
    return str(converted).lower() if isinstance(converted, bool) else str(converted)


def _number(value: Any) -> Any:
    if isinstance(value, bytes):
        raise InvalidValue(
            "binary data (BLOB or BIT) is not a number; cast it to a number in the model"
        )
    converted = _json_value(value)
    if converted is None or (
        isinstance(converted, int | float | orjson.Fragment) and not isinstance(converted, bool)
    ):
        return converted
    if isinstance(converted, str):
        try:
            return _json_value(float(converted))
        except ValueError as exc:
            raise InvalidValue(f"{converted!r} is not a number") from exc
    if isinstance(converted, dict | list):
        raise InvalidValue("a nested value is not a number")
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
    when = _instant(value)
    if when < EARLIEST_EVENT:
        raise InvalidValue(f"{when.isoformat()} is before 1990; Klaviyo refuses such events")
    if when > datetime.now(UTC) + timedelta(days=365):
        raise InvalidValue(
            f"{when.isoformat()} is more than a year ahead; Klaviyo refuses such events"
        )
    return when.isoformat()


def _consented_at(value: Any) -> Any:
    """When historical consent was given: Klaviyo requires it in the past (API.md §2.14)."""
    if value is None:
        return None
    when = _instant(value)
    if when > datetime.now(UTC):
        raise InvalidValue(
            f"consented_at {when.isoformat()} is in the future; Klaviyo takes historical "
            "consent only with a past consented_at. Fix the row, or leave it NULL to "
            "subscribe it as consent given now"
        )
    return when.isoformat()


def _boolean(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    raise InvalidValue(f"{value!r} is not true or false; make the column BOOLEAN in the model")


def _instant(value: Any) -> datetime:
    """A time with a zone (UTC when it has none), from a timestamp, a date or ISO text."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise InvalidValue(f"{value!r} is not an ISO 8601 time") from exc
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise InvalidValue(f"{value!r} is not a time; use a TIMESTAMP or DATE column")
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _exact_time(text: str | None) -> str | None:
    """An event time with nanoseconds, which Python's datetime cannot hold: checked as
    `_time` checks any, and sent with all its digits."""
    _time(text)
    return text


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
    **dict.fromkeys(NUMBER_FIELDS, _number),
    "time": _time,
    "value_currency": _currency,
    "metric": _metric,
    "consented_at": _consented_at,
    **dict.fromkeys(BOOLEAN_FIELDS, _boolean),
}


#: Fields whose every value goes through its converter, whatever the column type.
_PER_VALUE = frozenset({"phone_number", "time", "value_currency", "metric", "consented_at"})


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
    control characters, finite numbers, years, the plain-email shape); only the rows those
    checks cannot clear go through the per-value converter. That keeps the common case to
    a few vectorised passes instead of a Python call per value.
    """
    convert = _converter(field)
    array, errors = _within_years(array)
    if pa.types.is_dictionary(array.type):  # ENUM
        array = array.dictionary_decode()
    kind = array.type
    suspects: Iterable[int] = range(len(array))
    if _is_json_text(kind):
        texts, take = pc.struct_field(array, [0]).to_pylist(), convert
        values, convert = texts, lambda text: take(_from_json(text))
    elif pa.types.is_time64(kind) or (pa.types.is_timestamp(kind) and kind.unit == "ns"):
        values = _clock_texts(array)
        convert = _exact_time if convert is _time else convert
    elif field in _PER_VALUE or pa.types.is_timestamp(kind):
        values, unreadable = _readable(array)
        errors |= unreadable
    elif _nested(kind) and convert not in (_json_value, _number, _time):
        values, suspects = [None] * len(array), ()
        errors |= dict.fromkeys(
            _true_rows(pc.is_valid(array)), "a nested value cannot be sent as a text attribute"
        )
    elif (pa.types.is_string(kind) or pa.types.is_large_string(kind)) and convert in (
        _text,
        _json_value,
        _email,
    ):
        values = array.to_pylist()
        suspects = _true_rows(_odd_texts(array, convert))
    elif pa.types.is_date(kind):
        values = _date_texts(array).to_pylist()
        if convert in (_text, _json_value):
            suspects = ()
    elif pa.types.is_decimal(kind):
        values = _decimal_texts(array)
        if convert in (_json_value, _number):
            values, suspects = [None if v is None else orjson.Fragment(v) for v in values], ()
        elif convert is _text:
            suspects = ()
    elif pa.types.is_floating(kind):
        values = array.to_pylist()
        if convert in (_json_value, _number):
            suspects = _true_rows(pc.invert(pc.is_finite(array)))
    elif pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        if convert is _text:
            values, suspects = pc.cast(array, pa.string()).to_pylist(), ()
        else:
            values = array.to_pylist()
            if convert is _json_value or (convert is _number and pa.types.is_integer(kind)):
                suspects = ()
    else:
        values, unreadable = _readable(array)
        errors |= unreadable
    for i in suspects:
        try:
            values[i] = convert(values[i])
        except InvalidValue as exc:
            errors[i] = str(exc)
    return values, errors


def _odd_texts(
    array: pa.Array, convert: Callable[[Any], Any], *, controls: bool = True
) -> pa.Array:
    """For a text column, the rows its vectorised checks cannot clear: over Klaviyo's size
    for a string, holding a control character (unless `controls` is False: none can be
    there), or, for emails, not of a certainly valid shape."""
    odd = pc.greater(pc.binary_length(array), MAX_STRING_BYTES)
    if controls:
        odd = pc.or_kleene(odd, pc.match_substring_regex(array, _CONTROL.pattern))
    if convert is _email:
        odd = pc.or_kleene(odd, maybe_invalid_emails(array))
    return odd


def _true_rows(mask: pa.Array) -> list[int]:
    return pc.indices_nonzero(pc.fill_null(mask, False)).to_pylist()  # type: ignore[no-any-return]


def _is_json_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_struct(kind) and [f.name for f in kind] == [JSON_TEXT])


def _nested(kind: pa.DataType) -> bool:
    return pa.types.is_nested(kind) and not pa.types.is_union(kind)


def _holds_map(kind: pa.DataType) -> bool:
    return pa.types.is_map(kind) or any(
        _holds_map(kind.field(i).type) for i in range(kind.num_fields)
    )


#: Per unit of Arrow's times and timestamps: how many make a second, and the digits of a
#: fraction of a second.
_UNITS = {"s": (1, 0), "ms": (10**3, 3), "us": (10**6, 6), "ns": (10**9, 9)}
#: The seconds from 1970 to year 1 and to year 10000; Python's dates end at 9999.
_YEAR_1, _YEAR_10000 = -62_135_596_800, 253_402_300_800
_EPOCH = datetime(1970, 1, 1)


def _within_years(array: pa.Array) -> tuple[pa.Array, dict[int, str]]:
    """Dates and timestamps outside years 1-9999, DuckDB's infinities among them, which
    Python cannot hold: their rows with the reason, and the array with them NULL."""
    kind = array.type
    if pa.types.is_date32(kind):
        noun, numbers, infinity = "date", array.cast(pa.int32()), 2**31 - 1
        first, end = _YEAR_1 // 86_400, _YEAR_10000 // 86_400
    elif pa.types.is_timestamp(kind):
        noun, numbers, infinity = "timestamp", array.cast(pa.int64()), 2**63 - 1
        per = _UNITS[kind.unit][0]
        first, end = max(_YEAR_1 * per, 1 - infinity), min(_YEAR_10000 * per, infinity)
    else:
        return array, {}
    outside = pc.or_(pc.less(numbers, first), pc.greater_equal(numbers, end))
    rows = _true_rows(outside)
    if not rows:
        return array, {}
    reasons = {}
    for i in rows:
        number = numbers[i].as_py()
        what = {infinity: "infinity", -infinity: "-infinity"}.get(number) or (
            "before year 1" if number < first else "beyond year 9999"
        )
        reasons[i] = f"the {noun} is {what}{_YEARS}"
    return pc.if_else(pc.fill_null(outside, False), pa.scalar(None, kind), array), reasons


def _clock_texts(array: pa.Array) -> list[str | None]:
    """Times of day and nanosecond timestamps as ISO 8601 text, as Python's types cannot
    hold them (24:00:00, nanoseconds): whole seconds, and the fraction when there is one."""
    kind = array.type
    per, digits = _UNITS[kind.unit]
    texts: list[str | None] = []
    for number in array.cast(pa.int64()).to_pylist():
        if number is None:
            texts.append(None)
            continue
        seconds, fraction = divmod(number, per)
        if pa.types.is_time(kind):
            hours, rest = divmod(seconds, 3600)
            text, zone = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}", ""
        else:
            text, zone = (_EPOCH + timedelta(seconds=seconds)).isoformat(), "+00:00"
        texts.append(text + (f".{fraction:0{digits}d}" if fraction else "") + zone)
    return texts


def _date_texts(array: pa.Array) -> pa.Array:
    """Dates as ISO 8601 text. Arrow's cast writes a date32 (DuckDB's DATE) as strftime's
    %Y-%m-%d does, for every day of years 1-9999 (all that `_within_years` leaves), twenty
    times faster; a date64 may hold a time of day, which the cast writes differently."""
    if pa.types.is_date32(array.type):
        return pc.cast(array, pa.string())
    return pc.strftime(array, "%Y-%m-%d")


def _decimal_texts(array: pa.Array) -> list[str | None]:
    """Each decimal's text as DuckDB writes it, at Arrow's speed: Arrow writes the same
    but for values under 1e-6, which it gives an exponent."""
    texts = pc.cast(array, pa.string())
    values: list[str | None] = texts.to_pylist()
    for i in _true_rows(pc.match_substring(texts, "E")):
        values[i] = _decimal_text(array[i].as_py())
    return values


def _readable(array: pa.Array) -> tuple[list[Any], dict[int, str]]:
    """The Python values of a column. A value Python cannot hold (a date beyond year 9999
    inside a LIST, say) makes its row NULL with the reason, instead of failing the batch.
    MAPs become dicts (an empty one too); asking for that costs more, so only for them."""
    maps = "strict" if _holds_map(array.type) else None
    try:
        return array.to_pylist(maps_as_pydicts=maps), {}
    except (ValueError, OverflowError, TypeError, pa.ArrowException):
        pass
    values: list[Any] = []
    errors: dict[int, str] = {}
    for i in range(len(array)):
        try:
            values.append(array[i].as_py(maps_as_pydicts=maps))
        except OverflowError:
            values.append(None)
            errors[i] = f"a date or time in it is beyond year 9999 or infinite{_YEARS}"
        except (ValueError, TypeError, pa.ArrowException) as exc:
            values.append(None)
            errors[i] = f"Python cannot read the value ({exc}); cast it in the model"
    return values, errors


def records(spec: SyncSpec, batch: pa.RecordBatch) -> tuple[list[Record], list[Reject]]:
    """Convert a batch of changed rows; rows with any bad value become rejects."""
    meta = {
        name: batch.column(name).to_pylist()
        for name in (KEY, FINGERPRINT, IN_SNAPSHOT, CHANGE, KLAVIYO_ID)
    }
    memos = _memos(batch)
    converted = [_column(f.field, batch.column(field_column(i))) for i, f in enumerate(spec.fields)]
    names = [f.field for f in spec.fields]
    first_failure: dict[int, int] = {}  # row -> the first field that failed in it
    for j, (_, errors) in reversed(list(enumerate(converted))):
        first_failure |= dict.fromkeys(errors, j)
    good: list[Record] = []
    bad: list[Reject] = []
    for i in range(batch.num_rows):
        key, fingerprint = meta[KEY][i], meta[FINGERPRINT][i]
        in_snapshot, change = bool(meta[IN_SNAPSHOT][i]), meta[CHANGE][i]
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
        klaviyo_id = meta[KLAVIYO_ID][i]
        good.append(
            Record(key, fingerprint, change, in_snapshot, klaviyo_id, values, memo=memos[i])
        )
    return good, bad


def _memos(batch: pa.RecordBatch) -> list[int | None]:
    """Each row's `MEMO`; None for every row where the warehouse keeps none."""
    if MEMO in batch.schema.names:
        memos: list[int | None] = batch.column(MEMO).to_pylist()
        return memos
    return [None] * batch.num_rows


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


# -- profiles shaped a column at a time ----------------------------------------------------

#: What JSON escapes among the characters `_CONTROL` lets through, as orjson writes it.
_JSON_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"))
#: The characters JSON escapes or `_CONTROL` refuses.
_UNUSUAL = re.compile(rb'[\x00-\x1f\x7f"\\]')
_OFFSET = struct.Struct("<i")  # a text's start in an Arrow string array's bytes
_SHAPED_CHANGES = pa.array(["add", "update"])
#: The zones of timestamps Python writes with +00:00.
_UTC = (None, "UTC", "Etc/UTC", "+00:00")


#: The columns of profiles shaped a column at a time (`shaped_rows`): the change's own
#: (`changeset`'s names without their underscores), the JSON of every value as the state
#: keeps what Klaviyo accepted, the profile resource's JSON, and the text of each field a
#: sender reads (`SEND_TIME_FIELDS`), named `SENDS + field`.
SHAPED_META = ("key", "fingerprint", "change", "in_snapshot", "klaviyo_id", "memo")
SENDS = "send:"


def shaped_rows(spec: SyncSpec, batch: pa.RecordBatch) -> tuple[pa.Table, pa.RecordBatch]:
    """The batch's profiles shaped a column at a time in Arrow, for the rows whose every
    value the vectorised checks of `_column` clear and its conversion leaves as it is: a
    table of `SHAPED_META`, `values_json`, `body` and the send-time fields, byte for byte
    what `records`, `profile_resource` and `dumps` make of them (a Python call per value
    costs far more than the rest of a row's trip). The other rows come back as a batch,
    for `records` to convert or reject with the reason: a suspect value, a type converted
    value by value (floats, nested values, JSON, timestamps before 1970 or in another zone
    than UTC), a NULL under `nulls: clear`, a body over Klaviyo's limit, an invalid key."""
    rows = batch.num_rows
    clean = pc.is_in(batch.column(CHANGE), value_set=_SHAPED_CHANGES)
    parts: dict[str, list[pa.Array]] = {
        p: [] for p in ("id", "attributes", "location", "properties")
    }
    pairs, sent = [], {}
    for i, mapping in enumerate(spec.fields):
        array = batch.column(field_column(i))
        if pa.types.is_dictionary(array.type):  # ENUM
            array = array.dictionary_decode()
        shaped = _column_json(mapping.field, array)
        json, fine = shaped or (_JsonText(pa.nulls(rows, pa.string())), pc.is_null(array))
        clean = pc.and_(clean, fine)
        if spec.nulls == "clear":
            clean = pc.and_(clean, pc.is_valid(array))
        pair = _pair(mapping.field, json)
        pairs.append(pc.fill_null(pair, orjson.dumps(mapping.field).decode() + ":null"))
        part, name = _placement(mapping.field)
        parts[part].append(pair if name == mapping.field else _pair(name, json))
        if mapping.field in SEND_TIME_FIELDS:
            sent[mapping.field] = array
    attributes = parts["attributes"] + [
        _object_member(part, parts[part]) for part in ("location", "properties") if parts[part]
    ]
    members = _joined(attributes, rows)
    body = pc.binary_join_element_wise(
        '{"type":"profile"',
        *parts["id"],
        pc.binary_join_element_wise('"attributes":{', members, "}}", ""),
        ",",
        null_handling="skip",
    )
    clean = pc.and_(clean, pc.less_equal(pc.binary_length(body), MAX_PROFILE_BYTES))
    keep = pc.fill_null(clean, False)
    every = _joined(pairs, rows)  # no NULL among them
    memo = batch.column(MEMO) if MEMO in batch.schema.names else pa.nulls(rows, pa.uint64())
    columns = {
        "key": batch.column(KEY),
        "fingerprint": batch.column(FINGERPRINT),
        "change": batch.column(CHANGE),
        "in_snapshot": pc.fill_null(batch.column(IN_SNAPSHOT), False),
        "klaviyo_id": batch.column(KLAVIYO_ID),
        "memo": memo,
        "values_json": pc.binary_join_element_wise("{", every, "}", ""),
        "body": body,
        **{SENDS + name: pc.cast(array, pa.string()) for name, array in sent.items()},
    }
    shaped = pa.table(columns)
    if keep.true_count == rows:  # the usual batch: Arrow's filter would copy every column
        return shaped, batch.slice(0, 0)
    return shaped.filter(keep), batch.filter(pc.invert(keep))


def shaped_records(shaped: pa.Table) -> tuple[list[Record], list[bytes]]:
    """The records and bodies of rows `shaped_rows` shaped, for what takes them one by one."""
    meta = [shaped.column(name).to_pylist() for name in SHAPED_META[:5]]
    names = [n for n in shaped.column_names if n.startswith(SENDS)]
    columns = [shaped.column(n).to_pylist() for n in names]
    fields = [n.removeprefix(SENDS) for n in names]
    texts = shaped.column("values_json").to_pylist()
    sending = (
        [dict(zip(fields, ids, strict=True)) for ids in zip(*columns, strict=True)]
        if columns
        else [{} for _ in texts]
    )
    memos = shaped.column("memo").to_pylist()
    records = list(map(Record, *meta, sending, texts, memos))
    return records, shaped.column("body").cast(pa.binary()).to_pylist()


class _JsonText(NamedTuple):
    """A column's values as JSON: `quote + text + quote` in each row (NULL for NULL). The
    quotes are added with the member's name, in one copy of the text instead of two."""

    text: pa.Array
    quote: str = ""


def _pair(name: str, json: _JsonText) -> pa.Array:
    """`"name":value` for each row; NULL where the value is."""
    prefix = orjson.dumps(name).decode() + ":" + json.quote
    return pc.binary_join_element_wise(prefix, json.text, json.quote, "")


def _object_member(name: str, pairs: list[pa.Array]) -> pa.Array:
    """`"name":{...}` of the pairs that are not NULL; NULL where all are (no object)."""
    inside = _joined(pairs, len(pairs[0]))
    member = pc.binary_join_element_wise(f'"{name}":{{', inside, "}", "")
    return pc.if_else(pc.equal(inside, ""), pa.scalar(None, pa.string()), member)


def _joined(pieces: list[pa.Array], rows: int) -> pa.Array:
    """The pieces that are not NULL, comma-separated: '' where all are. Arrow's join
    (pyarrow 26) leaves out a row whose pieces are all NULL, shortening the array: unless
    a piece has no NULL (then no row can be left out), every row starts with an empty
    piece, whose comma is cut off after."""
    if not pieces:
        return pa.array([""] * rows)
    if any(piece.null_count == 0 for piece in pieces):
        return pc.binary_join_element_wise(*pieces, ",", null_handling="skip")
    joined = pc.binary_join_element_wise("", *pieces, ",", null_handling="skip")
    return pc.utf8_slice_codeunits(joined, 1)


def _column_json(field: str, array: pa.Array) -> tuple[_JsonText, pa.Array] | None:
    """One column's values as JSON text (NULL for NULL), and the rows whose text is what
    `_column` and `dumps` make of them. None for a type converted value by value."""
    convert = _converter(field)
    kind = array.type
    odd: pa.Array | None = None
    json: _JsonText | None
    if pa.types.is_string(kind):
        if convert not in (_text, _json_value, _email, _phone):
            return None
        # Most columns hold no character to escape or refuse: one pass tells.
        unusual = _any_unusual(array)
        odd = _odd_texts(array, convert, controls=unusual)
        if convert is _phone:
            odd = pc.or_kleene(odd, pc.invert(possible_e164(array)))
        json = _quoted(array, escape=unusual)
    elif pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        raw = (_json_value, _boolean) if pa.types.is_boolean(kind) else (_json_value, _number)
        json = _json_or_quoted(pc.cast(array, pa.string()), convert, raw)
    elif pa.types.is_decimal(kind):
        texts = pc.cast(array, pa.string())
        odd = pc.match_substring(texts, "E")  # Arrow's exponent for values under 1e-6
        json = _json_or_quoted(texts, convert, (_json_value, _number))
    elif pa.types.is_timestamp(kind) and kind.unit != "ns" and kind.tz in _UTC:
        if convert not in (_text, _json_value):
            return None
        json, odd = _instants(array)
    elif pa.types.is_date32(kind):
        dates, outside = _within_years(array)
        odd = _rows(outside, len(array))
        json = _json_or_quoted(_date_texts(dates), convert, ())
    else:
        return None
    if json is None:
        return None
    if odd is None:
        return json, pa.repeat(True, len(array))
    return json, pc.or_(pc.is_null(array), pc.fill_null(pc.invert(odd), False))


def _any_unusual(texts: pa.StringArray) -> bool:
    """Whether a text holds a character that JSON escapes or we refuse: one scan of the
    column's bytes (a match per row cost several times as much). A NULL's bytes, if it has
    any, may count: that costs only the slower path."""
    _, offsets, data = texts.buffers()
    if data is None or not len(texts):
        return False
    first, last = (
        _OFFSET.unpack_from(offsets, _OFFSET.size * i)[0]
        for i in (texts.offset, texts.offset + len(texts))
    )
    return _UNUSUAL.search(memoryview(data)[first:last]) is not None


def _instants(array: pa.Array) -> tuple[_JsonText, pa.Array]:
    """UTC timestamps (or without a zone) as JSON, as `_json_value` writes their datetime:
    ISO 8601 with microseconds when there are any, and +00:00; and the rows Python writes
    otherwise or not at all (before 1970, where Arrow's division rounds the other way, and
    outside years 1-9999)."""
    stamps, outside = _within_years(array)
    per = _UNITS[array.type.unit][0]
    numbers = pc.cast(stamps, pa.int64())
    seconds = pc.divide(numbers, per)
    micros = pc.multiply(pc.subtract(numbers, pc.multiply(seconds, per)), 10**6 // per)
    whole = pc.strftime(pc.cast(seconds, pa.timestamp("s")), "%Y-%m-%dT%H:%M:%S")
    digits = pc.utf8_lpad(pc.cast(micros, pa.string()), 6, "0")
    fraction = pc.if_else(pc.equal(micros, 0), "", pc.binary_join_element_wise(".", digits, ""))
    text = pc.binary_join_element_wise(whole, fraction, "+00:00", "")
    odd = pc.or_(pc.fill_null(pc.less(numbers, 0), False), _rows(outside, len(array)))
    return _quoted(text, escape=False), odd


def _rows(indices: dict[int, str], length: int) -> pa.Array:
    """A mask of these rows (those `_within_years` found: seldom any)."""
    return pa.array([i in indices for i in range(length)]) if indices else pa.repeat(False, length)


def _json_or_quoted(
    texts: pa.Array, convert: Callable[[Any], Any], raw: tuple[Callable[[Any], Any], ...]
) -> _JsonText | None:
    """Texts as JSON: as they are for the converters in `raw` (numbers, booleans), quoted
    for a text field; None for any other converter (it takes the values one by one)."""
    if convert in raw:
        return _JsonText(texts)
    return _quoted(texts, escape=False) if convert in (_text, _json_value) else None


def _quoted(texts: pa.Array, *, escape: bool) -> _JsonText:
    """Text as JSON strings, as orjson writes them; `escape` when the text may hold a
    character JSON escapes (`_CONTROL` keeps out those it would write as \\u escapes)."""
    if escape:
        for raw, escaped in _JSON_ESCAPES:
            texts = pc.replace_substring(texts, raw, escaped)
    return _JsonText(texts, '"')


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
    if spec.backfill:
        attributes["backfill"] = True  # recorded without triggering flows (API.md §2.9)
    attributes.update(
        {f: values[f] for f in ("time", "value", "value_currency") if values.get(f) is not None}
    )
    return _profile_shape(profile_fields, clear=False), {"type": "event", "attributes": attributes}


def event_times(spec: SyncSpec, batch: pa.RecordBatch) -> list[datetime]:
    """The times of a batch's events, where the model maps one and it converts (a row whose
    time does not is rejected when it is sent): to see how old the events are."""
    at = next((i for i, f in enumerate(spec.fields) if f.field == "time"), None)
    if at is None:
        return []
    values, errors = _column("time", batch.column(field_column(at)))
    return [
        datetime.fromisoformat(value)
        for i, value in enumerate(values)
        if value is not None and i not in errors
    ]


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
    """The payload as JSON, in a bytes object of its own size. orjson hands back its
    working buffer, some 4 KB for a 400-byte profile (3.13), and a sync holds tens of
    thousands of bodies in flight: copied, they take a tenth of the memory."""
    return bytes(memoryview(orjson.dumps(payload)))


#: The yes-or-no column of each object that has one: true subscribes or suppresses, false
#: unsubscribes or unsuppresses.
_FLAG = {"subscription": "consent", "suppression": "suppressed"}


def withdraws(spec: SyncSpec, record: Record) -> bool:
    """Whether the row takes consent or a suppression back (its `consent` or `suppressed`
    column is false): an unsubscribe or an unsuppress, not a subscribe or a suppress."""
    flag = _FLAG.get(spec.object)
    return flag is not None and record.values.get(flag) is False


def flag_reject(spec: SyncSpec, record: Record) -> Reject | None:
    """A NULL `consent` or `suppressed` says neither yes nor no: the row is refused, and
    the model is to say which."""
    flag = _FLAG.get(spec.object)
    if flag is None or flag not in record.values or record.values[flag] is not None:
        return None
    column = next(f.column for f in spec.fields if f.field == flag)
    yes, no = ("subscribe", "unsubscribe") if flag == "consent" else ("suppress", "unsuppress")
    return Reject(
        record.key,
        record.fingerprint,
        record.in_snapshot,
        "invalid_value",
        f"{flag} is NULL: set it to true ({yes}) or false ({no}) for every row, or filter the "
        "row out of the model",
        column,
        flag,
    )


def consent_resource(
    channels: Iterable[str],
    consent: str,
    email: str | None,
    phone_number: str | None,
    consented_at: str | None = None,
) -> dict[str, Any] | None:
    """A profile of a subscribe ("SUBSCRIBED") or unsubscribe ("UNSUBSCRIBED") job, for
    the channels named that the identifiers given allow: email marketing with an email, SMS
    with a phone number (API.md §2.8). None when no channel is left."""
    parameters: dict[str, Any] = {"consent": consent}
    if consented_at is not None:
        parameters["consented_at"] = consented_at
    attributes: dict[str, Any] = {}
    subscriptions: dict[str, Any] = {}
    if "email_marketing" in channels and email:
        attributes["email"] = email
        subscriptions["email"] = {"marketing": parameters}
    sms = {c.removeprefix("sms_"): parameters for c in channels if c.startswith("sms_")}
    if sms and phone_number:
        attributes["phone_number"] = phone_number
        subscriptions["sms"] = sms
    if not subscriptions:
        return None
    return {"type": "profile", "attributes": {**attributes, "subscriptions": subscriptions}}
