"""Every DuckDB type, mapped to a text field, a number field and a custom property, through
the real diff and conversion: each value arrives exactly, or is rejected with a reason.

A case is a DuckDB type and a few of its values; for each field kind the expectation per
value is the exact JSON that would be sent, or `!` and a part of the reject's reason.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import duckdb
import orjson
import pytest

from dbt_klaviyo_sync import payloads
from dbt_klaviyo_sync.emulator import Emulator
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient
from dbt_klaviyo_sync.spec import FieldMap, SyncSpec
from dbt_klaviyo_sync.warehouse.duckdb import diff
from dbt_klaviyo_sync.warehouse.duckdb.state import State, open_state
from tests.conftest import PRIVATE_KEY, PUBLIC_KEY

NESTED = "!nested value cannot be sent as a text attribute"
NOT_A_NUMBER = "!is not a number"
BINARY = "!binary data (BLOB or BIT) is not a number"
FINITE = "!not a number JSON can carry"
BEYOND_64_BITS = "!beyond the 64-bit integers"
INTERVAL = "!cast it in the model to a number of seconds"
NOT_UTF8 = "!not UTF-8"
YEARS = "; Klaviyo takes ISO 8601 dates in years 1-9999"


@dataclass(frozen=True)
class Case:
    """A DuckDB type, SQL expressions of some of its values, and per field kind what
    each value becomes: the JSON sent, or `!` and part of the reject reason."""

    name: str
    duckdb_type: str
    values: tuple[str, ...]
    text: tuple[str, ...]
    number: tuple[str, ...]
    property: tuple[str, ...]


CASES = [
    Case("boolean", "BOOLEAN", ("true", "false"), ('"true"', '"false"'),
         (NOT_A_NUMBER, NOT_A_NUMBER), ("true", "false")),
    Case("tinyint", "TINYINT", ("-128",), ('"-128"',), ("-128",), ("-128",)),
    Case("smallint", "SMALLINT", ("32767",), ('"32767"',), ("32767",), ("32767",)),
    Case("integer", "INTEGER", ("-2147483648",), ('"-2147483648"',), ("-2147483648",),
         ("-2147483648",)),
    Case("bigint", "BIGINT", ("-9223372036854775808",), ('"-9223372036854775808"',),
         ("-9223372036854775808",), ("-9223372036854775808",)),
    Case("utinyint", "UTINYINT", ("255",), ('"255"',), ("255",), ("255",)),
    Case("usmallint", "USMALLINT", ("65535",), ('"65535"',), ("65535",), ("65535",)),
    Case("uinteger", "UINTEGER", ("4294967295",), ('"4294967295"',), ("4294967295",),
         ("4294967295",)),
    Case("ubigint", "UBIGINT", ("18446744073709551615",), ('"18446744073709551615"',),
         ("18446744073709551615",), ("18446744073709551615",)),
    Case("hugeint", "HUGEINT",
         ("123", "18446744073709551615", "-170141183460469231731687303715884105728"),
         ('"123"', '"18446744073709551615"', '"-170141183460469231731687303715884105728"'),
         ("123", "18446744073709551615", BEYOND_64_BITS),
         ("123", "18446744073709551615", BEYOND_64_BITS)),
    Case("uhugeint", "UHUGEINT", ("7", "340282366920938463463374607431768211455"),
         ('"7"', '"340282366920938463463374607431768211455"'),
         ("7", BEYOND_64_BITS), ("7", BEYOND_64_BITS)),
    Case("varint", "VARINT", ("-42", "'123456789012345678901234567890'"),
         ('"-42"', '"123456789012345678901234567890"'),
         ("-42", BEYOND_64_BITS), ("-42", BEYOND_64_BITS)),
    Case("float", "FLOAT", ("1.1", "16777216", "'nan'"), ('"1.1"', '"16777216.0"', FINITE),
         ("1.1", "16777216.0", FINITE), ("1.1", "16777216.0", FINITE)),
    Case("double", "DOUBLE", ("123.0", "0.1", "1e20", "'nan'", "'-inf'"),
         ('"123.0"', '"0.1"', '"1e+20"', FINITE, FINITE),
         ("123.0", "0.1", "1e+20", FINITE, FINITE), ("123.0", "0.1", "1e+20", FINITE, FINITE)),
    Case("decimal_10_2", "DECIMAL(10,2)", ("12.50", "-0.05", "0"),
         ('"12.50"', '"-0.05"', '"0.00"'), ("12.50", "-0.05", "0.00"),
         ("12.50", "-0.05", "0.00")),
    Case("decimal_4_0", "DECIMAL(4,0)", ("15",), ('"15"',), ("15",), ("15",)),
    Case("decimal_18_6", "DECIMAL(18,6)", ("123456789012.123456",),
         ('"123456789012.123456"',), ("123456789012.123456",), ("123456789012.123456",)),
    Case("decimal_38_10", "DECIMAL(38,10)",
         ("0.0000001", "1234567890123456789012345678.0123456789"),
         ('"0.0000001000"', '"1234567890123456789012345678.0123456789"'),
         ("0.0000001000", "1234567890123456789012345678.0123456789"),
         ("0.0000001000", "1234567890123456789012345678.0123456789")),
    Case("varchar", "VARCHAR", ("'Ada'", "'12.5'"), ('"Ada"', '"12.5"'),
         (NOT_A_NUMBER, "12.5"), ('"Ada"', '"12.5"')),
    Case("blob", "BLOB", ("'Ace'", r"'\xFF'"), ('"Ace"', NOT_UTF8), (BINARY, BINARY),
         ('"Ace"', NOT_UTF8)),
    Case("date", "DATE",
         ("'2024-01-31'", "'0001-01-01'", "'infinity'", "'-infinity'", "'10000-01-01'"),
         ('"2024-01-31"', '"0001-01-01"', "!the date is infinity" + YEARS,
          "!the date is -infinity" + YEARS, "!the date is beyond year 9999" + YEARS),
         (NOT_A_NUMBER, NOT_A_NUMBER, "!infinity", "!-infinity", "!beyond year 9999"),
         ('"2024-01-31"', '"0001-01-01"', "!infinity" + YEARS, "!-infinity" + YEARS,
          "!beyond year 9999" + YEARS)),
    Case("time", "TIME", ("'12:30:00'", "'12:30:00.123456'", "'24:00:00'"),
         ('"12:30:00"', '"12:30:00.123456"', '"24:00:00"'),
         (NOT_A_NUMBER, NOT_A_NUMBER, NOT_A_NUMBER),
         ('"12:30:00"', '"12:30:00.123456"', '"24:00:00"')),
    Case("timetz", "TIMETZ", ("'12:30:00+05:30'", "'12:30:00.5-01'"),
         ('"12:30:00+05:30"', '"12:30:00.5-01"'), (NOT_A_NUMBER, NOT_A_NUMBER),
         ('"12:30:00+05:30"', '"12:30:00.5-01"')),
    Case("timestamp", "TIMESTAMP",
         ("'2024-02-01 12:30:00'", "'2024-02-01 12:30:00.5'", "'infinity'",
          "'10000-01-01 00:00:00'"),
         ('"2024-02-01T12:30:00+00:00"', '"2024-02-01T12:30:00.500000+00:00"',
          "!the timestamp is infinity" + YEARS, "!the timestamp is beyond year 9999" + YEARS),
         (NOT_A_NUMBER, NOT_A_NUMBER, "!infinity", "!beyond year 9999"),
         ('"2024-02-01T12:30:00+00:00"', '"2024-02-01T12:30:00.500000+00:00"',
          "!infinity" + YEARS, "!beyond year 9999" + YEARS)),
    Case("timestamp_s", "TIMESTAMP_S", ("'2024-02-01 12:30:00'", "'20000-01-01'"),
         ('"2024-02-01T12:30:00+00:00"', "!beyond year 9999"),
         (NOT_A_NUMBER, "!beyond year 9999"),
         ('"2024-02-01T12:30:00+00:00"', "!beyond year 9999")),
    Case("timestamp_ms", "TIMESTAMP_MS", ("'2024-02-01 12:30:00.123'", "'-infinity'"),
         ('"2024-02-01T12:30:00.123000+00:00"', "!the timestamp is -infinity"),
         (NOT_A_NUMBER, "!-infinity"),
         ('"2024-02-01T12:30:00.123000+00:00"', "!-infinity")),
    Case("timestamp_ns", "TIMESTAMP_NS",
         ("'2024-02-01 12:30:00.123456789'", "'2024-02-01 12:30:00'", "'infinity'"),
         ('"2024-02-01T12:30:00.123456789+00:00"', '"2024-02-01T12:30:00+00:00"',
          "!the timestamp is infinity"),
         (NOT_A_NUMBER, NOT_A_NUMBER, "!infinity"),
         ('"2024-02-01T12:30:00.123456789+00:00"', '"2024-02-01T12:30:00+00:00"',
          "!infinity")),
    Case("timestamptz", "TIMESTAMPTZ", ("'2024-02-01 12:30:00+02'",),
         ('"2024-02-01T10:30:00+00:00"',), (NOT_A_NUMBER,), ('"2024-02-01T10:30:00+00:00"',)),
    Case("interval", "INTERVAL", ("INTERVAL 3 DAY",), (INTERVAL,), (INTERVAL,), (INTERVAL,)),
    Case("uuid", "UUID", ("'7ef4da5d-a761-4f80-8ead-a5fc58ff369f'",),
         ('"7ef4da5d-a761-4f80-8ead-a5fc58ff369f"',), (NOT_A_NUMBER,),
         ('"7ef4da5d-a761-4f80-8ead-a5fc58ff369f"',)),
    Case("json", "JSON",
         ("""'{"a": [1, 2.50, "x"]}'""", "'12.50'", """'"x"'""",
          "'123456789012345678901234567890'", """'{"a": NaN}'"""),
         (r'"{\"a\": [1, 2.50, \"x\"]}"', '"12.50"', r'"\"x\""',
          '"123456789012345678901234567890"', r'"{\"a\": NaN}"'),
         (NOT_A_NUMBER, "12.50", NOT_A_NUMBER, BEYOND_64_BITS, NOT_A_NUMBER),
         ('{"a":[1,2.50,"x"]}', "12.50", '"x"', BEYOND_64_BITS, FINITE)),
    Case("enum", "ENUM('a', 'b')", ("'b'",), ('"b"',), (NOT_A_NUMBER,), ('"b"',)),
    Case("list", "INTEGER[]", ("[1, 2]", "[]"), (NESTED, NESTED),
         (NOT_A_NUMBER, NOT_A_NUMBER), ("[1,2]", "[]")),
    Case("decimal_list", "DECIMAL(10,2)[]", ("[12.50, NULL]",), (NESTED,), (NOT_A_NUMBER,),
         ("[12.50,null]",)),
    Case("date_list", "DATE[]", ("['2024-01-31']", "['infinity']"), (NESTED, NESTED),
         (NOT_A_NUMBER, "!infinite"), ('["2024-01-31"]', "!infinite" + YEARS)),
    Case("struct", "STRUCT(a INTEGER, b VARCHAR)", ("{'a': 1, 'b': 'x'}",), (NESTED,),
         (NOT_A_NUMBER,), ('{"a":1,"b":"x"}',)),
    Case("struct_of_awkward_types", "STRUCT(n UHUGEINT, t TIMESTAMP_NS, z TIMETZ)",
         ("{'n': 5, 't': '2024-02-01 12:30:00.123456789', 'z': '12:30:00+05:30'}",),
         (NESTED,), (NOT_A_NUMBER,),
         ('{"n":5,"t":"2024-02-01 12:30:00.123456789","z":"12:30:00+05:30"}',)),
    Case("map", "MAP(VARCHAR, INTEGER)", ("MAP {'k': 1}", "MAP {}"), (NESTED, NESTED),
         (NOT_A_NUMBER, NOT_A_NUMBER), ('{"k":1}', "{}")),
    Case("array", "INTEGER[2]", ("[1, 2]",), (NESTED,), (NOT_A_NUMBER,), ("[1,2]",)),
    Case("union", "UNION(num INTEGER, str VARCHAR)",
         ("union_value(num := 2)", "union_value(str := 'x')"), ('"2"', '"x"'),
         ("2", NOT_A_NUMBER), ("2", '"x"')),
    Case("bit", "BIT", ("'0101'",), ('"0101"',), (BINARY,), ('"0101"',)),
]  # fmt: skip

#: Tables of other tests: random doubles, and one row of values to send to the emulator.
DOUBLES = Case("doubles", "DOUBLE", (), (), (), ())
WIRE = Case("wire", "", (), (), (), ())

#: The Klaviyo field each kind of expectation is checked with.
KINDS = {"text": "first_name", "number": "location.latitude", "property": "properties.x"}


def table(case: Case) -> str:
    return f"t_{case.name}"


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[State]:
    """An in-memory state over a warehouse with a table per case: `id` K0, K1, ... and
    `v`, the case's values."""
    warehouse = tmp_path_factory.mktemp("types") / "wh.duckdb"
    with duckdb.connect(str(warehouse)) as con:
        for case in CASES:
            rows = ", ".join(
                f"('K{i}', CAST({value} AS {case.duckdb_type}))"
                for i, value in enumerate(case.values)
            )
            con.execute(f"CREATE TABLE {table(case)} AS SELECT * FROM (VALUES {rows}) t(id, v)")
        random.seed(7)
        doubles = [struct.unpack("d", random.randbytes(8))[0] for _ in range(3000)]
        doubles += [random.uniform(-1e6, 1e6) for _ in range(1000)]
        doubles += [0.0, -0.0, 1e15, 1e16, 1e-4, 1e-5, 2.0**53, 5e-324, 1.7976931348623157e308]
        finite = [d for d in doubles if math.isfinite(d)]
        con.execute(
            f"CREATE TABLE {table(DOUBLES)} AS SELECT 'K' || i AS id, v "
            "FROM (SELECT unnest($1::DOUBLE[]) AS v, generate_subscripts($1::DOUBLE[], 1) AS i)",
            [finite],
        )
        con.execute(
            f"""CREATE TABLE {table(WIRE)} AS SELECT 'W1' AS id,
                51.5072::DECIMAL(38,10) AS lat, 0.0000001::DECIMAL(38,10) AS small,
                18446744073709551615::UBIGINT AS big, '{{"a": [1, 2.50, "x"]}}'::JSON AS js,
                '2024-02-01 12:30:00.123456789'::TIMESTAMP_NS AS at"""
        )
    with open_state(None, {"wh": warehouse}) as opened:
        opened.con.execute("SET TimeZone = 'UTC'")
        yield opened


