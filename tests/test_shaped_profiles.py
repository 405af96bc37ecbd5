"""Profiles shaped a column at a time in Arrow (`payloads.shaped_rows`) are byte for byte
what the value-by-value path makes of the same rows, and take no row it would reject."""

from __future__ import annotations

import random
from datetime import date
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from dbt_klaviyo_sync import payloads
from dbt_klaviyo_sync.changeset import SEND_TIME_FIELDS, Record
from dbt_klaviyo_sync.klaviyo.outcomes import Prepared
from dbt_klaviyo_sync.klaviyo.profiles import prepare
from dbt_klaviyo_sync.payloads import records, shaped_records, shaped_rows
from dbt_klaviyo_sync.spec import FieldMap, SyncSpec
from tests.test_payloads import spec

#: Each column: its Klaviyo field and the Arrow type it arrives in.
COLUMNS: list[tuple[str, pa.DataType]] = [
    ("external_id", pa.string()),
    ("email", pa.string()),
    ("phone_number", pa.string()),
    ("first_name", pa.string()),
    ("organization", pa.dictionary(pa.int8(), pa.string())),  # an ENUM
    ("title", pa.int64()),  # a number sent as text
    ("location.city", pa.large_string()),
    ("location.zip", pa.bool_()),  # a boolean sent as text
    ("location.latitude", pa.decimal128(9, 6)),  # a number field
    ("location.longitude", pa.float64()),  # floats go value by value
    ("properties.ltv", pa.decimal128(38, 10)),
    ("properties.vip", pa.bool_()),
    ("properties.orders", pa.uint64()),
    ("properties.small", pa.int8()),
    ("properties.since", pa.date32()),
    ("properties.note", pa.string()),
    ("properties.seen", pa.timestamp("us")),
    ("properties.at", pa.timestamp("ms", tz="UTC")),
    ("properties.local", pa.timestamp("us", tz="Europe/Berlin")),  # goes value by value
    ("properties.exact", pa.timestamp("ns")),  # goes value by value
    ("klaviyo_id", pa.string()),
]

TEXTS = [
    "Ada",
    'say "hi"',
    "back\\slash",
    "tab\there",
    "line\nbreak\r\n",
    "bell\x07",  # a control character: rejected
    "del\x7f",
    "naïve — 日本 😀",
    "\u2028separator",
    "/slash/",
    "",
    " padded ",
    "x" * (100 * 1024 + 1),  # over Klaviyo's limit for a string
]
EMAILS = [
    "ada@example.com",
    "ADA.Lovelace+tag@Example.CO.UK",
    " spaced@example.com ",
    "no-at-sign",
    "a@b",
    "dots..twice@example.com",
    "x@example.test",
    "ünï@example.com",
    '"quoted"@example.com',
]
PHONES = [
    "+14155550123",
    "+442071838750",
    "+358401234567",
    "+3904123456789",  # a leading zero after the country code: the full parser decides
    "+1415555012",  # too short for its country
    "+999123456789",  # no such country code
    "+1 (415) 555-0123",
    "4155550123",
    "+12",
    "+123456789012345678",
    "+861234567890",
]


#: Values every check clears, of each kind above.
CLEAN = {
    "text": [t for t in TEXTS if "\x07" not in t and "\x7f" not in t and len(t) < 1000],
    "email": EMAILS[:2],
    "phone_number": PHONES[:3],
}


def _value(field: str, kind: pa.DataType, rng: random.Random, clean: bool = False) -> Any:
    if rng.random() < 0.15:
        return None
    if clean and _by_value(kind):
        return None
    if pa.types.is_dictionary(kind):
        return rng.choice(["Acme", 'Quote "Co"', "Tab\tCo"])
    if field in ("email", "phone_number"):
        return rng.choice(CLEAN[field] if clean else EMAILS if field == "email" else PHONES)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        if rng.random() < 0.5:
            return f"v{rng.randrange(10**6)}"
        return rng.choice(CLEAN["text"] if clean else TEXTS)
    if pa.types.is_boolean(kind):
        return rng.random() < 0.5
    if pa.types.is_integer(kind):
        bits = kind.bit_width
        low, high = (
            (0, 2**bits - 1)
            if pa.types.is_unsigned_integer(kind)
            else (
                -(2 ** (bits - 1)),
                2 ** (bits - 1) - 1,
            )
        )
        return rng.choice([low, high, 0, rng.randint(low, high)])
    if pa.types.is_decimal(kind) and clean:  # Arrow writes those under 1e-6 with an exponent
        return Decimal(rng.randrange(1, 10**5)).scaleb(-2)
    if pa.types.is_decimal(kind):
        digits = rng.randrange(1, kind.precision + 1)
        number = Decimal(rng.randrange(10**digits)).scaleb(-kind.scale)
        return -number if rng.random() < 0.3 else number
    if pa.types.is_floating(kind):
        return rng.choice([1.0, 0.1, 1e16, -0.0, 2.5e-5, rng.random() * 10 ** rng.randrange(20)])
    if pa.types.is_date32(kind):  # years 1 to 9999 (see _batch for one beyond)
        return date.fromordinal(rng.choice([1, 3652059, rng.randrange(1, 3652059)]))
    if pa.types.is_timestamp(kind):  # from 1938 to beyond 9999, or 2001 to 2033 when clean
        micros = rng.randrange(10**15 if clean else -(10**15), 2 * 10**15 if clean else 3 * 10**17)
        if kind.unit == "ns":
            return min(micros, 9 * 10**15) * 1000  # within 64 bits
        return micros // {"s": 10**6, "ms": 1000, "us": 1}[kind.unit]
    raise AssertionError(kind)


