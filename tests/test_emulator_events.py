"""The Klaviyo emulator's events and profile deletions over real HTTP: create_event, bulk
create jobs, GET /api/events, data-privacy deletion jobs, their limits, and their accounts.
Time is a fake clock, as in test_emulator."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from dbt_klaviyo_sync.emulator import Emulator
from tests.test_emulator import (
    OTHER_KEY,
    PRIVATE_KEY,
    START,
    FakeClock,
    assert_matches_spec,
    at,
    call,
    error_of,
    upsert,
)

ORDER = "Placed Order"
GROUPS = "/data/attributes/events-bulk-create/data"


#: The fake clock's START, as a datetime.
NOW = datetime.fromtimestamp(START, UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emu(clock: FakeClock) -> Iterator[Emulator]:
    with Emulator(private_key=PRIVATE_KEY, rate_limits=False, clock=clock) as running:
        yield running


def event(metric: str = ORDER, **attributes: Any) -> dict[str, Any]:
    """An event's attributes, without its profile (the shape of a bulk job's events)."""
    return {
        "properties": {},
        "metric": {"data": {"type": "metric", "attributes": {"name": metric}}},
        **attributes,
    }


def create(
    emu: Emulator,
    who: dict[str, Any],
    metric: str = ORDER,
    *,
    profile_id: str | None = None,
    key: str = PRIVATE_KEY,
    **attributes: Any,
) -> requests.Response:
    """POST /api/events for the profile with attributes `who` (and id `profile_id`), in the
    account of `key`."""
    profile: dict[str, Any] = {"type": "profile", "attributes": who}
    if profile_id is not None:
        profile["id"] = profile_id
    body = {
        "data": {
            "type": "event",
            "attributes": {**event(metric, **attributes), "profile": {"data": profile}},
        }
    }
    return call(emu, "POST", "/api/events", body, key=key)


def bulk(emu: Emulator, *groups: tuple[dict[str, Any], list[dict[str, Any]]]) -> requests.Response:
    """POST /api/event-bulk-create-jobs with one group per (profile attributes, events)."""
    return call(emu, "POST", "/api/event-bulk-create-jobs", bulk_body(*groups))


def bulk_body(*groups: tuple[dict[str, Any], list[dict[str, Any]]]) -> dict[str, Any]:
    """A bulk create job's body with one group per (profile attributes, events)."""
    data = [
        {
            "type": "event-bulk-create",
            "attributes": {
                "profile": {"data": {"type": "profile", "attributes": who}},
                "events": {"data": [{"type": "event", "attributes": e} for e in events]},
            },
        }
        for who, events in groups
    ]
    return {
        "data": {
            "type": "event-bulk-create-job",
            "attributes": {"events-bulk-create": {"data": data}},
        }
    }


def delete(
    emu: Emulator, profile_id: str | None = None, *, key: str = PRIVATE_KEY, **attributes: Any
) -> requests.Response:
    profile: dict[str, Any] = {"type": "profile", "attributes": attributes}
    if profile_id is not None:
        profile["id"] = profile_id
    body = {
        "data": {
            "type": "data-privacy-deletion-job",
            "attributes": {"profile": {"data": profile}},
        }
    }
    return call(emu, "POST", "/api/data-privacy-deletion-jobs", body, key=key)


def accepted(response: requests.Response) -> None:
    assert (response.status_code, response.content) == (202, b"")


def refused(response: requests.Response, status: int, pointer: str) -> dict[str, Any]:
    error = error_of(response)
    assert (response.status_code, error["source"]) == (status, {"pointer": pointer})
    return error


def recorded(emu: Emulator, key: str = "properties") -> list[Any]:
    return [item[key] for item in emu.events()]


# POST /api/events


