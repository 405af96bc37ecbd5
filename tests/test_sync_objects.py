"""Every Census object and behaviour end to end: Update Only, Delete, list Mirror and Send.

Each runs the real CLI against the emulator on the models of integration_tests/: a first
sync, a no-op re-run with zero writes, adds, changes and removes, and rejects with their
reasons.
"""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import pytest

from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import (
    Sync,
    change_model,
    kill_when,
    klaviyo_api,
    model_rows,
    run_dbt,
    sync,
    sync_customers,
)

LIST_ID = "VipLst"  # the list_id in integration_tests/models/schema.yml


def only(project: Path, emulator: Emulator, model: str, *args: str) -> Sync:
    return sync(project, emulator, "--select", model, *args)


def by_external_id(emulator: Emulator) -> dict[str, dict]:
    return {p["attributes"]["external_id"]: p for p in emulator.profiles()}


def writes(emulator: Emulator) -> int:
    return int(emulator.stats()["writes"])


# -- Profile & List Audience Sync: Mirror ------------------------------------------------


@pytest.fixture
def vip_list(emulator: Emulator) -> str:
    return emulator.create_list("VIPs", list_id=LIST_ID)


def members_by_email(emulator: Emulator) -> set[str]:
    ids = emulator.list_members(LIST_ID)
    return {p["attributes"]["email"] for p in emulator.profiles() if p["id"] in ids}


def test_the_list_mirrors_the_model(project: Path, emulator: Emulator, vip_list: str) -> None:
    first = only(project, emulator, "vip_audience")
    assert first.returncode == 0, first.output
    vips = {r["email"] for r in model_rows(project, "SELECT * FROM main.vip_audience")}
    assert first.row("vip_audience")["added"] == len(vips) > 100
    assert members_by_email(emulator) == vips
    assert emulator.stats()["requests_by_operation"]["bulk_import_profiles"] == 1

    before = writes(emulator)
    assert only(project, emulator, "vip_audience").row("vip_audience")["unchanged"] == len(vips)
    assert writes(emulator) == before

    leaving = sorted(vips)[:2]
    change_model(
        project,
        f"""DELETE FROM main.vip_audience WHERE email IN ('{leaving[0]}', '{leaving[1]}');
            INSERT INTO main.vip_audience
                SELECT email, customer_id, first_name FROM main.customers
                WHERE customer_id = 'C00001';
            UPDATE main.vip_audience SET first_name = 'Renamed'
                WHERE email = (SELECT max(email) FROM main.vip_audience)""",
    )
    third = only(project, emulator, "vip_audience")
    assert third.returncode == 0, third.output
    counts = third.row("vip_audience")
    assert (counts["added"], counts["updated"], counts["removed"]) == (1, 1, 2)
    expected = {r["email"] for r in model_rows(project, "SELECT * FROM main.vip_audience")}
    assert members_by_email(emulator) == expected
    # Leaving the list deletes nothing: the profiles are still there.
    emails = {p["attributes"]["email"] for p in emulator.profiles()}
    assert set(leaving) <= emails


def test_a_bad_member_is_rejected_and_the_rest_join_the_list(
    project: Path, emulator: Emulator, vip_list: str
) -> None:
    change_model(
        project,
        """INSERT INTO main.vip_audience VALUES ('not-an-email', 'C09000', 'Bad');
           DELETE FROM main.vip_audience WHERE customer_id NOT IN
               (SELECT customer_id FROM main.vip_audience ORDER BY customer_id LIMIT 10)
               AND customer_id <> 'C09000'""",
    )
    done = only(project, emulator, "vip_audience")
    assert done.returncode == 1
    assert done.row("vip_audience")["rejected"] == 1
    assert done.row("vip_audience")["added"] == 10
    assert "'not-an-email' email" in done.stdout and "not a valid email" in done.stdout
    assert len(emulator.list_members(LIST_ID)) == 10


def test_a_missing_list_stops_the_run_before_anything_is_sent(
    project: Path, emulator: Emulator
) -> None:
    done = sync(project, emulator, "--select", "vip_audience", "customers")
    assert done.returncode == 2
    assert "model 'vip_audience'" in done.stderr and LIST_ID in done.stderr
    assert writes(emulator) == 0


# -- Profile: Update Only ----------------------------------------------------------------


