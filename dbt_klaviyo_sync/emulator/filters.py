"""Klaviyo's `filter` query parameter, for the operators the emulator implements.

Syntax (DOCS-FILTER): `equals(email,"a@x.com")`, `any(email,["a@x.com","b@x.com"])`, and
several conditions separated by commas, all of which must hold. Strings take double or
single quotes. Anything else is refused with 400 `invalid`, as Klaviyo refuses a filter
on a field or operator that the operation does not allow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ApiError, invalid

_CALL = re.compile(r"\s*([a-z][a-z-]*)\(\s*([A-Za-z_][A-Za-z0-9_.]*)\s*,\s*")
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'")
_SEPARATOR = re.compile(r"\s*,\s*")
_CLOSE = re.compile(r"\s*\)")
_LIST_OPEN = re.compile(r"\[\s*")
_LIST_NEXT = re.compile(r"\s*(,|\])\s*")
_SUPPORTED = frozenset({"equals", "any"})


@dataclass(frozen=True)
class Condition:
    """`field` must equal one of `values` (a single value for `equals`)."""

    field: str
    values: tuple[str, ...]


def parse(text: str, allowed: Mapping[str, frozenset[str]]) -> list[Condition]:
    """The conditions in `text`; `allowed` maps each filterable field to its operators."""
    conditions = []
    position = 0
    while True:
        call = _CALL.match(text, position)
        if call is None:
            raise _malformed(text)
        operator, field = call.groups()
        if operator not in _SUPPORTED or operator not in allowed.get(field, frozenset()):
            raise _bad(f"'{operator}' is not a valid filter on '{field}'.")
        values, position = _value(text, call.end())
        if (operator == "equals") != isinstance(values, str):
            raise _bad(f"'{operator}' on '{field}' takes {_expects(operator)}.")
        closing = _CLOSE.match(text, position)
        if closing is None:
            raise _malformed(text)
        conditions.append(Condition(field, (values,) if isinstance(values, str) else values))
        position = closing.end()
        if position == len(text.rstrip()):
            return conditions
        separator = _SEPARATOR.match(text, position)
        if separator is None:
            raise _malformed(text)
        position = separator.end()


def _value(text: str, position: int) -> tuple[str | tuple[str, ...], int]:
    """A quoted string, or a bracketed list of them, starting at `position`."""
    opening = _LIST_OPEN.match(text, position)
    if opening is not None:
        items: list[str] = []
        position = opening.end()
        while True:
            item = _STRING.match(text, position)
            if item is None:
                raise _malformed(text)
            items.append(_unquote(item.group()))
            position = item.end()
            rest = _LIST_NEXT.match(text, position)
            if rest is None:
                raise _malformed(text)
            position = rest.end()
            if rest.group(1) == "]":
                return tuple(items), position
    item = _STRING.match(text, position)
    if item is None:
        raise _malformed(text)
    return _unquote(item.group()), item.end()


def _unquote(quoted: str) -> str:
    if quoted.startswith('"'):
        value: str = json.loads(quoted)
        return value
    return re.sub(r"\\(.)", r"\1", quoted[1:-1])


def _expects(operator: str) -> str:
    return "one quoted value" if operator == "equals" else "a list of quoted values"


def _bad(detail: str) -> ApiError:
    return invalid(detail, parameter="filter")


def _malformed(text: str) -> ApiError:
    return _bad(f"Invalid filter: {text!r}.")
