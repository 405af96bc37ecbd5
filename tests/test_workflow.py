"""The workflow around a sync: plan, JSON output and the Python API, run history, rejects,
validate, `--build`, logging and progress. Real dbt, the real CLI, the emulator over HTTP."""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import time
from pathlib import Path

import pytest
from rich.console import Console

import dbt_klaviyo_sync
from dbt_klaviyo_sync.emulator import Emulator
from dbt_klaviyo_sync.progress import BarProgress
from tests.conftest import (
    BIN,
    PRIVATE_KEY,
    PUBLIC_KEY,
    change_model,
    clean_env,
    dbt_klaviyo,
    klaviyo_api,
    run_dbt,
    sync,
    sync_customers,
)

LIST_ID = "VipLst"


def writes(emulator: Emulator) -> int:
    return int(emulator.stats()["writes"])


# -- Plan -------------------------------------------------------------------------------


def test_plan_shows_counts_rejects_and_changed_fields_old_and_new(
    project: Path, emulator: Emulator
) -> None:
    assert sync_customers(project, emulator).returncode == 0
    change_model(
        project,
        """UPDATE main.customers SET first_name = 'Zed' WHERE customer_id = 'C00007';
           UPDATE main.customers SET email = 'broken' WHERE customer_id = 'C00008';
           DELETE FROM main.customers WHERE customer_id = 'C00009'""",
    )
    before = writes(emulator)
    state = project / ".klaviyo_sync" / "state.duckdb"
    state_bytes = state.read_bytes()

    plan = dbt_klaviyo(
        project, emulator, "plan", "--project-dir", ".", "--profiles-dir", ".", "-s", "customers"
    )

    assert plan.returncode == 1, plan.output  # a reject would happen
    assert writes(emulator) == before and state.read_bytes() == state_bytes
    out = plan.stdout
    assert "Dry run: nothing was sent" in out
    assert "customers (profile upsert): 0 to create, 1 to update" in out
    assert "1 left the model (kept in Klaviyo)" in out
    # Only the changed field, old and new.
    line = next(line for line in out.splitlines() if "C00007" in line)
    assert "first_name:" in line and "-> 'Zed'" in line and "email" not in line
    assert "would reject customers 'C00008' email" in out


def test_plan_of_a_first_sync_shows_new_records_in_full(project: Path, emulator: Emulator) -> None:
    plan = dbt_klaviyo(project, emulator, "plan", "--project-dir", ".", "--profiles-dir", ".")
    assert plan.returncode == 0, plan.output
    out = plan.stdout
    assert "customers (profile upsert): 1,200 to create" in out
    assert "order_events (event send):" in out and "events to send" in out
    assert "erasure_requests (profile delete):" in out and "profiles to delete" in out
    add = next(line for line in out.splitlines() if line.strip().startswith("add") and "C0" in line)
    assert "email: NULL -> '" in add
    # Five samples per model; erasure_requests has only two rows.
    assert len([line for line in out.splitlines() if line.strip().startswith("add")]) == 4 * 5 + 2
    assert writes(emulator) == 0


# -- JSON output and the Python API ------------------------------------------------------


def test_json_output_is_one_summary_with_counts_requests_and_durations(
    project: Path, emulator: Emulator
) -> None:
    done = sync(project, emulator, "--select", "customers", "--output", "json")
    assert done.returncode == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["exit_status"] == 0 and summary["reason"] == "synced"
    [model] = summary["models"]
    assert model["model"] == "customers" and model["status"] == "ok"
    assert model["added"] == 1200 and model["requests"] >= 1 and model["seconds"] > 0
    assert summary["requests"] == model["requests"]
    assert "┃" not in done.stdout  # no table mixed in


