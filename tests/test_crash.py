"""SIGKILL at many points of a 12,000-row sync; each time a normal re-run must complete and
leave Klaviyo equal to the models: no profile or list member missing, no event twice.

The points spread over profile, list and event syncs: before the first request, right
after a bulk job is created (before it completes), between jobs, between list removals,
and between event requests with others in flight. Each point is a test of its own, so
that they run side by side and none waits for the others.
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

EXTRA = 11_000  # customers added to the demo's 1,200: two bulk jobs


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


# (model, SQL run and synced before, SQL that gives it new work, kill point)
KILLS: list[tuple[str, str, str, Callable[[Emulator], bool]]] = [
    ("customers", "", "SELECT 1", after("bulk_import_profiles", 1)),  # job created, not done
    (
        "customers",
        "SELECT 1",
        "UPDATE main.customers SET city = city || '2'",
        after("get_bulk_import_profiles_job", 3),
    ),
    (
        "customers",
        "SELECT 1",
        "UPDATE main.customers SET city = city || '3'",
        after("bulk_import_profiles", 2),  # between jobs
    ),
    (
        "customers",
        "SELECT 1",
        "UPDATE main.customers SET city = city || '4'",
        after("get_accounts", 1),
    ),
    ("vip_audience", "", "SELECT 1", after("bulk_import_profiles", 1)),
    (
        "vip_audience",
        "SELECT 1",
        f"DELETE FROM main.vip_audience WHERE customer_id IN {xs(0, 1500)}",
        after("remove_profiles_from_list", 1),
    ),
    (
        "vip_audience",
        "SELECT 1",
        f"""INSERT INTO main.vip_audience SELECT email, customer_id, first_name
            FROM main.customers WHERE customer_id IN {xs(5000, 6000)};
            DELETE FROM main.vip_audience WHERE customer_id IN {xs(1500, 2800)}""",
        after("remove_profiles_from_list", 1),
    ),
    ("order_events", "", orders(0, 6_000), after("bulk_create_events", 2)),
    ("order_events", orders(0, 2_000), orders(2_000, 5_000), after("bulk_create_events", 3)),
    ("order_events", orders(0, 2_000), orders(2_000, 2_000), after("get_accounts", 1)),
]


KILL_POINTS = [
    "customers-job-created",
    "customers-while-polling",
    "customers-between-jobs",
    "customers-before-sending",
    "list-job-created",
    "list-between-removals",
    "list-adds-then-removals",
    "events-in-flight",
    "events-between-requests",
    "events-before-sending",
]


@pytest.mark.parametrize(("model", "before", "work", "ready"), KILLS, ids=KILL_POINTS)
def test_a_sync_killed_anywhere_loses_nothing_and_sends_no_event_twice(
    project: Path,
    klaviyo: Emulator,
    model: str,
    before: str,
    work: str,
    ready: Callable[[Emulator], bool],
) -> None:
    change_model(
        project,
        f"""INSERT INTO main.customers (customer_id, email, first_name, city, signup_date,
                                        lifetime_value)
            SELECT 'X' || i, 'x' || i || '@example.com', 'X', 'Xville', DATE '2024-01-01', 1
            FROM range({EXTRA}) t(i);
            INSERT INTO main.vip_audience
            SELECT email, customer_id, first_name FROM main.customers
            WHERE customer_id IN {xs(0, 3000)}""",
    )
    if before:
        change_model(project, before)
        assert sync(project, klaviyo, "--select", model).returncode == 0
    change_model(project, work)
    kill_when(project, klaviyo, ready, select=model)
    rerun = sync(project, klaviyo, "--select", model)
    assert rerun.returncode == 0, rerun.output
    assert_klaviyo_equals_models(project, klaviyo, {model})
    assert klaviyo.stats()["spec_violations"] == 0
    assert klaviyo.stats()["retry_after_violations"] == 0