def spec(relation: str, fields: tuple[FieldMap, ...], **kind: Any) -> SyncSpec:
    """A profile upsert of `fields` (the sync key first), unless `kind` says otherwise."""
    kind = {"object": "profile", "behavior": "upsert", "key_field": "external_id", **kind}
    return SyncSpec(
        model="types",
        unique_id="model.x.types",
        relation=relation,
        key_column=fields[0].column,
        fields=fields,
        **kind,
    )


def in_warehouse(case: Case) -> str:
    return f'"wh"."main"."{table(case)}"'


def outcomes(state: State, sync: SyncSpec, sid: str) -> dict[str, str]:
    """What becomes of each row, by key: the JSON sent for the last mapped field, or `!`
    and the reason it is rejected. The conversion of the whole batch must not fail."""
    diff.compute(state.con, sync, sid)
    found: dict[str, str] = {}
    for batch in diff.batches(state.con, ("add", "update")):
        records, rejects = payloads.records(sync, batch)
        field = sync.fields[-1].field
        found |= {r.key: payloads.dumps(r.values[field]).decode() for r in records}
        found |= {j.key: f"!{j.reason}" for j in rejects if j.key is not None}
        assert all(j.column == sync.fields[-1].column for j in rejects), rejects
    return found


def matches(found: str, expected: str) -> bool:
    return expected[1:] in found if expected.startswith("!") else found == expected


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_value_arrives_exactly_or_is_rejected_with_a_reason(
    state: State, case: Case, kind: str
) -> None:
    fields = (FieldMap("id", "external_id"), FieldMap("v", KINDS[kind]))
    found = outcomes(state, spec(in_warehouse(case), fields), f"{case.name}-{kind}")
    expected: tuple[str, ...] = getattr(case, kind)
    assert len(expected) == len(case.values)
    wrong = {
        f"K{i}": (found.get(f"K{i}"), want)
        for i, want in enumerate(expected)
        if not matches(found.get(f"K{i}", "(missing)"), want)
    }
    assert not wrong, wrong


