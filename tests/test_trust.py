"""Issue 10's findings end to end: each of these once lost data silently, or stopped
with a traceback. Each runs the real CLI against the emulator over loopback."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import duckdb
import orjson
import pytest

from dbt_klaviyo_sync.emulator import Emulator
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient
from dbt_klaviyo_sync.klaviyo.lists import ListRemover
from dbt_klaviyo_sync.spec import FieldMap, SyncSpec
from tests.conftest import (
    PRIVATE_KEY,
    PUBLIC_KEY,
    Sync,
    change_model,
    dbt_klaviyo,
    kill_when,
    klaviyo_api,
    make_emulator,
    model_rows,
    start_sync,
    sync,
    wait_for,
)

LIST_ID = "VipLst"
STATE = Path(".klaviyo_sync") / "state.duckdb"


def only(project: Path, emulator: Emulator, *models_and_flags: str) -> Sync:
    return sync(project, emulator, "--select", *models_and_flags)


def members(emulator: Emulator, account: str | None = None) -> dict[str, str]:
    """Each list member's email, by profile id."""
    ids = emulator.list_members(LIST_ID, account=account)
    return {
        p["id"]: p["attributes"]["email"]
        for p in emulator.profiles(account=account)
        if p["id"] in ids
    }


def vips(project: Path) -> set[str]:
    return {r["email"] for r in model_rows(project, "SELECT email FROM main.vip_audience")}


@pytest.fixture
def vip_list(emulator: Emulator) -> str:
    return emulator.create_list("VIPs", list_id=LIST_ID)


# -- B3: a member whose key changes stays in the list -------------------------------------


def test_a_member_whose_email_changes_stays_in_the_list(
    project: Path, emulator: Emulator, vip_list: str
) -> None:
    assert only(project, emulator, "vip_audience").returncode == 0
    [row] = model_rows(project, "SELECT * FROM main.vip_audience ORDER BY email LIMIT 1")
    change_model(
        project,
        "UPDATE main.vip_audience SET email = 'renamed@example.com' "
        f"WHERE email = '{row['email']}'",
    )
    moved = only(project, emulator, "vip_audience")
    assert moved.returncode == 0, moved.output
    assert set(members(emulator).values()) == vips(project)
    again = only(project, emulator, "vip_audience")
    assert again.row("vip_audience")["added"] == 0 and again.row("vip_audience")["removed"] == 0
    assert set(members(emulator).values()) == vips(project)


# -- B4: one stale member never blocks a list's removals -----------------------------------


def test_a_profile_deleted_in_klaviyo_does_not_block_the_other_removals(
    project: Path, emulator: Emulator, vip_list: str
) -> None:
    assert only(project, emulator, "vip_audience").returncode == 0
    gone = sorted(members(emulator).items(), key=lambda m: m[1])[:3]
    # One of the leaving members was deleted in Klaviyo meanwhile (by hand, by a merge).
    klaviyo_api(
        emulator,
        "POST",
        "/api/data-privacy-deletion-jobs",
        {
            "data": {
                "type": "data-privacy-deletion-job",
                "attributes": {
                    "profile": {"data": {"type": "profile", "id": gone[0][0], "attributes": {}}}
                },
            }
        },
    )
    wait_for(lambda: all(d["completed_at"] for d in emulator.deletions()))
    emails = ", ".join(f"'{email}'" for _, email in gone)
    change_model(project, f"DELETE FROM main.vip_audience WHERE email IN ({emails})")
    done = only(project, emulator, "vip_audience")
    assert done.returncode == 0, done.output
    assert set(members(emulator).values()) == vips(project)


