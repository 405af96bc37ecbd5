"""How each mapped column is selected from DuckDB, by its type, so that Arrow carries its
values to Python exactly (see `changeset`'s note on values)."""

from __future__ import annotations

import re

from dbt_klaviyo_sync.changeset import JSON_TEXT, field_kind

_WHOLE_NUMBERS = frozenset({"HUGEINT", "UHUGEINT", "BIGNUM", "VARINT"})
#: Types that Arrow hands to Python inexactly, or not at all, inside a LIST, STRUCT or MAP:
#: 128-bit and arbitrary integers, BIT, JSON (as a string), time zones, nanoseconds, TIME
#: (24:00:00).
_INEXACT_INSIDE = re.compile(
    r"\b(?:U?HUGEINT|BIGNUM|VARINT|BIT|JSON|TIMESTAMP_NS|TIME_NS|TIME WITH TIME ZONE)\b"
    r"|(?<!WITH )\bTIME\b(?! ZONE)"
)


def value_sql(column: str, duckdb_type: str, field: str) -> str:
    """The SQL that selects a mapped column (`column`, quoted) for the changes table, so
    that Arrow carries each value to Python exactly:
    - FLOAT as the DOUBLE nearest its shortest text, so 1.1 goes as 1.1;
    - HUGEINT, UHUGEINT, VARINT (Arrow has no such integers; a UHUGEINT over 2^127 turns
      negative) as their digits: text for a text field, JSON for the others;
    - TIME WITH TIME ZONE (Arrow drops the offset) and BIT as their text, but BIT as itself
      where a number or a time is wanted, to be rejected there;
    - JSON as JSON to parse where a number or a custom property is wanted;
    - a LIST, STRUCT or MAP holding one of those, outside text fields, as DuckDB's JSON of it.
    A text field (the sync key among them) always gets a value whose VARCHAR cast is the
    text sent."""
    kind = field_kind(field)
    text = f"CAST({column} AS VARCHAR)"
    if duckdb_type == "FLOAT":
        return f"CAST({text} AS DOUBLE)"
    if duckdb_type in _WHOLE_NUMBERS:
        return text if kind == "text" else _json_text_sql(column, text)
    if duckdb_type == "TIME WITH TIME ZONE" or (duckdb_type == "BIT" and kind in ("text", "json")):
        return text
    if kind == "text":
        return column
    if duckdb_type == "JSON" and kind in ("number", "json"):
        return _json_text_sql(column, text)
    if _nested_type(duckdb_type) and _INEXACT_INSIDE.search(duckdb_type):
        return _json_text_sql(column, f"CAST(to_json({column}) AS VARCHAR)")
    return column


def _nested_type(duckdb_type: str) -> bool:
    return "[" in duckdb_type or duckdb_type.startswith(("STRUCT", "MAP", "UNION"))


def _json_text_sql(column: str, json_text: str) -> str:
    return f"CASE WHEN {column} IS NOT NULL THEN {{'{JSON_TEXT}': {json_text}}} END"