def test_an_event_creates_its_profile_and_metric(emu: Emulator) -> None:
    accepted(
        create(
            emu,
            {"email": "sarah@example.com", "first_name": "Sarah"},
            properties={"sku": "B-1", "items": ["a", "b"]},
            time="2024-05-01T12:00:00.750+00:00",
            value=9.99,
            value_currency="USD",
            unique_id="order-1",
        )
    )
    (profile,) = emu.profiles()
    assert profile["attributes"]["first_name"] == "Sarah"
    (first,) = emu.events()
    assert first == {
        "id": first["id"],
        "metric": ORDER,
        "metric_id": first["metric_id"],
        "profile_id": profile["id"],
        "unique_id": "order-1",
        "time": "2024-05-01T12:00:00+00:00",  # truncated to the second
        "value": 9.99,
        "value_currency": "USD",
        "properties": {"sku": "B-1", "items": ["a", "b"]},
        "backfill": False,
    }
    # The same profile by another case of its email; the same metric by name.
    accepted(create(emu, {"email": "SARAH@example.com"}, unique_id="order-2"))
    accepted(create(emu, {"email": "sarah@example.com"}, "Viewed Product", unique_id="v-1"))
    events = emu.events()
    assert {e["profile_id"] for e in events} == {profile["id"]}
    assert events[1]["metric_id"] == first["metric_id"]
    assert events[2]["metric_id"] != first["metric_id"]
    assert emu.state()["events"] == events
    stats = emu.stats()
    assert (stats["writes"], stats["requests_by_operation"]) == (3, {"create_event": 3})


def test_the_event_profile_is_upserted_like_profile_import(emu: Emulator) -> None:
    known = upsert(emu, external_id="u1", properties={"tier": "gold"}).json()["data"]["id"]
    who = {"external_id": "u1", "email": "new@example.com", "properties": {"ltv": 10}}
    accepted(create(emu, who, unique_id="1"))
    (profile,) = emu.profiles()
    assert profile["id"] == known
    assert profile["attributes"]["email"] == "new@example.com"
    assert profile["attributes"]["properties"] == {"tier": "gold", "ltv": 10}
    accepted(create(emu, {}, profile_id=known, unique_id="2"))
    # Here `meta` sits among the profile's attributes (EventProfileCreateQueryResourceObject).
    unset = {"external_id": "u1", "meta": {"patch_properties": {"unset": "tier"}}}
    accepted(create(emu, unset, unique_id="3"))
    assert emu.profiles()[0]["attributes"]["properties"] == {"ltv": 10}
    assert recorded(emu, "profile_id") == [known] * 3


def test_identifiers_of_two_profiles_are_accepted_for_the_first(emu: Emulator) -> None:
    """202, "validated and submitted for processing" (API.md §2.9): a conflict only the
    account shows is no 409 here. The event goes to the profile the email names; the
    phone stays on the profile that holds it."""
    first = upsert(emu, email="a@example.com").json()["data"]["id"]
    other = upsert(emu, phone_number="+12025550143").json()["data"]["id"]
    who = {"email": "a@example.com", "phone_number": "+12025550143"}
    accepted(create(emu, who))
    accepted(bulk(emu, (who, [event(unique_id="o-2")])))
    assert [found["profile_id"] for found in emu.events()] == [first, first]
    phones = {found["id"]: found["attributes"]["phone_number"] for found in emu.profiles()}
    assert phones == {first: None, other: "+12025550143"}


@pytest.mark.parametrize(
    ("who", "status", "pointer"),
    [
        ({"first_name": "Nobody"}, 400, "/data/attributes/profile/data/attributes"),
        ({"email": None}, 400, "/data/attributes/profile/data/attributes"),
        ({"anonymous_id": "anon-1"}, 501, "/data/attributes/profile/data/attributes"),
        ({"email": "not-an-email"}, 400, "/data/attributes/profile/data/attributes/email"),
    ],
)
def test_an_event_needs_a_profile_identifier(
    emu: Emulator, who: dict[str, Any], status: int, pointer: str
) -> None:
    refused(create(emu, who), status, pointer)
    assert (emu.events(), emu.profiles()) == ([], [])


