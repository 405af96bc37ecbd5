"""Find Klaviyo profile ids by identifier, 100 values per request.

`GET /api/profiles` filters with `any(field,[...])` on email, phone_number, external_id
and id, at most 100 profiles a page (API.md §2.4), so a batch of keys costs one request
per hundred, never one per key.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient

PAGE_SIZE = 100
LOOKUP_FIELDS = ("email", "phone_number", "external_id")


def normalise(field: str, value: str) -> str:
    """Klaviyo matches emails without regard to case."""
    return value.lower() if field == "email" else value


def profile_ids(client: KlaviyoClient, field: str, values: Iterable[str]) -> dict[str, str]:
    """The id of the profile holding each value of `field`, for the values Klaviyo knows."""
    wanted = sorted({normalise(field, v) for v in values})
    found: dict[str, str] = {}
    for start in range(0, len(wanted), PAGE_SIZE):
        chunk = wanted[start : start + PAGE_SIZE]
        quoted = ",".join(orjson.dumps(v).decode() for v in chunk)
        params = {"filter": f"any({field},[{quoted}])", "page[size]": str(PAGE_SIZE)}
        for profile in client.pages("get_profiles", params=params):
            value = (profile.get("attributes") or {}).get(field)
            if value is not None:
                found[normalise(field, str(value))] = profile["id"]
    return found
