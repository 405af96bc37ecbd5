"""Find Klaviyo profiles by identifier, 100 values per request.

`GET /api/profiles` filters with `any(field,[...])` on id, email, phone_number and
external_id, at most 100 profiles a page (API.md §2.4), so a batch of keys costs one request
per hundred, never one per key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient

PAGE_SIZE = 100
LOOKUP_FIELDS = ("email", "phone_number", "external_id")


def normalise(field: str, value: str) -> str:
    """Klaviyo matches emails without regard to case."""
    return value.lower() if field == "email" else value


def _value(profile: dict[str, Any], field: str) -> Any:
    return profile.get("id") if field == "id" else (profile.get("attributes") or {}).get(field)


def profiles_by(
    client: KlaviyoClient, field: str, values: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """The profile holding each value of `field` (`id` or an identifier), for the values
    Klaviyo knows, keyed by the normalised value."""
    wanted = sorted({normalise(field, v) for v in values})
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(wanted), PAGE_SIZE):
        chunk = wanted[start : start + PAGE_SIZE]
        quoted = ",".join(orjson.dumps(v).decode() for v in chunk)
        params = {"filter": f"any({field},[{quoted}])", "page[size]": str(PAGE_SIZE)}
        for profile in client.pages("get_profiles", params=params):
            value = _value(profile, field)
            if value is not None:
                found[normalise(field, str(value))] = profile
    return found


def profile_ids(client: KlaviyoClient, field: str, values: Iterable[str]) -> dict[str, str]:
    """The id of the profile holding each value of `field`, for the values Klaviyo knows."""
    return {value: p["id"] for value, p in profiles_by(client, field, values).items()}