def test_update_only_updates_existing_profiles_and_creates_none(
    project: Path, emulator: Emulator
) -> None:
    assert sync_customers(project, emulator).returncode == 0
    profiles_before = len(emulator.profiles())

    first = only(project, emulator, "loyalty_updates")

    assert first.returncode == 1, first.output  # C99999 is not in Klaviyo
    assert first.row("loyalty_updates") | {"requests": 0} == {
        "added": 0,
        "updated": 100,
        "removed": 0,
        "unchanged": 0,
        "rejected": 1,
        "failed": 0,
        "requests": 0,
    }
    assert "'C99999'" in first.stdout and "no profile" in first.stdout
    assert len(emulator.profiles()) == profiles_before
    tiers = {
        r["customer_id"]: r["loyalty_tier"]
        for r in model_rows(project, "SELECT * FROM main.loyalty_updates")
    }
    held = by_external_id(emulator)
    assert "C99999" not in held
    for key, tier in tiers.items():
        if key != "C99999":
            assert held[key]["attributes"]["properties"]["loyalty_tier"] == tier

    # Not found is tried again on every run (the profile may be created meanwhile), and
    # stays visible, with exit 1, until it is.
    before = writes(emulator)
    again = only(project, emulator, "loyalty_updates")
    assert again.returncode == 1, again.output
    assert again.row("loyalty_updates")["rejected"] == 1
    assert again.row("loyalty_updates")["unchanged"] == 100
    assert writes(emulator) == before
    klaviyo_api(
        emulator,
        "POST",
        "/api/profile-import",
        {"data": {"type": "profile", "attributes": {"external_id": "C99999"}}},
    )
    found = only(project, emulator, "loyalty_updates")
    assert found.returncode == 0, found.output
    assert (found.row("loyalty_updates")["updated"], found.row("loyalty_updates")["rejected"]) == (
        1,
        0,
    )


def test_update_only_changes_an_email_through_patch_by_klaviyo_id(
    project: Path, emulator: Emulator
) -> None:
    assert sync_customers(project, emulator).returncode == 0
    assert only(project, emulator, "loyalty_updates").returncode == 1
    schema = project / "models" / "schema.yml"
    schema.write_text(
        schema.read_text().replace(
            "      - name: loyalty_tier\n",
            "      - name: new_email\n        config:\n          meta:\n            klaviyo:\n"
            "              field: email\n      - name: loyalty_tier\n",
        )
    )
    change_model(
        project,
        """ALTER TABLE main.loyalty_updates ADD COLUMN new_email VARCHAR;
           UPDATE main.loyalty_updates SET new_email = 'moved.' || customer_id || '@example.org'
               WHERE customer_id = 'C00004'""",
    )
    patched = emulator.stats()["requests_by_operation"].get("update_profile", 0)

    done = only(project, emulator, "loyalty_updates")

    # A new mapping changes every row's fingerprint, so every row goes again (and C99999 is
    # again not found).
    assert done.returncode == 1, done.output
    assert done.row("loyalty_updates")["updated"] == 100
    assert by_external_id(emulator)["C00004"]["attributes"]["email"] == "moved.C00004@example.org"
    assert emulator.stats()["requests_by_operation"]["update_profile"] > patched


# -- Profile: Delete ---------------------------------------------------------------------


