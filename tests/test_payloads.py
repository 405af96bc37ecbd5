"""Rows to Klaviyo values: type conversion, E.164, emails, nulls, sizes."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa
import pytest

from dbt_klaviyo_sync.changeset import Record
from dbt_klaviyo_sync.identifiers import InvalidValue
from dbt_klaviyo_sync.payloads import (
    _converter,
    dumps,
    event_resources,
    profile_resource,
    records,
)
from dbt_klaviyo_sync.spec import FieldMap, SyncSpec

FIELDS = (
    FieldMap("id", "external_id"),
    FieldMap("email", "email"),
    FieldMap("phone", "phone_number"),
    FieldMap("first", "first_name"),
    FieldMap("city", "location.city"),
    FieldMap("lat", "location.latitude"),
    FieldMap("ltv", "properties.ltv"),
    FieldMap("vip", "properties.vip"),
    FieldMap("since", "properties.since"),
    FieldMap("seen", "properties.seen"),
    FieldMap("tags", "properties.tags"),
)


def spec(nulls: str = "skip", fields: tuple[FieldMap, ...] = FIELDS) -> SyncSpec:
    """A profile upsert of these fields, keyed by the first (an external id)."""
    return SyncSpec(
        model="customers",
        unique_id="model.x.customers",
        relation='"wh"."main"."customers"',
        object="profile",
        behavior="upsert",
        key_column=fields[0].column,
        key_field="external_id",
        fields=fields,
        nulls=nulls,
    )


def batch(*rows: dict[str, Any]) -> pa.RecordBatch:
    full = []
    for row in rows:
        values = {f"f{i}": row.get(f.column) for i, f in enumerate(FIELDS)}
        full.append(
            {
                "__change": row.get("__change", "add"),
                "__in_snapshot": False,
                "__klaviyo_id": None,
                "__key": row.get("id"),
                "__fingerprint": 7,
                **values,
            }
        )
    return pa.RecordBatch.from_pylist(full)


def as_sent(values: Any) -> Any:
    """Values as Klaviyo reads them from the JSON we send."""
    return orjson.loads(dumps(values))


GOOD = {
    "id": "C1",
    "email": "ada@example.com",
    "phone": "+1 (415) 555-0123",
    "first": "Ada",
    "city": "London",
    "lat": Decimal("51.5072"),
    "ltv": Decimal("1234.50"),
    "vip": True,
    "since": date(2024, 1, 31),
    "seen": datetime(2024, 2, 1, 12, 30),
    "tags": ["a", "b"],
}


def test_values_are_converted_to_json_types() -> None:
    [record], rejects = records(spec(), batch(GOOD))
    assert rejects == []
    assert as_sent(record.values) == {
        "external_id": "C1",
        "email": "ada@example.com",
        "phone_number": "+14155550123",
        "first_name": "Ada",
        "location.city": "London",
        "location.latitude": 51.5072,
        "properties.ltv": 1234.5,
        "properties.vip": True,
        "properties.since": "2024-01-31",
        "properties.seen": "2024-02-01T12:30:00+00:00",
        "properties.tags": ["a", "b"],
    }
    # Decimals go with exactly their digits.
    assert b'"location.latitude":51.5072,"properties.ltv":1234.50,' in dumps(record.values)


def test_aware_timestamps_keep_their_offset_and_decimals_become_numbers() -> None:
    row = {
        **GOOD,
        "seen": datetime(2024, 2, 1, 12, 30, tzinfo=UTC),
        "ltv": Decimal("12.00"),
    }
    [record], _ = records(spec(), batch(row))
    assert record.values["properties.seen"] == "2024-02-01T12:30:00+00:00"
    assert dumps(record.values["properties.ltv"]) == b"12.00"


def test_the_resource_nests_location_and_properties() -> None:
    [record], _ = records(spec(), batch(GOOD))
    resource = profile_resource(spec(), record)
    assert resource["type"] == "profile"
    assert as_sent(resource["attributes"]["location"]) == {"city": "London", "latitude": 51.5072}
    assert resource["attributes"]["properties"]["vip"] is True
    assert resource["attributes"]["external_id"] == "C1"
    assert "meta" not in resource


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("phone", "415 555 0123", "E.164"),
        ("phone", "+1415555012", "not a valid phone number"),
        ("phone", "+1 415 555 0123 ext. 12", "has an extension (12)"),
        ("phone", "+1 (415) 555-0123 x12", "has an extension (12)"),
        ("email", "ada@", "not a valid email"),
        ("ltv", float("nan"), "finite"),
        ("first", "x\x00y", "control characters"),
        ("first", "x" * (101 * 1024), "100 KB"),
    ],
)
def test_bad_values_are_rejected_with_column_and_reason(
    column: str, value: Any, reason: str
) -> None:
    neighbour = {**GOOD, column: 1.5} if isinstance(value, float) else GOOD  # one Arrow type
    good, rejects = records(spec(), batch({**GOOD, "id": "C2", column: value}, neighbour))
    assert [r.key for r in good] == ["C1"]
    [reject] = rejects
    assert (reject.key, reject.column, reject.code) == ("C2", column, "invalid_value")
    assert reason in reject.reason


def test_null_and_duplicate_keys_are_rejected_as_invalid_rows() -> None:
    good, rejects = records(
        spec(),
        batch({**GOOD, "id": None, "__change": "null_key"}, {**GOOD, "__change": "duplicate_key"}),
    )
    assert good == []
    assert [(r.code, r.invalid_row, r.column) for r in rejects] == [
        ("null_key", True, "id"),
        ("duplicate_key", True, "id"),
    ]


def with_nulls(nulls: str) -> dict[str, Any]:
    row = {**GOOD, "first": None, "city": None, "ltv": None}
    [record], _ = records(spec(nulls), batch(row))
    return profile_resource(spec(nulls), record)


def test_nulls_skip_leaves_klaviyo_values_alone() -> None:
    resource = with_nulls("skip")
    assert "first_name" not in resource["attributes"]
    assert as_sent(resource["attributes"]["location"]) == {"latitude": 51.5072}
    assert "ltv" not in resource["attributes"]["properties"]
    assert "meta" not in resource


def test_nulls_clear_sends_null_and_unsets_properties() -> None:
    resource = with_nulls("clear")
    assert resource["attributes"]["first_name"] is None
    assert resource["attributes"]["location"]["city"] is None
    assert "ltv" not in resource["attributes"]["properties"]
    assert resource["meta"] == {"patch_properties": {"unset": ["ltv"]}}


def test_numbers_for_text_attributes_are_sent_as_text() -> None:
    record = Record("7", 7, "add", False, None, {"external_id": "7", "first_name": None})
    assert profile_resource(spec(), record)["attributes"] == {"external_id": "7"}
    [converted], _ = records(spec(), batch({**GOOD, "id": "C3", "first": 42}))
    assert converted.values["first_name"] == "42"


EVENT_FIELDS = (
    FieldMap("order_id", "unique_id"),
    FieldMap("email", "email"),
    FieldMap("phone", "phone_number"),
    FieldMap("at", "time"),
    FieldMap("amount", "value"),
    FieldMap("sku", "properties.sku"),
)
EVENT_SPEC = SyncSpec(
    model="orders",
    unique_id="model.x.orders",
    relation='"wh"."main"."orders"',
    object="event",
    behavior="send",
    key_column="order_id",
    key_field="unique_id",
    fields=EVENT_FIELDS,
    metric="Placed Order",
)


def event_record(**values: Any) -> Record:
    base = {
        "unique_id": "O1",
        "email": "a@example.com",
        "phone_number": None,
        "time": "2024-01-01T00:00:00+00:00",
        "value": 9.5,
        "properties.sku": "S1",
    }
    return Record("O1", 7, "add", False, None, {**base, **values})


def test_an_event_carries_its_profile_metric_unique_id_and_properties() -> None:
    profile, event = event_resources(EVENT_SPEC, event_record())
    assert profile == {"type": "profile", "attributes": {"email": "a@example.com"}}
    assert event["attributes"] == {
        "properties": {"sku": "S1"},
        "metric": {"data": {"type": "metric", "attributes": {"name": "Placed Order"}}},
        "unique_id": "O1",
        "time": "2024-01-01T00:00:00+00:00",
        "value": 9.5,
    }


def test_an_event_with_only_a_phone_number_is_refused() -> None:
    with pytest.raises(InvalidValue, match="phone number alone"):
        event_resources(EVENT_SPEC, event_record(email=None, phone_number="+14155550123"))


def test_an_event_with_more_than_400_properties_is_refused() -> None:
    at_limit = {f"properties.p{i}": i for i in range(399)}  # with sku: 400
    assert (
        len(event_resources(EVENT_SPEC, event_record(**at_limit))[1]["attributes"]["properties"])
        == 400
    )
    with pytest.raises(InvalidValue, match="401 properties"):
        event_resources(EVENT_SPEC, event_record(**at_limit, **{"properties.p399": 1}))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (datetime(1989, 12, 31, tzinfo=UTC), "before 1990"),
        (datetime(2999, 1, 1, tzinfo=UTC), "more than a year ahead"),
        ("yesterday", "not an ISO 8601 time"),
    ],
)
def test_event_times_outside_klaviyos_window_are_refused(value: Any, reason: str) -> None:
    with pytest.raises(InvalidValue, match=reason):
        _converter("time")(value)


def test_a_date_becomes_midnight_utc_and_a_metric_name_must_be_short() -> None:
    assert _converter("time")(date(2024, 5, 1)) == "2024-05-01T00:00:00+00:00"
    with pytest.raises(InvalidValue, match="128"):
        _converter("metric")("m" * 128)


def test_a_serialized_body_takes_about_its_own_size_in_memory() -> None:
    """A sync holds tens of thousands of bodies while jobs are in flight; orjson's own
    result keeps a buffer of about 4 KB for a 400-byte profile, which took the client's
    peak memory at 10M rows past 500 MB."""
    import tracemalloc

    profile = {"type": "profile", "attributes": {"email": "a@example.com", "x": "y" * 380}}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        bodies = [dumps({**profile, "id": str(i)}) for i in range(1000)]
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    size = sum(len(body) for body in bodies)
    assert used < 2 * size, f"{used} bytes held for {size} bytes of JSON"


def test_a_journaled_item_keeps_only_what_sending_reads() -> None:
    from dbt_klaviyo_sync.klaviyo.events import PreparedEvent
    from dbt_klaviyo_sync.klaviyo.outcomes import Prepared

    values = {"external_id": "C1", "email": "a@example.com", "first_name": "Ann", "x": 1}
    record = Record("C1", 7, "add", False, None, {**values, "city": None})
    slim = Prepared(record, b"{}")
    slim.forget_values()
    assert slim.record.values == {"external_id": "C1", "email": "a@example.com", "city": None}
    assert slim.body == b"{}" and slim.record.fingerprint == 7
    event = PreparedEvent(record, b'{"e":1}', b'{"p":1}')
    event.forget_values()
    assert (
        isinstance(event, PreparedEvent)
        and event.journal_body() == PreparedEvent(record, b'{"e":1}', b'{"p":1}').journal_body()
    )


def test_every_date_of_years_1_to_9999_is_written_as_strftime_writes_it() -> None:
    """Dates are written with Arrow's cast, twenty times faster than strftime: an Arrow
    upgrade that wrote any day differently would change what Klaviyo receives, and what
    a plan compares with the values it last accepted. Every day, checked."""
    import pyarrow.compute as pc

    from dbt_klaviyo_sync.payloads import _date_texts

    first, last = date(1, 1, 1).toordinal(), date(9999, 12, 31).toordinal()
    epoch = date(1970, 1, 1).toordinal()
    days = pa.array(range(first - epoch, last - epoch + 1), pa.int32()).cast(pa.date32())
    assert _date_texts(days).equals(pc.strftime(days, "%Y-%m-%d"))
    assert _date_texts(days[:1]).to_pylist() == ["0001-01-01"]