def test_an_unknown_profile_id_is_accepted_and_lost(emu: Emulator) -> None:
    """Accepted with a 202 like any valid event; no profile has the id, so nothing is
    recorded, and only the emulator's counter shows it."""
    accepted(create(emu, {}, profile_id="01NOSUCHPROFILE0000000000"))
    assert (emu.events(), emu.profiles(), emu.stats()["events_lost"]) == ([], [], 1)


def test_a_repeated_unique_id_records_only_the_first_event(emu: Emulator) -> None:
    who = {"email": "a@example.com"}
    accepted(create(emu, who, unique_id="o-1", properties={"n": 1}))
    accepted(create(emu, who, unique_id="o-1", properties={"n": 2}))
    assert recorded(emu) == [{"n": 1}]
    # Another metric or another profile is another event.
    accepted(create(emu, who, "Refunded Order", unique_id="o-1", properties={"n": 3}))
    accepted(create(emu, {"email": "b@example.com"}, unique_id="o-1", properties={"n": 4}))
    assert recorded(emu) == [{"n": 1}, {"n": 3}, {"n": 4}]


def test_without_unique_id_one_event_per_profile_metric_and_second(emu: Emulator) -> None:
    who = {"email": "a@example.com"}
    accepted(create(emu, who, time="2024-05-01T12:00:00.100+00:00", properties={"n": 1}))
    accepted(create(emu, who, time="2024-05-01T12:00:00.900+00:00", properties={"n": 2}))
    accepted(create(emu, who, time="2024-05-01T12:00:01+00:00", properties={"n": 3}))
    accepted(create(emu, who, "Other", time="2024-05-01T12:00:00+00:00", properties={"n": 4}))
    other = {"email": "b@example.com"}
    accepted(create(emu, other, time="2024-05-01T12:00:00+00:00", properties={"n": 5}))
    assert recorded(emu) == [{"n": 1}, {"n": 3}, {"n": 4}, {"n": 5}]
    assert recorded(emu, "unique_id") == [None] * 4


@pytest.mark.parametrize(
    "moment",
    [
        "1989-12-31T23:59:59+00:00",
        (NOW + timedelta(days=365, seconds=1)).isoformat(),
        "2024-13-01T00:00:00+00:00",
        "2024-05-01T12:00:00",  # the spec's `format: date-time` is RFC 3339's: with an offset
        "2024-05-01",
    ],
    ids=["before-1990", "over-a-year-ahead", "not-a-date", "no-offset", "a-date-only"],
)
def test_a_time_outside_klaviyos_window_is_refused(emu: Emulator, moment: str) -> None:
    refused(create(emu, {"email": "a@example.com"}, time=moment), 400, "/data/attributes/time")
    assert emu.events() == []


def test_times_inside_the_window_are_accepted(emu: Emulator, clock: FakeClock) -> None:
    who = {"email": "a@example.com"}
    accepted(create(emu, who, time="1990-01-01T00:00:00+00:00"))
    accepted(create(emu, who, time=(NOW + timedelta(days=365)).isoformat()))
    clock.advance(1.75)
    accepted(create(emu, who))  # no time: the time of receipt, to the second
    assert [item["time"] for item in emu.events()] == [
        "1990-01-01T00:00:00+00:00",
        (NOW + timedelta(days=365)).isoformat(),
        at(1),
    ]


def test_event_limits(emu: Emulator) -> None:
    who = {"email": "a@example.com"}
    too_many = {f"p{i}": i for i in range(401)}
    refused(create(emu, who, properties=too_many), 400, "/data/attributes/properties")
    name = "/data/attributes/metric/data/attributes/name"
    refused(create(emu, who, "m" * 128), 400, name)
    refused(create(emu, who, ""), 400, name)
    blob = {"blob": "x" * (100 * 1024 + 1)}
    refused(create(emu, who, properties=blob), 400, "/data/attributes/properties/blob")
    for currency in ("dollars", "usd"):  # ISO 4217 (SPEC `value_currency`)
        refused(create(emu, who, value_currency=currency), 400, "/data/attributes/value_currency")
    refused(create(emu, who, value="9.99"), 400, "/data/attributes/value")
    assert emu.events() == []
    accepted(create(emu, who, "m" * 127, properties={f"p{i}": i for i in range(400)}))
    accepted(create(emu, who, unique_id="big", properties={"blob": "x" * 100 * 1024}))
    assert len(emu.events()) == 2