def test_a_removal_that_names_a_vanished_profile_still_removes_the_rest(
    emulator: Emulator, vip_list: str
) -> None:
    """Between the lookup and the removal a profile can vanish; Klaviyo then refuses the
    whole request, pointing at it. The rest are removed."""
    ids = [
        klaviyo_api(
            emulator,
            "POST",
            "/api/profile-import",
            {"data": {"type": "profile", "attributes": {"email": f"m{i}@example.com"}}},
        )["data"]["id"]
        for i in range(3)
    ]
    klaviyo_api(
        emulator,
        "POST",
        f"/api/lists/{LIST_ID}/relationships/profiles",
        {"data": [{"type": "profile", "id": i} for i in ids]},
    )
    spec = SyncSpec(
        "vip",
        "model.x.vip",
        '"x"',
        "list",
        "mirror",
        "email",
        "email",
        (FieldMap("email", "email"),),
        list_id=LIST_ID,
    )
    client = KlaviyoClient(emulator.url, PRIVATE_KEY, PUBLIC_KEY)
    try:
        ListRemover(client, spec)._remove([ids[0], "01NOSUCHPROFILE0000000000", ids[2]])
    finally:
        client.close()
    assert emulator.list_members(LIST_ID) == {ids[1]}


# -- B6: another account behind the same URL is another sync -------------------------------


def test_another_account_gets_everything_sent_to_it(project: Path, emulator: Emulator) -> None:
    first = sync(project, emulator, "--select", "customers", "order_events")
    assert first.returncode == 0, first.output
    other = emulator.add_account("pk_other_account_key_0000", "Other1")
    switched = sync(
        project,
        emulator,
        "--select",
        "customers",
        "order_events",
        env={
            "KLAVIYO_PRIVATE_API_KEY": "pk_other_account_key_0000",
            "KLAVIYO_PUBLIC_API_KEY": "Other1",
        },
    )
    assert switched.returncode == 0, switched.output
    assert switched.row("customers")["added"] == 1200
    orders = len(model_rows(project, "SELECT order_id FROM main.order_events"))
    assert switched.row("order_events")["added"] == orders
    assert len(emulator.profiles(account=other)) == 1200
    assert len(emulator.events(account=other)) == orders
    # and back: the first account's sync kept its state, nothing to send
    back = sync(project, emulator, "--select", "customers", "order_events")
    assert back.row("customers")["unchanged"] == 1200 and back.row("customers")["added"] == 0


# -- B7: an event Klaviyo may hold goes again exactly as it went -------------------------


def test_an_event_whose_answer_was_lost_is_resent_as_it_was_even_after_its_row_changed(
    project: Path, emulator: Emulator
) -> None:
    # Klaviyo records the batch, but the answer never arrives.
    emulator.inject(kind="reset", count=1, operation="bulk_create_events", after=True)
    emulator.inject(kind="reset", count=5, operation="bulk_create_events")
    lost = only(project, emulator, "order_events")
    assert lost.returncode == 1, lost.output
    recorded = len(emulator.events())
    assert recorded > 0
    # Then the buyer's email is corrected before the next run.
    change_model(project, "UPDATE main.order_events SET email = 'fixed-' || email")
    again = only(project, emulator, "order_events")
    assert again.returncode == 0, again.output
    orders = [r["order_id"] for r in model_rows(project, "SELECT order_id FROM main.order_events")]
    held = Counter(e["unique_id"] for e in emulator.events())
    assert sorted(held) == sorted(orders) and max(held.values()) == 1
    assert len(emulator.events()) == recorded  # Klaviyo dropped every repeat


# -- B9: the safety brake ------------------------------------------------------------------


def test_a_run_that_would_empty_a_list_stops_before_sending(
    project: Path, emulator: Emulator, vip_list: str
) -> None:
    assert only(project, emulator, "vip_audience", "customers").returncode == 0
    before = members(emulator)
    # As if the sync read another database file than the one it synced from last time.
    change_model(project, "DELETE FROM main.vip_audience WHERE email NOT LIKE '%1@%'")
    braked = only(project, emulator, "vip_audience", "customers")
    assert braked.returncode == 2, braked.output
    assert "would remove from list VipLst" in braked.output
    assert "--allow-removals" in braked.output and "warehouse.duckdb" in braked.output
    assert members(emulator) == before
    assert braked.row("customers")["unchanged"] == 1200  # the other model went on
    confirmed = only(project, emulator, "vip_audience", "--allow-removals")
    assert confirmed.returncode == 0, confirmed.output
    assert set(members(emulator).values()) == vips(project)


