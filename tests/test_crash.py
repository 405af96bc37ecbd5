"""SIGKILL at many points of a 20,000-row sync; each time a normal re-run must complete and
leave Klaviyo equal to the models: no profile or list member missing, no event twice.

The points spread over profile, list and event syncs: before the first request, right
after a bulk job is created (before it completes), between jobs, between list removals,
and between event requests with others in flight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import (
    change_model,
    kill_when,
    make_emulator,
    model_rows,
    sync,
)

EXTRA = 20_000  # customers added to the demo's 1,200


def requests_to(emulator: Emulator, operation: str) -> int:
    return int(emulator.stats()["requests_by_operation"].get(operation, 0))


def after(operation: str, count: int) -> Callable[[Emulator], bool]:
    """A kill point: once `count` more requests to `operation` have arrived."""
    start: dict[str, int] = {}

    def ready(emulator: Emulator) -> bool:
        base = start.setdefault("n", requests_to(emulator, operation))
        return requests_to(emulator, operation) >= base + count

    return ready


def assert_klaviyo_equals_models(project: Path, emulator: Emulator, models: set[str]) -> None:
    profiles = {p["attributes"]["external_id"]: p for p in emulator.profiles()}
    if "customers" in models:
        for row in model_rows(project, "SELECT customer_id, city FROM main.customers"):
            held = profiles[row["customer_id"]]["attributes"]
            assert (held.get("location") or {}).get("city") == row["city"], row["customer_id"]
    if "vip_audience" in models:
        members = emulator.list_members("VipLst")
        held_members = {key for key, p in profiles.items() if p["id"] in members}
        wanted = {r["customer_id"] for r in model_rows(project, "SELECT * FROM main.vip_audience")}
        assert held_members == wanted
    if "order_events" in models:
        recorded = Counter(e["unique_id"] for e in emulator.events())
        assert max(recorded.values()) == 1  # no event recorded twice
        wanted = {
            r["order_id"] for r in model_rows(project, "SELECT order_id FROM main.order_events")
        }
        assert set(recorded) == wanted


@pytest.fixture
def klaviyo() -> Emulator:
    emulator = make_emulator(job_seconds=1.0)
    emulator.start()
    emulator.create_list("VIPs", list_id="VipLst")
    yield emulator
    emulator.close()


def orders(first: int, count: int) -> str:
    return f"""INSERT INTO main.order_events
        SELECT 'X' || i, 'x' || (i % {EXTRA}) || '@example.com', 'X' || (i % {EXTRA}),
               TIMESTAMP '2024-06-01' + to_seconds(i), 5.0, 'USD', 'SKU-X', 1
        FROM range({first}, {first + count}) t(i)"""


def xs(first: int, last: int) -> str:
    """The extra customers X<first> .. X<last - 1>, as a subquery."""
    return f"(SELECT 'X' || i FROM range({first}, {last}) t(i))"


# (model, SQL that gives it new work, kill point)
KILLS: list[tuple[str, str, Callable[[Emulator], bool]]] = [
    ("customers", "SELECT 1", after("bulk_import_profiles", 1)),  # job created, not done
    (
        "customers",
        "UPDATE main.customers SET city = city || '2'",
        after("get_bulk_import_profiles_job", 3),
    ),
    ("customers", "UPDATE main.customers SET city = city || '3'", after("bulk_import_profiles", 3)),
    ("customers", "UPDATE main.customers SET city = city || '4'", after("get_accounts", 1)),
    ("vip_audience", "SELECT 1", after("bulk_import_profiles", 1)),
    (
        "vip_audience",
        f"DELETE FROM main.vip_audience WHERE customer_id IN {xs(0, 3000)}",
        after("remove_profiles_from_list", 1),
    ),
    (
        "vip_audience",
        f"""INSERT INTO main.vip_audience SELECT email, customer_id, first_name
            FROM main.customers WHERE customer_id IN {xs(5000, 7000)};
            DELETE FROM main.vip_audience WHERE customer_id IN {xs(3000, 4000)}""",
        after("remove_profiles_from_list", 1),
    ),
    ("order_events", orders(0, 20_000), after("bulk_create_events", 2)),
    ("order_events", orders(20_000, 8_000), after("bulk_create_events", 5)),
    ("order_events", orders(28_000, 4_000), after("get_accounts", 1)),  # before any send
]


def test_a_sync_killed_anywhere_loses_nothing_and_sends_no_event_twice(
    project: Path, klaviyo: Emulator
) -> None:
    change_model(
        project,
        f"""INSERT INTO main.customers (customer_id, email, first_name, city, signup_date,
                                        lifetime_value)
            SELECT 'X' || i, 'x' || i || '@example.com', 'X', 'Xville', DATE '2024-01-01', 1
            FROM range({EXTRA}) t(i);
            INSERT INTO main.vip_audience
            SELECT email, customer_id, first_name FROM main.customers
            WHERE customer_id IN {xs(0, 5000)}""",
    )
    synced: set[str] = set()
    import time

    for model, work, ready in KILLS:
        t0 = time.time()
        change_model(project, work)
        kill_when(project, klaviyo, ready, select=model)
        t1 = time.time()
        rerun = sync(project, klaviyo, "--select", model)
        print("TIMING", model, round(t1 - t0, 1), round(time.time() - t1, 1))
        assert rerun.returncode == 0, rerun.output
        synced.add(model)
        assert_klaviyo_equals_models(project, klaviyo, synced)
    assert len(model_rows(project, "SELECT * FROM main.customers")) >= 20_000
    assert klaviyo.stats()["spec_violations"] == 0
    assert klaviyo.stats()["retry_after_violations"] == 0