# POST /api/event-bulk-create-jobs


def test_bulk_create_with_two_profile_groups(emu: Emulator) -> None:
    response = bulk(
        emu,
        (
            {"email": "a@example.com", "first_name": "Ann"},
            [event(unique_id="a-1", value=5), event("Viewed Product", unique_id="a-2")],
        ),
        ({"external_id": "x-1"}, [event(unique_id="x-1", properties={"k": "v"})]),
    )
    accepted(response)
    by_key = {(p["attributes"]["email"], p["attributes"]["external_id"]): p for p in emu.profiles()}
    ann, x = by_key["a@example.com", None], by_key[None, "x-1"]
    assert ann["attributes"]["first_name"] == "Ann"
    assert [(e["profile_id"], e["metric"], e["unique_id"]) for e in emu.events()] == [
        (ann["id"], ORDER, "a-1"),
        (ann["id"], "Viewed Product", "a-2"),
        (x["id"], ORDER, "x-1"),
    ]
    assert recorded(emu, "value") == [5, None, None]
    stats = emu.stats()
    assert (stats["writes"], stats["requests_by_operation"]) == (1, {"bulk_create_events": 1})


def test_backfilled_events_are_recorded_and_fire_no_flow(emu: Emulator) -> None:
    """Every metric has a flow in the emulator: a live event fires it, a backfilled one
    (the flag on the event, or on its bulk entry when the event has none) does not."""
    accepted(create(emu, {"email": "a@example.com"}, unique_id="live"))
    accepted(create(emu, {"email": "a@example.com"}, unique_id="old", backfill=True))
    accepted(
        bulk(
            emu,
            ({"email": "b@example.com"}, [event(unique_id="b-1"), event(unique_id="b-2")]),
        )
    )
    entry = bulk_body(
        (
            {"email": "c@example.com"},
            [event(unique_id="c-1"), event(unique_id="c-2", backfill=False)],
        )
    )
    entry["data"]["attributes"]["events-bulk-create"]["data"][0]["attributes"]["backfill"] = True
    accepted(call(emu, "POST", "/api/event-bulk-create-jobs", entry))
    flags = {e["unique_id"]: e["backfill"] for e in emu.events()}
    assert flags == {
        "live": False,
        "old": True,
        "b-1": False,
        "b-2": False,
        "c-1": True,  # from its entry
        "c-2": False,  # its own flag wins
    }
    assert emu.flow_triggers() == {ORDER: 4}
    # A repeat Klaviyo drops fires nothing either.
    accepted(create(emu, {"email": "a@example.com"}, unique_id="live"))
    assert emu.flow_triggers() == {ORDER: 4}
    assert emu.state()["flow_triggers"] == {ORDER: 4}


def test_bulk_refused_whole_when_a_unique_id_repeats(emu: Emulator) -> None:
    response = bulk(
        emu,
        ({"email": "b@example.com"}, [event(unique_id="b-1")]),
        ({"email": "a@example.com"}, [event(unique_id="dup"), event(unique_id="dup")]),
    )
    error = refused(response, 400, f"{GROUPS}/1/attributes/events/data/1/attributes/unique_id")
    assert "'dup'" in error["detail"]
    assert (emu.events(), emu.profiles()) == ([], [])