KEYED = ["hugeint", "uhugeint", "varint", "float", "double", "decimal_10_2", "decimal_38_10"]


@pytest.mark.parametrize("case", [c for c in CASES if c.name in KEYED], ids=lambda c: c.name)
def test_a_numeric_sync_key_is_sent_as_the_text_the_state_keeps(state: State, case: Case) -> None:
    """The key's text is DuckDB's VARCHAR cast of the value, in the state and in Klaviyo."""
    keyed = spec(in_warehouse(case), (FieldMap("v", "external_id"),))
    found = outcomes(state, keyed, f"{case.name}-key")
    for text in case.text:
        if not text.startswith("!"):
            assert found[orjson.loads(text)] == text


def test_doubles_sent_as_text_are_duckdbs_own_text_of_them(state: State) -> None:
    """Python's shortest repr of a double is DuckDB's VARCHAR cast of it, so a DOUBLE sent
    to a text field reads as it does in DuckDB, and as its sync key does in the state."""
    fields = (FieldMap("id", "external_id"), FieldMap("v", "first_name"))
    found = outcomes(state, spec(in_warehouse(DOUBLES), fields), "doubles")
    sql = f"SELECT id, CAST(v AS VARCHAR) FROM {in_warehouse(DOUBLES)}"
    duckdb_text = dict(state.con.execute(sql).fetchall())
    assert len(found) == len(duckdb_text) > 1000
    assert {key: orjson.loads(text) for key, text in found.items()} == duckdb_text


