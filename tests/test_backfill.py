"""Historical events without flows: `backfill: true` sends events with Klaviyo's flag, so the
emulator records them without firing a flow; a first sync of old events without it warns.

The demo's orders are from 2024, so every one is older than a day."""

from __future__ import annotations

from pathlib import Path

from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import Sync, change_model, model_rows, sync

ORDER = "Placed Order"


def events(project: Path, emulator: Emulator, *args: str) -> Sync:
    return sync(project, emulator, "--select", "order_events", *args)


def set_backfill(project: Path, value: str) -> None:
    schema = project / "models" / "schema.yml"
    text = schema.read_text()
    schema.write_text(
        text.replace(f"metric: {ORDER}", f"metric: {ORDER}\n          backfill: {value}")
    )


def test_backfilled_events_fire_no_flow(project: Path, emulator: Emulator) -> None:
    set_backfill(project, "true")
    orders = model_rows(project, "SELECT order_id FROM main.order_events")

    done = events(project, emulator)

    assert done.returncode == 0, done.output
    assert done.row("order_events")["added"] == len(orders)
    assert {e["backfill"] for e in emulator.events()} == {True}
    assert emulator.flow_triggers() == {}
    assert "backfill flag" not in done.output


def test_a_first_sync_of_old_events_without_backfill_warns_and_fires_flows(
    project: Path, emulator: Emulator
) -> None:
    orders = model_rows(
        project, "SELECT min(ordered_at) AS oldest, count(*) AS n FROM main.order_events"
    )
    (first,) = orders
    warning = (
        f"first sync of {first['n']:,} events older than 24 hours "
        f"(the oldest {first['oldest']:%Y-%m-%d})"
    )

    plan = events(project, emulator, "--dry-run")
    assert plan.returncode == 0, plan.output
    assert warning in plan.stdout and "would go without Klaviyo's backfill flag" in plan.stdout
    assert "backfill: true" in plan.stdout
    assert emulator.events() == []

    done = events(project, emulator)
    assert done.returncode == 0, done.output  # a warning, not a stop
    assert warning in done.stdout and warning in done.stderr
    assert {e["backfill"] for e in emulator.events()} == {False}
    assert emulator.flow_triggers() == {ORDER: first["n"]}

    # Only a first sync warns: later events are live ones.
    change_model(
        project,
        """INSERT INTO main.order_events SELECT 'X1', email, customer_id,
               TIMESTAMP '2024-06-01', 1.0, 'USD', 'SKU-X', 1
           FROM main.order_events LIMIT 1""",
    )
    later = events(project, emulator)
    assert later.row("order_events")["added"] == 1
    assert "backfill" not in later.output


def test_no_warning_for_recent_events_or_with_backfill_false(
    project: Path, emulator: Emulator
) -> None:
    change_model(
        project,
        "UPDATE main.order_events SET ordered_at = now()::TIMESTAMP - INTERVAL 1 HOUR",
    )
    recent = events(project, emulator, "--dry-run")
    assert recent.returncode == 0, recent.output
    assert "backfill" not in recent.output

    change_model(project, "UPDATE main.order_events SET ordered_at = TIMESTAMP '2024-06-01'")
    set_backfill(project, "false")
    live = events(project, emulator)
    assert live.returncode == 0, live.output
    assert "backfill" not in live.output
    assert emulator.flow_triggers() == {ORDER: live.row("order_events")["added"]}