# -- D5: signals and kills -------------------------------------------------------------------


def test_sigterm_stops_commits_what_was_answered_and_records_the_run(
    project: Path, emulator: Emulator
) -> None:
    change_model(
        project,
        """INSERT INTO main.order_events
           SELECT 'X' || i, 'buyer' || i || '@example.com', NULL, TIMESTAMP '2024-06-01',
                  1.0, 'USD', 'SKU-X', 1 FROM range(5500) t(i)""",
    )
    # Two requests go (the first alone, until its answer tells the limits), the others
    # wait a minute for the steady window: the signal always lands with work left, however
    # slow the machine.
    emulator.set_rate_limit("bulk_create_events", burst=1, steady=2)
    process = start_sync(project, emulator, "order_events")
    wait_for(lambda: emulator.stats()["requests_by_operation"].get("bulk_create_events", 0) >= 2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, out + err
    assert "order_events" in out and "Traceback" not in out + err
    assert "Interrupted: stopped on request" in out
    with duckdb.connect(str(project / STATE), read_only=True) as con:
        [(status,)] = con.execute("SELECT status FROM runs").fetchall()
        [(committed,)] = con.execute(
            "SELECT count(*) FROM snapshot WHERE fingerprint IS NOT NULL"
        ).fetchall()
    assert status == "interrupted"
    assert committed == len({e["unique_id"] for e in emulator.events()})  # every answer kept
    emulator.set_rate_limit("bulk_create_events", burst=1000, steady=100_000)
    rerun = only(project, emulator, "order_events")
    assert rerun.returncode == 0, rerun.output
    orders = model_rows(project, "SELECT order_id FROM main.order_events")
    assert Counter(e["unique_id"] for e in emulator.events()).most_common(1)[0][1] == 1
    assert len(emulator.events()) == len(orders)


def test_a_bulk_job_of_a_killed_run_is_followed_not_sent_again(project: Path) -> None:
    with make_emulator(job_seconds=3) as slow:
        kill_when(
            project,
            slow,
            lambda e: (
                e.stats()["requests_by_operation"].get("get_bulk_import_profiles_job", 0) >= 1
            ),
        )
        with duckdb.connect(str(project / STATE), read_only=True) as con:
            [(journaled, with_values)] = con.execute(
                "SELECT count(*), count(accepted_values) FROM journal"
            ).fetchall()
        assert journaled == 1200 and with_values == 0  # values go with the answer, not here
        rerun = sync(project, slow, "--select", "customers")
        assert rerun.returncode == 0, rerun.output
        assert "followed bulk job" in rerun.stderr
        assert slow.stats()["requests_by_operation"]["bulk_import_profiles"] == 1
        assert rerun.row("customers")["added"] == 1200
        assert len(slow.profiles()) == 1200
        # Recorded as accepted with their values unknown: nothing to send again.
        again = sync(project, slow, "--select", "customers")
        assert again.returncode == 0, again.output
        assert again.row("customers")["unchanged"] == 1200
        assert slow.stats()["requests_by_operation"]["bulk_import_profiles"] == 1


# -- D4: no internal error ------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        dict(kind="raw", status=202, body=b"", operation="bulk_import_profiles"),
        dict(kind="raw", status=202, body=b"{}", operation="bulk_import_profiles"),
        dict(kind="raw", status=200, body=b"null", operation="get_bulk_import_profiles_job"),
        dict(
            kind="raw",
            status=200,
            body=b'{"data": {"id": "x"}}',
            operation="get_bulk_import_profiles_job",
        ),
        dict(
            kind="raw",
            status=429,
            headers={"Retry-After": "soon"},
            operation="bulk_import_profiles",
        ),
        dict(
            kind="raw", status=429, headers={"Retry-After": "inf"}, operation="bulk_import_profiles"
        ),
    ],
    ids=["empty-202", "no-job-id", "null-job", "job-without-attributes", "retry-soon", "retry-inf"],
)
def test_odd_answers_fail_records_for_the_next_run_without_a_traceback(
    project: Path, emulator: Emulator, fault: dict
) -> None:
    emulator.inject(**fault)
    done = sync(project, emulator, "--select", "customers", "--output", "json")
    assert "Traceback" not in done.output and "Internal error" not in done.output
    assert done.stdout.lstrip().startswith("{")
    assert done.returncode in (0, 1), done.output
    again = sync(project, emulator, "--select", "customers")
    assert again.returncode == 0, again.output
    assert {p["attributes"]["external_id"] for p in emulator.profiles()} == {
        r["customer_id"] for r in model_rows(project)
    }