def _by_value(kind: pa.DataType) -> bool:
    """Whether values of this type always go value by value."""
    zoned = pa.types.is_timestamp(kind) and (kind.unit == "ns" or kind.tz not in (None, "UTC"))
    return pa.types.is_floating(kind) or pa.types.is_large_string(kind) or zoned


#: The columns of types shaped in Arrow.
SHAPED = [(f, k) for f, k in COLUMNS if not _by_value(k)]


def _batch(rows: int, seed: int, fields: list[tuple[str, pa.DataType]] = COLUMNS) -> pa.RecordBatch:
    rng = random.Random(seed)
    columns: dict[str, pa.Array] = {
        "__change": pa.array(
            rng.choice(["add", "add", "update", "duplicate_key"]) for _ in range(rows)
        ),
        "__in_snapshot": pa.array(rng.random() < 0.5 for _ in range(rows)),
        "__klaviyo_id": pa.array(rng.choice([None, "01KNOWN"]) for _ in range(rows)),
        "__key": pa.array(f"K{i}" for i in range(rows)),
        "__fingerprint": pa.array(range(rows), pa.uint64()),
    }
    # Half the rows have one column of any value, the others only values every check clears:
    # so that each check is seen alone.
    dirty = [rng.randrange(len(fields)) if rng.random() < 0.5 else -1 for _ in range(rows)]
    for i, (field, kind) in enumerate(fields):
        values = [_value(field, kind, rng, dirty[j] != i) for j in range(rows)]
        if i == 0:
            values = [f"K{j}" for j in range(rows)]
        columns[f"f{i}"] = pa.array(values, kind)
    # Dates beyond year 9999, as DuckDB can hand over.
    since = next(j for j, (f, _) in enumerate(fields) if f == "properties.since")
    days = columns[f"f{since}"].cast(pa.int32()).to_pylist()
    for j in range(rows):
        if dirty[j] == since and j % 2:
            days[j] = 2_932_897 + j
    columns[f"f{since}"] = pa.array(days, pa.int32()).cast(pa.date32())
    return pa.RecordBatch.from_pydict(columns)


def shaped_profiles(
    spec: SyncSpec, batch: pa.RecordBatch
) -> tuple[list[Record], list[bytes], pa.RecordBatch]:
    """The rows `shaped_rows` takes, as records and bodies, and the others."""
    shaped, rest = shaped_rows(spec, batch)
    return (*shaped_records(shaped), rest)


def _spec(nulls: str, fields: list[tuple[str, pa.DataType]] = COLUMNS) -> SyncSpec:
    return spec(nulls, tuple(FieldMap(f"c{i}", field) for i, (field, _) in enumerate(fields)))


@pytest.mark.parametrize("nulls", ["skip", "clear"])
@pytest.mark.parametrize("seed", range(4))
def test_shaped_rows_are_what_the_value_by_value_path_sends(nulls: str, seed: int) -> None:
    # Under `nulls: clear` a row with a NULL goes value by value, and so would every row
    # with a float or a timestamp: those columns are left out there.
    fields = COLUMNS if nulls == "skip" else SHAPED
    spec, batch = _spec(nulls, fields), _batch(1500, seed, fields)
    shaped, bodies, rest = shaped_profiles(spec, batch)
    good, bad = records(spec, batch)
    ready, too_large = prepare(spec, good)
    expected = {p.record.key: p for p in ready}
    refused = {r.key for r in [*bad, *too_large]}
    assert len(shaped) + rest.num_rows == batch.num_rows
    assert len(shaped) > batch.num_rows // (5 if nulls == "skip" else 100)  # enough to tell
    assert set(rest.column("__key").to_pylist()).isdisjoint(r.key for r in shaped)
    for record, body in zip(shaped, bodies, strict=True):
        assert record.key not in refused
        want = expected[record.key]
        assert body == want.body, record.key
        assert record.json() == want.record.json(), record.key
        assert (record.change, record.fingerprint, record.in_snapshot, record.klaviyo_id) == (
            want.record.change,
            want.record.fingerprint,
            want.record.in_snapshot,
            want.record.klaviyo_id,
        )
        for field, value in record.values.items():
            assert want.record.values[field] == value
    # The rest goes the value-by-value way and gets the same answer as before.
    rest_good, rest_bad = records(spec, rest)
    assert {r.key for r in rest_good} | {r.key for r in shaped} == {r.key for r in good}
    assert {(r.key, r.reason) for r in rest_bad} == {(r.key, r.reason) for r in bad}