def deletions_done(emulator: Emulator) -> None:
    """Klaviyo deletes asynchronously; wait until the emulator has run every deletion."""
    deadline = time.monotonic() + 10
    while any(d["completed_at"] is None for d in emulator.deletions()):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_each_erasure_request_deletes_its_profile_once(project: Path, emulator: Emulator) -> None:
    assert sync_customers(project, emulator).returncode == 0
    assert {"C00003", "C00005"} <= set(by_external_id(emulator))

    first = only(project, emulator, "erasure_requests")

    assert first.returncode == 0, first.output
    assert first.row("erasure_requests")["removed"] == 2
    # The log and the line under the table say it in the behaviour's words.
    assert "erasure_requests (profile delete): 2 profiles deleted" in first.stdout
    assert "2 profiles deleted" in first.stderr and "to add" not in first.stderr
    deletions_done(emulator)
    assert not {"C00003", "C00005"} & set(by_external_id(emulator))
    assert len(emulator.deletions()) == 2

    assert only(project, emulator, "erasure_requests").returncode == 0
    assert only(project, emulator, "erasure_requests", "--full-refresh").returncode == 0
    assert len(emulator.deletions()) == 2  # never twice, not even with --full-refresh

    change_model(project, "INSERT INTO main.erasure_requests VALUES ('C00008'), ('C77777')")
    assert emulator.stats()["throttled"] == 0
    plan = only(project, emulator, "erasure_requests", "--dry-run")
    assert plan.returncode == 0
    assert sorted(line.strip() for line in plan.stdout.splitlines() if "would delete" in line) == [
        "would delete erasure_requests 'C00008'",
        "would delete erasure_requests 'C77777'",
    ]
    assert len(emulator.deletions()) == 2

    # C77777 has no profile: the erasure is complete already, and counted unchanged.
    third = only(project, emulator, "erasure_requests")
    assert third.returncode == 0, third.output
    assert third.row("erasure_requests")["removed"] == 1
    assert third.row("erasure_requests")["unchanged"] == 3
    assert "nothing to delete for 1 key(s)" in third.stderr
    deletions_done(emulator)
    assert "C00008" not in by_external_id(emulator)
    assert len(emulator.deletions()) == 3

    # The deletion endpoint allows 3 requests a second: 6 deletions in one run are paced.
    # (A new run's pacer knows nothing of the last run's requests: let their second pass.)
    change_model(
        project,
        "INSERT INTO main.erasure_requests SELECT 'C0003' || i FROM range(6) t(i)",
    )
    time.sleep(1.1)
    throttled = emulator.stats()["throttled"]
    paced = only(project, emulator, "erasure_requests")
    assert paced.row("erasure_requests")["removed"] == 6
    # Unpaced, 3 of the 6 would be refused. The pacer takes a request to arrive within
    # 50 ms of its sending; on a loaded machine one may arrive later and meet a 429, after
    # which the pacer counts from answers (klaviyo/pacing.py): one, at most.
    assert emulator.stats()["throttled"] - throttled <= 1


# -- Event: Send -------------------------------------------------------------------------


def recorded(emulator: Emulator) -> list[str]:
    return [e["unique_id"] for e in emulator.events()]


def test_each_order_is_sent_once(project: Path, emulator: Emulator) -> None:
    orders = model_rows(project, "SELECT * FROM main.order_events")
    first = only(project, emulator, "order_events")
    assert first.returncode == 0, first.output
    assert first.row("order_events")["added"] == len(orders)
    assert sorted(recorded(emulator)) == sorted(r["order_id"] for r in orders)
    events = {e["unique_id"]: e for e in emulator.events()}
    one = orders[0]
    assert events[one["order_id"]]["metric"] == "Placed Order"
    assert events[one["order_id"]]["value"] == float(one["amount"])
    assert events[one["order_id"]]["properties"] == {"sku": one["sku"], "quantity": one["quantity"]}
    # one request per 1,000 events
    assert emulator.stats()["requests_by_operation"]["bulk_create_events"] == 1

    before = writes(emulator)
    assert only(project, emulator, "order_events").row("order_events")["unchanged"] == len(orders)
    assert writes(emulator) == before

    done = run_dbt(project, "run", "--select", "order_events", "--vars", "{demo_step: 1}")
    assert done.returncode == 0, done.stdout
    more = only(project, emulator, "order_events")
    assert more.returncode == 0, more.output
    assert more.row("order_events")["added"] == 10  # O000001's corrected amount is not resent
    assert len(recorded(emulator)) == len(orders) + 10

    refresh = only(project, emulator, "order_events", "--full-refresh")
    assert refresh.row("order_events")["added"] == 0
    assert len(recorded(emulator)) == len(set(recorded(emulator))) == len(orders) + 10


def test_events_klaviyo_would_refuse_are_rejected_with_reasons(
    project: Path, emulator: Emulator
) -> None:
    change_model(
        project,
        """UPDATE main.order_events SET email = NULL, customer_id = NULL WHERE order_id = 'O000001';
           UPDATE main.order_events SET ordered_at = TIMESTAMP '1989-12-31 00:00:00'
               WHERE order_id = 'O000005';
           UPDATE main.order_events SET currency = 'dollars' WHERE order_id = 'O000003'""",
    )
    done = only(project, emulator, "order_events")
    assert done.returncode == 1
    assert done.row("order_events")["rejected"] == 3, done.output
    assert "'O000001'" in done.stdout and "phone number alone" in done.stdout
    assert "'O000005' ordered_at" in done.stdout and "before 1990" in done.stdout
    assert "'O000003' currency" in done.stdout and "ISO 4217" in done.stdout
    assert not {"O000001", "O000003", "O000005"} & set(recorded(emulator))

    change_model(
        project, "UPDATE main.order_events SET currency = 'EUR' WHERE order_id = 'O000003'"
    )
    fixed = only(project, emulator, "order_events")
    assert fixed.row("order_events")["added"] == 1
    assert "O000003" in recorded(emulator)


