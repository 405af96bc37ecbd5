"""Nothing lost, nothing sent twice needlessly: kills, stale manifests, `dbt clean`."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import pytest

from dbt_klaviyo_sync.emulator import Emulator
from dbt_klaviyo_sync.warehouse.duckdb.state import _MIGRATIONS, SCHEMA_VERSION
from tests.conftest import (
    change_model,
    kill_when,
    make_emulator,
    model_rows,
    run_dbt,
    set_model_meta,
    start_sync,
    sync,
    sync_customers,
    wait_for,
)

STATE = Path(".klaviyo_sync") / "state.duckdb"


def committed(project: Path) -> int:
    """How many rows the state says Klaviyo has accepted."""
    with duckdb.connect(str(project / STATE), read_only=True) as con:
        [(count,)] = con.execute(
            "SELECT count(*) FROM snapshot WHERE fingerprint IS NOT NULL"
        ).fetchall()
    return int(count)


def assert_rerun_sends_only_the_rest(project: Path, emulator: Emulator) -> None:
    total = len(model_rows(project))
    done_before = committed(project)
    rerun = sync_customers(project, emulator)
    assert rerun.returncode == 0, rerun.output
    assert rerun.row("customers")["added"] == total - done_before
    assert committed(project) == total
    held = {p["attributes"]["external_id"] for p in emulator.profiles()}
    assert held == {r["customer_id"] for r in model_rows(project)}


def test_a_sync_killed_between_single_requests_resends_only_what_was_not_committed(
    project: Path, emulator: Emulator
) -> None:
    set_model_meta(project, api="client")
    change_model(project, "DELETE FROM main.customers WHERE customer_id > 'C00800'")
    emulator.set_rate_limit("create_client_profile", burst=200, steady=100_000)
    # At 200 a second, answers are committed every 2 s (COMMIT_SECONDS): by 650, some are in.
    kill_when(project, emulator, lambda e: e.stats()["writes"] >= 650)
    assert 0 < committed(project) < 800
    assert_rerun_sends_only_the_rest(project, emulator)


def test_a_sync_killed_while_a_bulk_job_runs_loses_nothing(
    project: Path, emulator: Emulator
) -> None:
    # 12,000 customers: two bulk import jobs.
    change_model(
        project,
        """INSERT INTO main.customers (customer_id, email, first_name, signup_date, lifetime_value)
           SELECT 'X' || i, 'x' || i || '@example.com', 'X', DATE '2024-01-01', 1
           FROM range(10800) t(i)""",
    )
    slow = make_emulator(job_seconds=30)
    with slow:
        kill_when(
            project,
            slow,
            lambda e: (
                e.stats()["requests_by_operation"].get("get_bulk_import_profiles_job", 0) >= 1
            ),
        )
        assert committed(project) == 0
    assert_rerun_sends_only_the_rest(project, emulator)


def test_records_that_failed_for_a_passing_reason_are_sent_next_run(
    project: Path, emulator: Emulator
) -> None:
    emulator.inject(status=503, count=100, operation="bulk_import_profiles")
    failed = sync_customers(project, emulator)
    assert failed.returncode == 1, failed.output
    assert failed.row("customers")["failed"] == 1200
    # Attempts are bounded: six for the job, then it is left for the next run.
    assert emulator.stats()["requests_by_operation"]["bulk_import_profiles"] == 6
    emulator.reset()
    assert "sent again next run" in failed.stdout
    assert emulator.profiles() == []

    again = sync_customers(project, emulator)
    assert again.returncode == 0, again.output
    assert again.row("customers")["added"] == 1200
    assert len(emulator.profiles()) == 1200


def test_a_missing_or_stale_manifest_is_rebuilt_with_dbt_parse(
    project: Path, emulator: Emulator
) -> None:
    (project / "target" / "manifest.json").unlink()
    first = sync_customers(project, emulator)
    assert first.returncode == 0, first.output
    assert (project / "target" / "manifest.json").exists()

    # A new annotation in the YAML reaches the sync without the user running dbt parse.
    time.sleep(0.01)
    schema = project / "models" / "schema.yml"
    schema.write_text(
        schema.read_text().replace("field: location.country", "field: location.region")
    )
    second = sync_customers(project, emulator)
    assert second.returncode == 0, second.output
    assert second.row("customers")["updated"] == 1200
    assert "region" in emulator.profiles()[0]["attributes"]["location"]


def test_the_state_survives_dbt_clean(project: Path, emulator: Emulator) -> None:
    assert sync_customers(project, emulator).returncode == 0
    cleaned = run_dbt(project, "clean")
    assert cleaned.returncode == 0, cleaned.stdout
    assert (project / STATE).exists()
    assert run_dbt(project, "deps").returncode == 0
    again = sync_customers(project, emulator)
    assert again.returncode == 0, again.output
    assert again.row("customers")["unchanged"] == 1200


def test_the_state_can_live_elsewhere(project: Path, emulator: Emulator, tmp_path: Path) -> None:
    elsewhere = tmp_path / "states" / "klaviyo.duckdb"
    assert sync_customers(project, emulator, "--state", str(elsewhere)).returncode == 0
    assert elsewhere.exists() and not (project / STATE).exists()
    again = sync_customers(project, emulator, env={"DBT_KLAVIYO_STATE": str(elsewhere)})
    assert again.row("customers")["unchanged"] == 1200


@pytest.mark.parametrize("damage", ["garbage", "newer"])
def test_a_damaged_or_newer_state_file_is_refused_clearly(
    project: Path, emulator: Emulator, damage: str
) -> None:
    state = project / STATE
    state.parent.mkdir(parents=True)
    if damage == "garbage":
        state.write_bytes(b"this is not a DuckDB file" * 100)
    else:
        with duckdb.connect(str(state)) as con:
            con.execute("CREATE TABLE meta AS SELECT 'schema_version' AS key, '99' AS value")
    done = sync_customers(project, emulator)
    assert done.returncode == 2
    assert str(state) in done.stderr or "schema version 99" in done.stderr
    assert sum(emulator.stats()["requests_by_operation"].values()) <= 1  # the key check only


def test_two_syncs_at_once_the_second_refuses_and_nothing_is_corrupted(
    project: Path, emulator: Emulator
) -> None:
    with make_emulator(job_seconds=3) as slow:
        first = start_sync(project, slow, "customers")
        wait_for(lambda: bool(slow.stats()["requests_by_operation"].get("bulk_import_profiles")))
        second = sync_customers(project, slow)
        out, err = first.communicate(timeout=120)
        assert second.returncode == 2
        assert "in use by another dbt-klaviyo sync" in second.stderr
        assert first.returncode == 0, out + err
        # The state the first sync left is whole: a re-run has nothing to do.
        assert sync_customers(project, slow).row("customers")["unchanged"] == 1200


def test_an_older_state_file_is_migrated_in_place(project: Path, emulator: Emulator) -> None:
    """A version 1 file (md5 fingerprints, no error column) from before the upgrade: the
    events it records as sent stay sent."""
    assert sync(project, emulator, "--select", "order_events").returncode == 0
    with duckdb.connect(str(project / STATE), read_only=True) as con:
        syncs = con.execute(
            "SELECT sync_id, model, unique_id, object, behavior, list_id, target, base_url "
            "FROM syncs"
        ).fetchall()
        keys = [k for (k,) in con.execute("SELECT key FROM snapshot").fetchall()]
    (project / STATE).unlink()
    with duckdb.connect(str(project / STATE)) as con:
        for ddl in _MIGRATIONS[1]:
            con.execute(ddl)
        con.execute("CREATE TABLE meta AS SELECT 'schema_version' AS key, '1' AS value")
        con.executemany("INSERT INTO syncs VALUES (?, ?, ?, ?, ?, ?, ?, ?, now())", syncs)
        con.executemany(
            "INSERT INTO snapshot VALUES (?, ?, md5(?), '{}', NULL, NULL, now())",
            [(syncs[0][0], key, key) for key in keys],
        )
    events = len(emulator.events())

    plan = sync(project, emulator, "--select", "order_events", "--dry-run")
    assert plan.returncode == 0, plan.output
    assert plan.row("order_events")["added"] == 0  # the plan reads the old state as it is
    again = sync(project, emulator, "--select", "order_events")

    assert again.returncode == 0, again.output
    assert again.row("order_events")["added"] == 0
    assert len(emulator.events()) == events
    with duckdb.connect(str(project / STATE), read_only=True) as con:
        assert con.execute("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION),)]
        columns = {c[0] for c in con.execute("DESCRIBE runs").fetchall()}
        assert {"error", "rate_limit_seconds"} <= columns


def test_a_missing_state_is_said_out_loud_before_events_are_sent(
    project: Path, emulator: Emulator
) -> None:
    done = sync(project, emulator, "--select", "order_events")
    assert done.returncode == 0, done.output
    assert "no sync state at" in done.stderr
    assert "order_events would otherwise send each of its events and deletions a second time" in (
        done.stderr
    )
    assert "again" not in done.stderr  # a first sync sends nothing again
    again = sync(project, emulator, "--select", "order_events")
    assert "no sync state" not in again.stderr


def test_keys_are_not_sent_in_clear_to_another_machine(project: Path) -> None:
    done = sync(project, None, env={"KLAVIYO_BASE_URL": "http://klaviyo.example.com"})
    assert done.returncode == 2
    assert "plain HTTP" in done.stderr and "DBT_KLAVIYO_ALLOW_INSECURE_HTTP" in done.stderr