def test_json_output_carries_the_exit_reason_when_the_sync_cannot_run(
    project: Path, emulator: Emulator
) -> None:
    done = sync(
        project,
        emulator,
        "--output",
        "json",
        env={"KLAVIYO_PRIVATE_API_KEY": "pk_wrong_key_for_the_test"},
        isolated=True,
    )
    assert done.returncode == 2
    summary = json.loads(done.stdout)
    assert summary["exit_status"] == 2 and summary["reason"] == "could not run"
    assert "refused the API key" in summary["error"]
    assert "pk_wrong_key_for_the_test" not in done.output


def test_the_python_api_returns_the_same_summary(
    project: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "KLAVIYO_PRIVATE_API_KEY": PRIVATE_KEY,
        "KLAVIYO_PUBLIC_API_KEY": PUBLIC_KEY,
        "KLAVIYO_BASE_URL": emulator.url,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(project)
    # As in an orchestrator that never configured logging for us.
    monkeypatch.setattr(logging.getLogger("dbt_klaviyo_sync"), "level", logging.NOTSET)
    summary = dbt_klaviyo_sync.sync(project, profiles_dir=project, select=["loyalty_updates"])
    # loyalty_updates updates profiles that do not exist yet: all "not found".
    assert summary.exit_status == 1 and summary.reason == "records rejected"
    first = summary.models[0]
    assert first.counts.updated == 0 and first.counts.rejected > 0

    summary = dbt_klaviyo_sync.sync(project, profiles_dir=project, select=["customers"])
    assert summary.exit_status == 0
    as_dict = summary.to_dict()
    assert as_dict["models"][0]["added"] == 1200
    json.dumps(as_dict)  # plain JSON types only

    problem = dbt_klaviyo_sync.sync(project, profiles_dir=project, select=["no_such_model"])
    assert problem.exit_status == 2 and "no_such_model" in (problem.error or "")
    assert "customers: 1200 rows" in (project / "target" / "dbt-klaviyo.log").read_text()


# -- History and rejects ----------------------------------------------------------------


def test_status_shows_each_models_last_runs(project: Path, emulator: Emulator) -> None:
    assert sync_customers(project, emulator).returncode == 0
    assert sync_customers(project, emulator).returncode == 0
    sync(project, emulator, "--select", "loyalty_updates")

    text = dbt_klaviyo(project, None, "status")
    assert text.returncode == 0, text.output
    assert "customers" in text.stdout and "loyalty_updates" in text.stdout

    runs = json.loads(dbt_klaviyo(project, None, "status", "customers", "--output", "json").stdout)
    assert [r["added"] for r in runs] == [0, 1200]  # newest first
    assert all(r["status"] == "ok" and r["seconds"] is not None for r in runs)

    loyalty = json.loads(
        dbt_klaviyo(project, None, "status", "loyalty_updates", "--output", "json").stdout
    )
    assert loyalty[0]["status"] == "rejects" and loyalty[0]["rejected"] == 1


def test_rejects_lists_open_rejects_and_exports_them_to_csv(
    project: Path, emulator: Emulator
) -> None:
    assert sync_customers(project, emulator).returncode == 0
    assert sync(project, emulator, "--select", "loyalty_updates").returncode == 1

    shown = dbt_klaviyo(project, None, "rejects", "loyalty_updates")
    assert shown.returncode == 0, shown.output
    assert "C99999" in shown.stdout and "no profile" in shown.stdout

    exported = project / "rejects.csv"
    done = dbt_klaviyo(project, None, "rejects", "loyalty_updates", "--csv", str(exported))
    assert done.returncode == 0 and "1 rejected record of loyalty_updates" in done.stdout
    rows = list(csv.DictReader(exported.open()))
    assert [r["key"] for r in rows] == ["C99999"]
    assert rows[0]["code"] == "not_found" and "no profile" in rows[0]["reason"]

    # Once the row is fixed (C99999 now exists in Klaviyo), it is no longer an open reject,
    # but the log keeps it.
    change_model(
        project,
        "UPDATE main.loyalty_updates SET customer_id = 'C00500' WHERE customer_id = 'C99999'",
    )
    assert sync(project, emulator, "--select", "loyalty_updates").returncode == 0
    assert "C99999" not in dbt_klaviyo(project, None, "rejects", "loyalty_updates").stdout
    assert "C99999" in dbt_klaviyo(project, None, "rejects", "loyalty_updates", "--all").stdout


def test_rejects_of_a_model_never_synced_says_which_are(project: Path, emulator: Emulator) -> None:
    assert sync_customers(project, emulator).returncode == 0
    done = dbt_klaviyo(project, None, "rejects", "order_events")
    assert done.returncode == 2
    assert "never been synced" in done.stderr and "customers" in done.stderr


def test_history_commands_without_any_state_say_so(project: Path) -> None:
    done = dbt_klaviyo(project, None, "status")
    assert done.returncode == 2 and "nothing has been synced yet" in done.stderr


def test_dbt_reads_the_history_through_the_packages_sources(
    project: Path, emulator: Emulator
) -> None:
    assert sync_customers(project, emulator).returncode == 0
    profiles = project / "profiles.yml"
    profiles.write_text(
        profiles.read_text()
        + """      attach:
        - path: .klaviyo_sync/state.duckdb
          alias: klaviyo_sync
          read_only: true
"""
    )
    shown = run_dbt(
        project,
        "show",
        "--inline",
        "select model, added from {{ source('klaviyo_sync', 'runs') }}",
        "--output",
        "json",
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert '"added": 1200' in shown.stdout
    # The attached state does not confuse the sync, which opens the state file itself.
    again = sync_customers(project, emulator)
    assert again.returncode == 0, again.output
    assert again.row("customers")["unchanged"] == 1200


# -- Validate ---------------------------------------------------------------------------


def test_validate_checks_everything_and_sends_nothing(project: Path, emulator: Emulator) -> None:
    emulator.create_list("VIP customers", list_id=LIST_ID)
    done = dbt_klaviyo(project, emulator, "validate", "--project-dir", ".", "--profiles-dir", ".")
    assert done.returncode == 0, done.output
    assert done.stdout.count("ok") >= 3 and "FAIL" not in done.stdout
    assert writes(emulator) == 0


def test_validate_and_the_summary_name_the_account_the_key_writes_to(
    project: Path, emulator: Emulator
) -> None:
    emulator.create_list("VIP customers", list_id=LIST_ID)
    account = klaviyo_api(emulator, "GET", "/api/accounts")["data"][0]
    name = account["attributes"]["contact_information"]["organization_name"]
    shown = f"{name} ({account['id']})"
    checked = dbt_klaviyo(
        project, emulator, "validate", "--project-dir", ".", "--profiles-dir", "."
    )
    assert f"Klaviyo account {shown}" in checked.stdout, checked.output
    synced = sync_customers(project, emulator)
    assert f"Klaviyo account: {shown}\nKlaviyo sync " in synced.stdout, synced.output
    as_json = sync_customers(project, emulator, "--output", "json")
    assert json.loads(as_json.stdout)["account"] == shown


def test_validate_reports_every_problem_with_exit_2(project: Path, emulator: Emulator) -> None:
    change_model(project, "ALTER TABLE main.customers DROP COLUMN city")
    done = dbt_klaviyo(
        project,
        emulator,
        "validate",
        "--project-dir",
        ".",
        "--profiles-dir",
        ".",
        env={"KLAVIYO_PRIVATE_API_KEY": "pk_wrong_key_for_the_test"},
        isolated=True,
    )
    assert done.returncode == 2
    assert "model 'customers', column 'city'" in done.stdout
    assert "refused the API key" in done.stdout
    assert "pk_wrong_key_for_the_test" not in done.output
    assert writes(emulator) == 0


def test_validate_names_a_missing_list(project: Path, emulator: Emulator) -> None:
    done = dbt_klaviyo(project, emulator, "validate", "--project-dir", ".", "--profiles-dir", ".")
    assert done.returncode == 2
    assert LIST_ID in done.stdout and "vip_audience" in done.stdout


def test_validate_fails_when_the_database_is_missing(project: Path, emulator: Emulator) -> None:
    emulator.create_list("VIP customers", list_id=LIST_ID)
    (project / "warehouse.duckdb").unlink()
    done = dbt_klaviyo(project, emulator, "validate", "--project-dir", ".", "--profiles-dir", ".")
    assert done.returncode == 2, done.output
    assert "ok  each mapped column" not in done.stdout
    assert "warehouse.duckdb" in done.stdout


def test_an_error_is_printed_once(project: Path, emulator: Emulator) -> None:
    done = dbt_klaviyo(
        project,
        emulator,
        "sync",
        "--project-dir",
        ".",
        "--profiles-dir",
        ".",
        env={"KLAVIYO_PRIVATE_API_KEY": "pk_wrong_key_for_the_test"},
    )
    assert done.returncode == 2
    assert (done.stdout + done.stderr).count("refused the API key") == 1, done.output


# -- Build and sync ---------------------------------------------------------------------


def test_build_runs_dbt_first_and_syncs_what_built(project: Path, emulator: Emulator) -> None:
    # The model's SQL moves a day forward; only `dbt build` would pick that up.
    sql = project / "models" / "customers.sql"
    sql.write_text(sql.read_text().replace("var('demo_step', 0)", "var('demo_step', 1)"))
    assert sync_customers(project, emulator, "--build").returncode == 0
    assert sync_customers(project, emulator).row("customers")["unchanged"] == 1200


def test_build_does_not_sync_a_model_whose_tests_fail(project: Path, emulator: Emulator) -> None:
    sql = project / "models" / "customers.sql"
    sql.write_text(
        f"select * from ({sql.read_text()}) union all select * from ({sql.read_text()}) limit 1201"
    )
    done = sync_customers(project, emulator, "--build")
    assert done.returncode == 2, done.output
    assert "not synced" in done.output
    assert writes(emulator) == 0


# -- Logging and progress ----------------------------------------------------------------


def test_the_log_file_under_target_records_the_run_without_keys(
    project: Path, emulator: Emulator
) -> None:
    emulator.create_list("VIP customers", list_id=LIST_ID)
    done = sync(project, emulator, "--log-level", "debug", isolated=True)
    assert done.returncode in (0, 1), done.output
    log = (project / "target" / "dbt-klaviyo.log").read_text()
    assert "customers:" in log and "diff:" in log
    assert PRIVATE_KEY not in log and PUBLIC_KEY not in log


def test_quiet_leaves_only_the_summary(project: Path, emulator: Emulator) -> None:
    done = sync_customers(project, emulator, "--quiet")
    assert done.returncode == 0
    assert "diff:" not in done.stderr and "customers" in done.stdout


def test_the_progress_bar_shows_records_rate_eta_and_rate_limit_waits() -> None:
    out = io.StringIO()
    bar = BarProgress(Console(file=out, force_terminal=True, width=160))
    bar.start("customers", total=20_000)
    bar.advance(5_000, rate_limit_wait=0.0)
    time.sleep(0.3)
    bar.advance(5_000, rate_limit_wait=2.5)
    bar.finish()
    bar.close()
    shown = out.getvalue()
    assert "customers" in shown and "10000/20000" in shown
    assert "records/s" in shown and "ETA" in shown and "2.5 s waiting for rate limits" in shown


def test_no_progress_bar_off_a_terminal(project: Path, emulator: Emulator) -> None:
    done = sync_customers(project, emulator, isolated=True)
    assert done.returncode == 0
    assert "records/s" not in done.output


def test_the_console_script_has_every_command() -> None:
    shown = subprocess.run(
        [str(BIN / "dbt-klaviyo"), "--help"], env=clean_env(), capture_output=True, text=True
    )
    listed = {
        line.split()[0] for line in shown.stdout.split("Commands:")[1].splitlines() if line.strip()
    }
    assert listed == {"sync", "plan", "status", "rejects", "report", "validate", "emulator", "init"}