def test_an_event_whose_identifiers_are_on_two_profiles_is_accepted_for_the_email(
    project: Path, emulator: Emulator
) -> None:
    """Klaviyo answers bulk event creation 202, "validated and submitted for processing"
    (API.md §2.9): a conflict only the account shows is no refusal. The event is recorded
    on the profile its email names, so the row is synced; the external id stays where it is."""
    order = model_rows(project, "SELECT * FROM main.order_events ORDER BY order_id LIMIT 1")[0]
    for attributes in ({"email": order["email"]}, {"external_id": order["customer_id"]}):
        body = {"data": {"type": "profile", "attributes": attributes}}
        klaviyo_api(emulator, "POST", "/api/profile-import", body)
    by_email = {p["attributes"]["email"]: p["id"] for p in emulator.profiles()}
    done = only(project, emulator, "order_events")
    assert done.returncode == 0, done.output
    assert done.row("order_events")["rejected"] == 0
    [event] = [e for e in emulator.events() if e["unique_id"] == order["order_id"]]
    assert event["profile_id"] == by_email[order["email"]]
    assert by_external_id(emulator)[order["customer_id"]]["attributes"]["email"] is None


def test_a_refused_event_request_rejects_the_event_pointed_at_and_fails_none_else(
    project: Path, emulator: Emulator
) -> None:
    """Fault injection, as Klaviyo refuses a bulk request only as a whole: a 4xx pointing at
    an event rejects it and the rest go again; one pointing at nothing fails them all."""
    orders = model_rows(project, "SELECT * FROM main.order_events")
    emulator.inject(
        status=400,
        operation="bulk_create_events",
        pointer="/data/attributes/events-bulk-create/data/0/attributes/events/data/0",
    )
    emulator.inject(status=409, operation="bulk_create_events")
    refused = only(project, emulator, "order_events")
    assert refused.returncode == 1, refused.output
    row = refused.row("order_events")
    assert (row["rejected"], row["failed"], row["added"]) == (1, len(orders) - 1, 0)
    again = only(project, emulator, "order_events")
    assert again.row("order_events")["added"] == len(orders) - 1
    assert len(recorded(emulator)) == len(orders) - 1


def test_a_killed_event_sync_sends_each_event_once(project: Path, emulator: Emulator) -> None:
    # 6,000 orders: six requests of 1,000.
    change_model(
        project,
        """INSERT INTO main.order_events
           SELECT 'X' || i, 'buyer' || i || '@example.com', NULL, TIMESTAMP '2024-06-01',
                  1.0, 'USD', 'SKU-X', 1
           FROM range(5500) t(i)""",
    )
    emulator.set_rate_limit("bulk_create_events", burst=2, steady=1000)
    kill_when(
        project,
        emulator,
        lambda e: e.stats()["requests_by_operation"].get("bulk_create_events", 0) >= 3,
        select="order_events",
    )
    with duckdb.connect(str(project / ".klaviyo_sync" / "state.duckdb"), read_only=True) as con:
        [(committed,)] = con.execute(
            "SELECT count(*) FROM snapshot WHERE fingerprint IS NOT NULL"
        ).fetchall()
    sent_by_killed_run = settled(emulator)

    rerun = only(project, emulator, "order_events")

    orders = [r["order_id"] for r in model_rows(project, "SELECT order_id FROM main.order_events")]
    assert rerun.returncode == 0, rerun.output
    # The re-run sends exactly the events the killed run had not committed ...
    assert rerun.row("order_events")["added"] == len(orders) - committed
    assert emulator.stats()["events_received"] - sent_by_killed_run == len(orders) - committed
    # ... so the only events Klaviyo sees twice are those the killed run had sent but not
    # yet committed, and Klaviyo drops those repeats by unique_id: each order is held once.
    assert emulator.stats()["events_repeated"] <= sent_by_killed_run - committed
    assert sorted(recorded(emulator)) == sorted(orders)


def settled(emulator: Emulator) -> int:
    """Events received once the killed run's requests in flight have been answered."""
    seen = -1
    while (now := emulator.stats()["events_received"]) != seen:
        seen = now
        time.sleep(0.5)
    return seen