def test_klaviyo_takes_exact_numbers_nested_json_and_nanoseconds(state: State) -> None:
    """The emulator, which parses bodies as Klaviyo does, accepts the exact digits and
    keeps 64-bit integers exactly (larger ones would become floats: they are rejected)."""
    fields = (
        FieldMap("id", "external_id"),
        FieldMap("lat", "location.latitude"),
        FieldMap("small", "properties.small"),
        FieldMap("big", "properties.big"),
        FieldMap("js", "properties.js"),
        FieldMap("at", "properties.at"),
    )
    sync = spec(in_warehouse(WIRE), fields)
    diff.compute(state.con, sync, "wire")
    [batch] = diff.batches(state.con, ("add",))
    [record], rejects = payloads.records(sync, batch)
    assert rejects == []
    body = payloads.dumps({"data": payloads.profile_resource(sync, record)})
    assert b'"small":0.0000001000' in body and b'"latitude":51.5072000000' in body
    with Emulator(private_key=PRIVATE_KEY, public_key=PUBLIC_KEY) as emulator:
        client = KlaviyoClient(emulator.url, PRIVATE_KEY, PUBLIC_KEY)
        client.call("create_or_update_profile", body=body)
        [profile] = emulator.profiles()
        assert emulator.stats()["spec_violations"] == 0
    attributes = profile["attributes"]
    assert attributes["location"]["latitude"] == 51.5072
    assert attributes["properties"] == {
        "small": 1e-7,
        "big": 18446744073709551615,
        "js": {"a": [1, 2.5, "x"]},
        "at": "2024-02-01T12:30:00.123456789+00:00",
    }