def test_two_groups_of_one_profile_are_one_profile_for_repeats(emu: Emulator) -> None:
    known = upsert(emu, email="a@example.com", external_id="u1", first_name="Ann")
    response = bulk(
        emu,
        ({"email": "a@example.com", "first_name": "Changed"}, [event(unique_id="dup")]),
        ({"external_id": "u1"}, [event(unique_id="dup")]),
    )
    refused(response, 400, f"{GROUPS}/1/attributes/events/data/0/attributes/unique_id")
    # Nothing was processed: not even the first group's change to the profile.
    (profile,) = emu.profiles()
    assert profile["id"] == known.json()["data"]["id"]
    assert profile["attributes"]["first_name"] == "Ann"
    assert emu.events() == []


def test_a_unique_id_may_repeat_for_another_metric_or_profile(emu: Emulator) -> None:
    response = bulk(
        emu,
        (
            {"email": "a@example.com"},
            [event(unique_id="u"), event("Refunded Order", unique_id="u")],
        ),
        ({"email": "b@example.com"}, [event(unique_id="u")]),
    )
    accepted(response)
    assert len(emu.events()) == 3


def test_bulk_events_repeating_recorded_ones_are_dropped(emu: Emulator) -> None:
    who = {"email": "a@example.com"}
    accepted(create(emu, who, unique_id="u-1", properties={"n": 1}))
    accepted(
        bulk(emu, (who, [event(unique_id="u-1", properties={"n": 2}), event(unique_id="u-2")]))
    )
    assert recorded(emu, "unique_id") == ["u-1", "u-2"]
    assert recorded(emu)[0] == {"n": 1}


def test_an_invalid_event_refuses_the_whole_bulk_request(emu: Emulator) -> None:
    response = bulk(
        emu,
        ({"email": "a@example.com"}, [event(unique_id="ok")]),
        ({"email": "b@example.com"}, [event(unique_id="ok"), event(time="1980-01-01T00:00:00Z")]),
    )
    refused(response, 400, f"{GROUPS}/1/attributes/events/data/1/attributes/time")
    bad_phone = bulk(
        emu,
        ({"email": "c@example.com"}, [event()]),
        ({"email": "c@example.com", "phone_number": "+1555"}, [event()]),
    )
    refused(bad_phone, 400, f"{GROUPS}/1/attributes/profile/data/attributes/phone_number")
    assert (emu.events(), emu.profiles()) == ([], [])


def test_at_most_1000_events_per_bulk_request(emu: Emulator) -> None:
    def events(first: int, count: int) -> list[dict[str, Any]]:
        return [event(unique_id=str(i)) for i in range(first, first + count)]

    too_many = bulk(
        emu,
        ({"email": "a@example.com"}, events(0, 500)),
        ({"email": "b@example.com"}, events(0, 501)),
    )
    refused(too_many, 400, GROUPS)
    assert emu.events() == []
    accepted(
        bulk(
            emu,
            ({"email": "a@example.com"}, events(0, 500)),
            ({"email": "b@example.com"}, events(0, 500)),
        )
    )
    assert len(emu.events()) == 1000


def test_more_than_5mb_is_refused(emu: Emulator) -> None:
    heavy = [event(unique_id=str(i), properties={"blob": "x" * 90_000}) for i in range(60)]
    assert bulk(emu, ({"email": "a@example.com"}, heavy)).status_code == 413
    assert emu.events() == []


# GET /api/events


