"""Klaviyo's official OpenAPI spec (cut to the operations we use), bundled with the package.

It is the single source of truth for two things: the documented rate limits, which the
client paces itself by, and the request schemas, which the emulator enforces.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

#: The API revision we pin. It is the revision of the bundled spec, so every request we
#: send is checked against the schemas Klaviyo publishes for exactly that revision.
REVISION = "2026-07-15"

_RATE = re.compile(r"^(\d+)/([smd])$")


@dataclass(frozen=True)
class Operation:
    """One Klaviyo API operation with its documented per-account rate limits."""

    operation_id: str
    method: str
    path: str  # template, e.g. "/api/lists/{id}/relationships/profiles"
    burst_per_second: int
    steady_per_minute: int

    @property
    def pattern(self) -> re.Pattern[str]:
        return _path_pattern(self.path)


@cache
def _path_pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", r"([^/]+)", re.escape(template)) + "$")


@cache
def spec() -> dict[str, Any]:
    """The bundled OpenAPI document, parsed once."""
    text = resources.files("dbt_klaviyo_sync.klaviyo").joinpath("openapi-subset.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _per(rate: str, unit: str) -> int:
    match = _RATE.match(rate)
    if not match or match.group(2) != unit:
        raise ValueError(f"unexpected rate limit {rate!r} in the bundled OpenAPI spec")
    return int(match.group(1))


@cache
def operations() -> dict[str, Operation]:
    """Every operation in the bundled spec, by operationId."""
    found: dict[str, Operation] = {}
    for path, item in spec()["paths"].items():
        for method, op in item.items():
            if not isinstance(op, dict) or "operationId" not in op:
                continue
            limits = op["x-klaviyo-ratelimit"]
            found[op["operationId"]] = Operation(
                operation_id=op["operationId"],
                method=method.upper(),
                path=path,
                burst_per_second=_per(limits["burst"], "s"),
                steady_per_minute=_per(limits["steady"], "m"),
            )
    return found


def operation(operation_id: str) -> Operation:
    """Look up one operation; a typo here is a programming error, so it raises KeyError."""
    return operations()[operation_id]


def match(method: str, path: str) -> tuple[Operation, tuple[str, ...]] | None:
    """The operation a concrete request path belongs to, with its path parameters."""
    for op in operations().values():
        if op.method != method.upper():
            continue
        found = op.pattern.match(path)
        if found:
            return op, found.groups()
    return None