@pytest.mark.parametrize(
    ("duckdb_type", "value", "expected"),
    [
        (
            "TIMESTAMP_NS",
            "'2024-02-01 12:30:00.123456789'",
            '"2024-02-01T12:30:00.123456789+00:00"',
        ),
        ("TIMESTAMP_NS", "'1989-12-31 23:59:59.999999999'", "!before 1990"),
        ("TIMESTAMP", "'infinity'", "!the timestamp is infinity" + YEARS),
        ("DATE", "'-infinity'", "!the date is -infinity" + YEARS),
        ("DATE", "'2024-02-01'", '"2024-02-01T00:00:00+00:00"'),
        ("TIME", "'12:30:00'", "!is not an ISO 8601 time"),
        ("DATE[]", "['infinity']", "!infinite" + YEARS),
    ],
)
def test_event_times_keep_nanoseconds_and_reject_what_is_not_a_time(
    state: State, duckdb_type: str, value: str, expected: str
) -> None:
    state.con.execute(
        "CREATE OR REPLACE TEMP TABLE event_time AS "
        f"SELECT 'E1' AS id, CAST({value} AS {duckdb_type}) AS at"
    )
    fields = (FieldMap("id", "unique_id"), FieldMap("at", "time"))
    event = {"object": "event", "behavior": "send", "key_field": "unique_id", "metric": "M"}
    sync = spec("event_time", fields, **event)
    [(key, found)] = outcomes(state, sync, "event_time").items()
    assert key == "E1" and matches(found, expected), found
