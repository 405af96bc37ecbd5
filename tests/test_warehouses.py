"""Every end-to-end promise, on each warehouse: DuckDB (the state in a local file) and
PostgreSQL (the state in a schema of the warehouse, the diff in SQL there). Each test runs
the real CLI against the emulator, once per warehouse (`-k postgres` picks PostgreSQL's)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from dbt_klaviyo_sync.emulator import Emulator
from dbt_klaviyo_sync.warehouse.adapter import READ_BATCH_ROWS
from tests.conftest import (
    Sync,
    change_model,
    dbt_klaviyo,
    kill_when,
    make_emulator,
    model_rows,
    pg_database,
    run_dbt,
    start_sync,
    sync,
    wait_for,
)

LIST_ID = "VipLst"


def only(project: Path, emulator: Emulator, *models_and_flags: str) -> Sync:
    return sync(project, emulator, "--select", *models_and_flags)


def held(emulator: Emulator) -> dict[str, dict[str, Any]]:
    return {p["attributes"]["external_id"]: p["attributes"] for p in emulator.profiles()}


def customers(project: Path) -> dict[str, dict[str, Any]]:
    rows = model_rows(project, "SELECT customer_id, email, city FROM main.customers")
    return {r["customer_id"]: r for r in rows}


def assert_holds_customers(project: Path, emulator: Emulator) -> None:
    profiles = held(emulator)
    wanted = customers(project)
    assert set(profiles) == set(wanted)
    for key, row in wanted.items():
        assert (profiles[key].get("location") or {}).get("city") == row["city"], key


def test_profiles_first_sync_then_only_changes(warehouse_project: Path, emulator: Emulator) -> None:
    project = warehouse_project
    first = only(project, emulator, "customers")
    assert first.returncode == 0, first.output
    assert first.row("customers")["added"] == 1200
    assert_holds_customers(project, emulator)

    again = only(project, emulator, "customers")
    assert again.row("customers") | {"requests": 0} == {
        "added": 0,
        "updated": 0,
        "removed": 0,
        "unchanged": 1200,
        "rejected": 0,
        "failed": 0,
        "requests": 0,
    }

    change_model(
        project,
        """UPDATE main.customers SET city = 'Oslo' WHERE customer_id IN ('C00001', 'C00002');
           DELETE FROM main.customers WHERE customer_id = 'C00003';
           INSERT INTO main.customers (customer_id, email, first_name, signup_date)
           VALUES ('C09999', 'new.one@example.com', 'New', DATE '2024-05-01')""",
    )
    changed = only(project, emulator, "customers")
    assert changed.returncode == 0, changed.output
    counts = changed.row("customers")
    assert (counts["added"], counts["updated"], counts["removed"]) == (1, 2, 1)
    assert counts["unchanged"] == 1197
    assert held(emulator)["C00001"]["location"]["city"] == "Oslo"
    assert "C09999" in held(emulator)


def test_a_dry_run_sends_nothing_and_keeps_nothing(
    warehouse_project: Path, emulator: Emulator
) -> None:
    plan = only(warehouse_project, emulator, "customers", "--dry-run")
    assert plan.returncode == 0, plan.output
    assert plan.row("customers")["added"] == 1200
    assert sum(emulator.stats()["requests_by_operation"].values()) == 0
    database = pg_database(warehouse_project)
    if database is None:
        assert not (warehouse_project / ".klaviyo_sync").exists()
    else:
        with database.connect() as con, con.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'klaviyo_sync'")
            assert cursor.fetchone() == (0,)  # not even the schema is left behind


def test_the_list_mirrors_the_model(warehouse_project: Path, emulator: Emulator) -> None:
    emulator.create_list("VIPs", list_id=LIST_ID)
    project = warehouse_project
    assert only(project, emulator, "vip_audience").returncode == 0
    [first] = model_rows(project, "SELECT email FROM main.vip_audience ORDER BY email LIMIT 1")
    change_model(
        project,
        f"""UPDATE main.vip_audience SET email = 'renamed@example.com'
            WHERE email = '{first["email"]}';
            DELETE FROM main.vip_audience WHERE customer_id IN (
                SELECT customer_id FROM main.vip_audience ORDER BY customer_id LIMIT 5)""",
    )
    moved = only(project, emulator, "vip_audience")
    assert moved.returncode == 0, moved.output
    ids = emulator.list_members(LIST_ID)
    members = {p["attributes"]["email"] for p in emulator.profiles() if p["id"] in ids}
    assert members == {
        r["email"] for r in model_rows(project, "SELECT email FROM main.vip_audience")
    }


def test_update_only_and_delete(warehouse_project: Path, emulator: Emulator) -> None:
    project = warehouse_project
    assert only(project, emulator, "customers").returncode == 0
    updates = only(project, emulator, "loyalty_updates")
    assert updates.returncode == 1, updates.output  # C99999 is not in Klaviyo
    assert (
        updates.row("loyalty_updates")["updated"],
        updates.row("loyalty_updates")["rejected"],
    ) == (100, 1)
    again = only(project, emulator, "loyalty_updates")
    assert again.returncode == 1 and again.row("loyalty_updates")["rejected"] == 1

    deleted = only(project, emulator, "erasure_requests")
    assert deleted.returncode == 0, deleted.output
    assert deleted.row("erasure_requests")["removed"] == 2
    assert only(project, emulator, "erasure_requests").row("erasure_requests")["removed"] == 0
    assert len(emulator.deletions()) == 2  # each once


def test_events_are_sent_once_even_when_a_run_is_killed(
    warehouse_project: Path, emulator: Emulator
) -> None:
    project = warehouse_project
    change_model(
        project,
        """INSERT INTO main.order_events (order_id, email, customer_id, ordered_at, amount,
                                         currency, sku, quantity)
           SELECT 'X' || i, 'buyer' || i || '@example.com', NULL, TIMESTAMP '2024-06-01',
                  1.0, 'USD', 'SKU-X', 1
           FROM (SELECT row_number() OVER () AS i FROM main.customers) AS numbers""",
    )
    emulator.set_rate_limit("bulk_create_events", burst=1, steady=100_000)
    kill_when(
        project,
        emulator,
        lambda e: e.stats()["requests_by_operation"].get("bulk_create_events", 0) >= 1,
        select="order_events",
    )
    rerun = only(project, emulator, "order_events")
    assert rerun.returncode == 0, rerun.output
    orders = [r["order_id"] for r in model_rows(project, "SELECT order_id FROM main.order_events")]
    recorded = Counter(e["unique_id"] for e in emulator.events())
    assert sorted(recorded) == sorted(orders)
    assert max(recorded.values()) == 1


def test_a_killed_bulk_job_is_followed_not_sent_again(warehouse_project: Path) -> None:
    with make_emulator(job_seconds=3) as slow:
        kill_when(
            warehouse_project,
            slow,
            lambda e: (
                e.stats()["requests_by_operation"].get("get_bulk_import_profiles_job", 0) >= 1
            ),
        )
        rerun = only(warehouse_project, slow, "customers")
        assert rerun.returncode == 0, rerun.output
        assert "followed bulk job" in rerun.stderr
        assert slow.stats()["requests_by_operation"]["bulk_import_profiles"] == 1
        assert len(slow.profiles()) == 1200


def test_faults_and_rejects(warehouse_project: Path, emulator: Emulator) -> None:
    project = warehouse_project
    change_model(
        project, "UPDATE main.customers SET email = 'not-an-email' WHERE customer_id = 'C00007'"
    )
    emulator.inject(status=503, count=2, operation="bulk_import_profiles")
    emulator.inject(status=400, count=1, operation="bulk_import_profiles")  # the whole job
    refused = only(project, emulator, "customers")
    assert refused.returncode == 1, refused.output
    assert refused.row("customers")["failed"] == 1199  # the refusal was about no record
    assert refused.row("customers")["rejected"] == 1  # C00007, by our own check
    done = only(project, emulator, "customers")
    assert done.returncode == 1, done.output  # C00007 still stands refused
    assert done.row("customers")["added"] == 1199 and done.row("customers")["rejected"] == 1
    rejects = dbt_klaviyo(
        project, emulator, "rejects", "customers", "--project-dir", ".", "--profiles-dir", "."
    )
    assert rejects.returncode == 0, rejects.output
    assert "C00007" in rejects.stdout and "not a valid email" in rejects.stdout
    status = dbt_klaviyo(project, emulator, "status", "--project-dir", ".", "--profiles-dir", ".")
    assert status.returncode == 0 and "customers" in status.stdout
    unknown = [
        dbt_klaviyo(project, emulator, command, "custmers", "--project-dir", ".")
        for command in ("status", "rejects")
    ]
    assert [done.returncode for done in unknown] == [2, 2]
    assert unknown[0].stderr == unknown[1].stderr
    assert "model 'custmers' has never been synced" in unknown[0].stderr
    assert emulator.stats()["retry_after_violations"] == 0


def test_validate_fails_for_keys_the_sync_would_reject(
    warehouse_project: Path, emulator: Emulator
) -> None:
    """A NULL or duplicated sync key is a reject on the next sync: validate says so, over
    the whole model, with the key normalised as the diff keys rows."""
    project = warehouse_project
    emulator.create_list("VIP customers", list_id=LIST_ID)
    change_model(
        project,
        "UPDATE main.customers SET customer_id = NULL WHERE customer_id = 'C00001'; "
        "UPDATE main.customers SET customer_id = 'C00003' WHERE customer_id = 'C00002'",
    )
    done = dbt_klaviyo(project, emulator, "validate", "--project-dir", ".", "--profiles-dir", ".")
    assert done.returncode == 2, done.output
    assert "model 'customers', column 'customer_id': 1 row with a NULL sync key" in done.stdout
    assert "1 sync key on more than one row (C00003)" in done.stdout


def test_dbt_reads_the_history_in_the_warehouse_through_the_packages_sources(
    pg_project: Path, emulator: Emulator
) -> None:
    """On DuckDB the state file is attached in profiles.yml (see test_workflow); elsewhere
    the sources point at the state schema, with nothing to set up."""
    assert only(pg_project, emulator, "customers").returncode == 0
    shown = run_dbt(
        pg_project,
        "show",
        "--inline",
        "select model, status, added from {{ source('klaviyo_sync', 'runs') }}",
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "customers" in shown.stdout and "1200" in shown.stdout


def test_two_syncs_of_one_model_never_run_at_once(pg_project: Path) -> None:
    """On PostgreSQL the sync holds a lock in the warehouse for its model (on DuckDB, the
    state file's own lock: see test_sync_safety)."""
    with make_emulator(job_seconds=3) as slow:
        first = start_sync(pg_project, slow, "customers")
        wait_for(lambda: bool(slow.stats()["requests_by_operation"].get("bulk_import_profiles")))
        second = only(pg_project, slow, "customers")
        out, err = first.communicate(timeout=120)
        assert second.returncode == 2, second.output
        assert "is being synced by another dbt-klaviyo run" in second.output
        assert first.returncode == 0, out + err
        assert only(pg_project, slow, "customers").row("customers")["unchanged"] == 1200


def test_changes_larger_than_a_read_batch_all_go(pg_project: Path, emulator: Emulator) -> None:
    """The change rows come from PostgreSQL a batch at a time (READ_BATCH_ROWS): every
    batch is sent, the last short one too."""
    extra = READ_BATCH_ROWS + READ_BATCH_ROWS // 2
    change_model(
        pg_project,
        f"""INSERT INTO main.customers (customer_id, email, first_name, signup_date)
            SELECT 'X' || lpad(i::text, 6, '0'), 'extra.' || i || '@example.com', 'Extra',
                   DATE '2024-05-01'
            FROM generate_series(1, {extra}) AS g(i)""",
    )
    first = only(pg_project, emulator, "customers")
    assert first.returncode == 0, first.output
    assert first.row("customers")["added"] == 1200 + extra
    assert_holds_customers(pg_project, emulator)