def test_clean_rows_are_all_shaped_in_arrow() -> None:
    """Rows of values every check clears never take the value-by-value path (else the test
    above could pass with nothing shaped)."""
    spec, rows, rng = _spec("skip", SHAPED), 300, random.Random(7)
    columns = {
        "__change": pa.array(["add", "update"] * (rows // 2)),
        "__in_snapshot": pa.array([False] * rows),
        "__klaviyo_id": pa.nulls(rows, pa.string()),
        "__key": pa.array(f"K{i}" for i in range(rows)),
        "__fingerprint": pa.array(range(rows), pa.uint64()),
        "f0": pa.array(f"K{i}" for i in range(rows)),
    }
    for i, (field, kind) in enumerate(SHAPED[1:], start=1):
        columns[f"f{i}"] = pa.array(
            [_value(field, kind, rng, clean=True) for _ in range(rows)], kind
        )
    shaped, _, rest = shaped_profiles(spec, pa.RecordBatch.from_pydict(columns))
    assert (len(shaped), rest.num_rows) == (rows, 0)


def test_a_profile_over_klaviyos_limit_goes_value_by_value() -> None:
    """Each string is within Klaviyo's limit, the profile is not: `prepare` rejects it."""
    fields = [
        ("external_id", pa.string()),
        ("properties.a", pa.string()),
        ("properties.b", pa.string()),
    ]
    batch = pa.RecordBatch.from_pydict(
        {
            "__change": pa.array(["add", "add"]),
            "__in_snapshot": pa.array([False, False]),
            "__klaviyo_id": pa.nulls(2, pa.string()),
            "__key": pa.array(["K0", "K1"]),
            "__fingerprint": pa.array([0, 1], pa.uint64()),
            "f0": pa.array(["K0", "K1"]),
            "f1": pa.array(["a" * 60_000, "a"]),
            "f2": pa.array(["b" * 60_000, "b"]),
        }
    )
    shaped, _, rest = shaped_profiles(_spec("skip", fields), batch)
    assert [r.key for r in shaped] == ["K1"]
    assert rest.column("__key").to_pylist() == ["K0"]
    good, _ = records(_spec("skip", fields), rest)
    assert [r.code for r in prepare(_spec("skip", fields), good)[1]] == ["too_large"]


@pytest.mark.parametrize("keep_json", [True, False])
def test_a_journaled_record_drops_its_values_json_unless_kept(keep_json: bool) -> None:
    """Once journaled, a record keeps its values' JSON only where the warehouse's commit
    wants it (DuckDB); elsewhere it would only hold memory while in flight."""
    spec, batch = _spec("skip", SHAPED), _batch(100, 0, SHAPED)
    shaped, bodies, _ = shaped_profiles(spec, batch)
    item = Prepared(shaped[0], bodies[0])
    text = item.record.values_json
    item.forget_values(keep_json=keep_json)
    assert item.record.values_json == (text if keep_json else None)
    assert set(item.record.values) <= SEND_TIME_FIELDS


@pytest.mark.parametrize(
    "pieces",
    [
        [["a", None, None], [None, "b", None]],  # a row of NULLs only
        [["a", None, "c"]],  # one piece, with a NULL
        [["a", "b", "c"], [None, "y", None]],  # a piece without NULLs
        [["a", "b", "c"]],
    ],
)
def test_joined_keeps_every_row_whatever_its_nulls(pieces: list[list[str | None]]) -> None:
    """Arrow's join drops a row whose pieces are all NULL; `_joined` never does."""
    arrays = [pa.array(piece, pa.string()) for piece in pieces]
    expected = [",".join(p for p in row if p is not None) for row in zip(*pieces, strict=True)]
    assert payloads._joined(arrays, len(pieces[0])).to_pylist() == expected


@pytest.mark.parametrize("unusual", ['"', "\\", "\n", "\x00", "\x1f", "\x7f"])
def test_a_column_is_scanned_for_unusual_characters_in_its_own_rows_only(unusual: str) -> None:
    """`_any_unusual` reads a column's bytes in one scan: only those of its rows, wherever
    the array was sliced from (a batch of a larger one)."""
    texts = pa.array(["plain", f"odd{unusual}", None, "é and ü", "", "plain"])
    assert payloads._any_unusual(texts)
    assert payloads._any_unusual(texts.slice(1, 1))
    assert not payloads._any_unusual(texts.slice(2))
    assert not payloads._any_unusual(texts.slice(0, 1))
    assert not payloads._any_unusual(texts.slice(2, 0))
    assert not payloads._any_unusual(pa.array([None, None], pa.string()))