def test_get_events_pages_sorts_and_filters(emu: Emulator) -> None:
    ann, bob = {"email": "a@example.com"}, {"email": "b@example.com"}
    seconds = [4, 0, 3, 1, 2]
    accepted(
        bulk(
            emu,
            (ann, [event(time=f"2024-05-01T12:00:0{s}+00:00", value=s) for s in seconds]),
            (bob, [event("Viewed Product", time="2024-05-01T11:00:00+00:00", unique_id="v")]),
        )
    )
    first = call(emu, "GET", "/api/events", params={"page[size]": 4})
    assert first.status_code == 200
    assert_matches_spec("get_events", first)
    pages = [first.json()]
    while "next" in pages[-1]["links"]:
        pages.append(call(emu, "GET", pages[-1]["links"]["next"]).json())
    listed = [item for page in pages for item in page["data"]]
    assert len(pages) == 2
    assert [item["attributes"]["datetime"] for item in listed] == [
        "2024-05-01T11:00:00+00:00",
        *(f"2024-05-01T12:00:0{s}+00:00" for s in range(5)),
    ]
    viewed = listed[0]
    assert viewed["attributes"]["event_properties"] == {"$event_id": "v"}
    assert listed[1]["attributes"]["event_properties"]["$value"] == 0
    assert viewed["attributes"]["timestamp"] == int(
        datetime(2024, 5, 1, 11, tzinfo=UTC).timestamp()
    )
    bob_id = viewed["relationships"]["profile"]["data"]["id"]
    metric_id = viewed["relationships"]["metric"]["data"]["id"]

    def ids(**params: str) -> list[str]:
        response = call(emu, "GET", "/api/events", params=params)
        assert response.status_code == 200
        return [item["id"] for item in response.json()["data"]]

    assert ids(filter=f'equals(profile_id,"{bob_id}")') == [viewed["id"]]
    assert ids(filter=f"equals(metric_id,'{metric_id}')") == [viewed["id"]]
    assert ids(sort="-datetime") == [item["id"] for item in reversed(listed)]
    assert call(emu, "GET", "/api/events", params={"include": "metric"}).status_code == 501
    assert call(emu, "GET", "/api/events", params={"page[size]": 1001}).status_code == 400
    bad = call(emu, "GET", "/api/events", params={"filter": 'equals(uuid,"x")'})
    assert error_of(bad)["source"] == {"parameter": "filter"}


# POST /api/data-privacy-deletion-jobs


def test_deletion_by_email_phone_and_id_after_job_seconds(clock: FakeClock) -> None:
    with Emulator(rate_limits=False, job_seconds=1.0, clock=clock) as emu:
        vips = emu.create_list("VIPs")
        people = [
            {"email": "a@example.com"},
            {"phone_number": "+12025550143"},
            {"external_id": "c"},
            {"email": "kept@example.com"},
        ]
        ids = [upsert(emu, **who).json()["data"]["id"] for who in people]
        members = {"data": [{"type": "profile", "id": i} for i in ids]}
        call(emu, "POST", f"/api/lists/{vips}/relationships/profiles", members)
        for who in people:
            accepted(create(emu, who, unique_id="o-1"))
        accepted(delete(emu, email="A@example.com"))
        accepted(delete(emu, phone_number="+12025550143"))
        accepted(delete(emu, profile_id=ids[2]))
        clock.advance(0.75)
        pending = emu.deletions()
        assert [d["completed_at"] for d in pending] == [None] * 3
        assert len(emu.profiles()) == 4  # deletion is asynchronous
        clock.advance(0.25)
        assert [p["id"] for p in emu.profiles()] == [ids[3]]
        assert emu.list_members(vips) == {ids[3]}
        assert recorded(emu, "profile_id") == [ids[3]]
        done = emu.deletions()
        assert [(d["identifier"], d["value"], d["profile_ids"]) for d in done] == [
            ("email", "A@example.com", [ids[0]]),
            ("phone_number", "+12025550143", [ids[1]]),
            ("id", ids[2], [ids[2]]),
        ]
        assert [(d["requested_at"], d["completed_at"]) for d in done] == [(at(0), at(1))] * 3
        assert emu.state()["deletions"] == done
        assert emu.stats()["writes"] == 12  # 4 upserts, 1 list change, 4 events, 3 deletions
        # The same email makes a new profile, whose events are new events.
        accepted(create(emu, {"email": "a@example.com"}, unique_id="o-1"))
        assert len(emu.events()) == 2
        assert emu.deletions() == done  # nothing is deleted twice