def test_an_ephemeral_model_stops_alone_with_a_clear_message(
    project: Path, emulator: Emulator
) -> None:
    schema = project / "models" / "vip_audience.sql"
    schema.write_text(
        schema.read_text().replace("materialized='table'", "materialized='ephemeral'")
    )
    emulator.create_list("VIPs", list_id=LIST_ID)
    done = sync(project, emulator, "--select", "vip_audience", "customers")
    assert done.returncode == 2, done.output
    assert "Traceback" not in done.output
    assert "materialized as ephemeral" in done.output
    assert done.row("customers")["added"] == 1200


def test_history_after_a_first_sync_that_could_not_read_its_models(
    project: Path, emulator: Emulator
) -> None:
    warehouse = project / "warehouse.duckdb"
    warehouse.rename(project / "aside.duckdb")
    failed = sync(project, emulator)
    assert failed.returncode == 2
    assert not (project / STATE).exists()  # no empty state is left behind
    # An empty state file, as earlier versions left in this case, reads as no syncs yet ...
    (project / STATE).parent.mkdir()
    duckdb.connect(str(project / STATE)).close()
    for command in (("status",), ("rejects", "customers")):
        done = dbt_klaviyo(project, emulator, *command, "--project-dir", ".")
        assert "Traceback" not in done.output and "Internal error" not in done.output
    status = dbt_klaviyo(project, emulator, "status", "--project-dir", ".")
    assert status.returncode == 0 and "No syncs recorded" in status.stdout
    # ... and still gets the warning a first sync deserves.
    (project / "aside.duckdb").rename(warehouse)
    first = sync(project, emulator, "--select", "order_events")
    assert first.returncode == 0, first.output
    assert "no sync state at" in first.stderr


# -- C2: what a server echoes back never carries the key anywhere ---------------------------


def test_a_key_echoed_in_a_refusal_reaches_no_output_reject_or_state(
    project: Path, emulator: Emulator
) -> None:
    change_model(project, "DELETE FROM main.customers WHERE customer_id > 'C00010'")
    echoed = {
        "errors": [
            {
                "id": "e1",
                "code": "invalid",
                "title": "Invalid input.",
                "detail": f"Authorization: Klaviyo-API-Key {PRIVATE_KEY} is not allowed here",
                "source": {"pointer": "/data/attributes/email"},
            }
        ]
    }

    def echo_once() -> None:
        emulator.inject(
            kind="raw",
            status=400,
            body=orjson.dumps(echoed),
            headers={"Content-Type": "application/vnd.api+json"},
            operation="create_or_update_profile",
        )

    echo_once()
    text = sync(project, emulator, "--select", "customers")
    assert text.returncode == 1 and text.row("customers")["rejected"] == 1, text.output
    echo_once()
    as_json = sync(project, emulator, "--select", "customers", "--full-refresh", "--output", "json")
    rejects = dbt_klaviyo(project, emulator, "rejects", "customers", "--project-dir", ".")
    outputs = text.output + as_json.output + rejects.output
    assert "[redacted key]" in outputs
    assert PRIVATE_KEY not in outputs
    assert PRIVATE_KEY.encode() not in (project / STATE).read_bytes()
