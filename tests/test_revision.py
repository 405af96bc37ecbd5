"""The revision we declare decides the shape of what we send. 2026-10-15 moves the profile
`meta` of `create_event` from `profile.data.attributes.meta` to `profile.data.meta` (API.md,
"What changed from 2026-07-15 to 2026-10-15"); bulk event creation has it beside
`attributes` in both. These tests pin the place for the declared revision, so changing
`openapi.REVISION` fails here until the payloads (and this table) follow."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

import dbt_klaviyo_sync
from dbt_klaviyo_sync.changeset import Record
from dbt_klaviyo_sync.emulator import validation
from dbt_klaviyo_sync.emulator.errors import SpecViolation
from dbt_klaviyo_sync.klaviyo import openapi
from dbt_klaviyo_sync.klaviyo.events import EventSender
from dbt_klaviyo_sync.spec import FieldMap, SyncSpec

#: Where each revision wants an event profile's `meta`, within the profile resource
#: (`…/profile/data`), per operation that carries one.
META_PLACE = {
    "2026-07-15": {"create_event": ("attributes", "meta"), "bulk_create_events": ("meta",)},
    "2026-10-15": {"create_event": ("meta",), "bulk_create_events": ("meta",)},
}
#: The revisions whose spec is bundled: the declared one must be among them.
BUNDLED = {"2026-07-15"}
META = {"patch_properties": {"unset": ["tier"]}}


def profile_with_meta(place: tuple[str, ...]) -> dict[str, Any]:
    resource: dict[str, Any] = {"type": "profile", "attributes": {"email": "a@example.com"}}
    *parents, last = place
    target = resource
    for name in parents:
        target = target[name]
    target[last] = META
    return resource


def event_body(operation_id: str, profile: dict[str, Any]) -> dict[str, Any]:
    event = {
        "properties": {},
        "metric": {"data": {"type": "metric", "attributes": {"name": "Placed Order"}}},
    }
    if operation_id == "create_event":
        attributes = {**event, "profile": {"data": profile}}
        return {"data": {"type": "event", "attributes": attributes}}
    group = {
        "type": "event-bulk-create",
        "attributes": {
            "profile": {"data": profile},
            "events": {"data": [{"type": "event", "attributes": event}]},
        },
    }
    job = {"events-bulk-create": {"data": [group]}}
    return {"data": {"type": "event-bulk-create-job", "attributes": job}}


def valid(operation_id: str, body: dict[str, Any]) -> bool:
    try:
        validation.check_body(openapi.operation(operation_id), body)
    except SpecViolation:
        return False
    return True


def test_the_declared_revision_is_the_bundled_spec() -> None:
    assert openapi.REVISION in BUNDLED
    assert openapi.spec()["info"]["version"] == openapi.REVISION


@pytest.mark.parametrize("operation_id", ["create_event", "bulk_create_events"])
def test_the_event_profile_meta_sits_where_the_declared_revision_wants_it(
    operation_id: str,
) -> None:
    assert openapi.REVISION in META_PLACE, (
        f"revision {openapi.REVISION} is declared: find where it wants an event profile's "
        "`meta` (2026-10-15 moved create_event's), make the payloads follow, add it here"
    )
    wanted = META_PLACE[openapi.REVISION][operation_id]
    assert valid(operation_id, event_body(operation_id, profile_with_meta(wanted)))
    for other in {p[operation_id] for p in META_PLACE.values()} - {wanted}:
        assert not valid(operation_id, event_body(operation_id, profile_with_meta(other)))


def test_the_client_sends_events_only_where_the_place_is_pinned() -> None:
    """Events go through bulk creation, and their profile carries no `meta` (an event row
    never clears a value), so nothing the client sends depends on the move; a new event
    path must get its place here first."""
    package = Path(dbt_klaviyo_sync.__file__).parent
    called = {
        name
        for path in package.rglob("*.py")
        if "emulator" not in path.parts
        for name in re.findall(r'"(create_event|bulk_create_events)"', path.read_text())
    }
    assert called == {"bulk_create_events"}
    spec = SyncSpec(
        model="orders",
        unique_id="model.x.orders",
        relation='"wh"."main"."orders"',
        object="event",
        behavior="send",
        key_column="order_id",
        key_field="unique_id",
        fields=(FieldMap("order_id", "unique_id"), FieldMap("email", "email")),
        metric="Placed Order",
    )
    sender = EventSender(client=None, spec=spec)  # type: ignore[arg-type]
    record = Record("O1", 1, "add", False, None, {"unique_id": "O1", "email": "a@example.com"})
    prepared, rejects = sender.prepare([record])
    body = sender._request(prepared)[0]
    assert (rejects, b'"meta"' in body) == ([], False)
    assert valid("bulk_create_events", orjson.loads(body))