def test_a_deletion_runs_after_the_import_made_before_it(clock: FakeClock) -> None:
    with Emulator(rate_limits=False, job_seconds=0.5, clock=clock) as emu:
        records = [{"type": "profile", "attributes": {"email": "a@example.com"}}]
        job = {
            "data": {
                "type": "profile-bulk-import-job",
                "attributes": {"profiles": {"data": records}},
            }
        }
        assert call(emu, "POST", "/api/profile-bulk-import-jobs", job).status_code == 202
        accepted(delete(emu, email="a@example.com"))
        clock.advance(0.5)
        assert emu.profiles() == []
        (deletion,) = emu.deletions()
        assert len(deletion["profile_ids"]) == 1


def test_deleting_an_unknown_profile_deletes_nothing(emu: Emulator) -> None:
    kept = upsert(emu, email="kept@example.com").json()["data"]["id"]
    accepted(delete(emu, email="nobody@example.com"))
    accepted(delete(emu, profile_id="01NOSUCHPROFILE0000000000"))
    assert [d["profile_ids"] for d in emu.deletions()] == [[], []]
    assert [p["id"] for p in emu.profiles()] == [kept]


@pytest.mark.parametrize(
    ("profile_id", "attributes", "pointer"),
    [
        (None, {"email": "a@example.com", "phone_number": "+12025550143"}, ""),
        ("01ABC", {"email": "a@example.com"}, ""),
        (None, {}, ""),
        (None, {"email": None}, ""),
        (None, {"external_id": "x"}, "/attributes/external_id"),
        (None, {"email": "not-an-email"}, "/attributes/email"),
    ],
)
def test_a_deletion_names_exactly_one_identifier(
    emu: Emulator, profile_id: str | None, attributes: dict[str, Any], pointer: str
) -> None:
    upsert(emu, email="a@example.com")
    response = delete(emu, profile_id, **attributes)
    refused(response, 400, "/data/attributes/profile/data" + pointer)
    assert emu.deletions() == []
    assert len(emu.profiles()) == 1


# Accounts


def test_events_and_deletions_stay_in_the_account_of_the_key(clock: FakeClock) -> None:
    with Emulator(PRIVATE_KEY, rate_limits=False, job_seconds=1.0, clock=clock) as emu:
        second = emu.add_account(OTHER_KEY)
        who = {"email": "a@example.com"}
        for key in (PRIVATE_KEY, OTHER_KEY):
            accepted(create(emu, who, unique_id="o-1", key=key))
        (theirs,) = emu.profiles(account=second)
        assert [e["profile_id"] for e in emu.events(account=second)] == [theirs["id"]]
        accepted(delete(emu, email="a@example.com", key=OTHER_KEY))
        clock.advance(1)
        (kept,) = emu.profiles()
        assert kept["id"] != theirs["id"]
        assert recorded(emu, "profile_id") == [kept["id"]]
        assert (emu.deletions(), emu.stats()["events_repeated"]) == ([], 0)
        (deletion,) = emu.deletions(account=second)
        assert deletion["profile_ids"] == [theirs["id"]]
        assert (emu.profiles(account=second), emu.events(account=second)) == ([], [])


# Rate limits


def test_documented_rate_limits_apply(clock: FakeClock) -> None:
    with Emulator(clock=clock) as emu:
        # 3/s and 60/m: twenty seconds of three requests each fill the minute.
        answers = []
        for _ in range(20):
            answers += [delete(emu, email=f"p{len(answers)}@example.com") for _ in range(3)]
            clock.advance(1)
        assert {a.status_code for a in answers} == {202}
        assert answers[0].headers["RateLimit-Limit"] == "60"
        assert answers[-1].headers["RateLimit-Remaining"] == "0"
        throttled = delete(emu, email="one-too-many@example.com")
        assert throttled.status_code == 429
        assert throttled.headers["Retry-After"] == "40"
        assert error_of(throttled)["code"] == "throttled"
        assert len(emu.deletions()) == 60
        created = create(emu, {"email": "a@example.com"})
        assert created.headers["RateLimit-Limit"] == "3500"
        jobs = bulk(emu, ({"email": "a@example.com"}, []))
        assert jobs.headers["RateLimit-Limit"] == "150"
