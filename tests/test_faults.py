"""Klaviyo misbehaving: every fault ends with each record synced or left pending for the
next run, attempts bounded, and no request ever sent before its Retry-After."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import Sync, change_model, model_rows, sync_customers


def held(emulator: Emulator) -> set[str]:
    return {p["attributes"]["external_id"] for p in emulator.profiles()}


def customers(project: Path) -> set[str]:
    return {r["customer_id"] for r in model_rows(project)}


def then_clean_run_completes(project: Path, emulator: Emulator) -> Sync:
    """Whatever the fault left pending goes on the next, clean run; nothing is lost."""
    again = sync_customers(project, emulator)
    assert again.returncode == 0, again.output
    assert held(emulator) == customers(project)
    assert emulator.stats()["retry_after_violations"] == 0
    return again


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param(
            [
                dict(status=503, count=3, operation="bulk_import_profiles"),
                dict(status=500, count=2, operation="get_bulk_import_profiles_job"),
                dict(status=502, count=1, operation="get_profiles"),
            ],
            id="5xx-bursts",
        ),
        pytest.param(
            [
                dict(kind="reset", count=2, operation="bulk_import_profiles"),
                dict(kind="reset", count=2, operation="get_bulk_import_profiles_job"),
            ],
            id="connection-resets",
        ),
        pytest.param(
            [dict(kind="reset", count=1, operation="bulk_import_profiles", after=True)],
            id="answer-lost-after-the-job-was-created",
        ),
        pytest.param(
            [
                dict(kind="malformed", count=2, operation="get_bulk_import_profiles_job"),
                dict(kind="malformed", count=1, operation="bulk_import_profiles"),
            ],
            id="malformed-json",
        ),
        pytest.param(
            [
                dict(status=429, count=3, operation="bulk_import_profiles", retry_after=1),
                dict(status=429, count=3, operation="get_bulk_import_profiles_job", retry_after=1),
            ],
            id="429-storm",
        ),
    ],
)
def test_passing_faults_are_retried_and_everything_syncs(
    project: Path, emulator: Emulator, faults: list[dict]
) -> None:
    for fault in faults:
        emulator.inject(**fault)
    done = sync_customers(project, emulator)
    assert done.returncode == 0, done.output
    assert held(emulator) == customers(project)
    assert emulator.stats()["retry_after_violations"] == 0
    # Bounded: at most the retries the faults cost, on top of one job and its polls.
    assert emulator.stats()["requests_by_operation"]["bulk_import_profiles"] <= 1 + 3


def test_read_timeouts_are_retried(project: Path, emulator: Emulator) -> None:
    emulator.inject(kind="delay", seconds=2, count=2, operation="get_bulk_import_profiles_job")
    done = sync_customers(project, emulator, "--timeout", "0.5")
    assert done.returncode == 0, done.output
    assert held(emulator) == customers(project)


def test_a_job_stuck_in_processing_leaves_its_rows_for_the_next_run(
    project: Path, emulator: Emulator
) -> None:
    emulator.inject(kind="job_stuck")
    stuck = sync_customers(project, emulator, "--job-timeout", "2")
    assert stuck.returncode == 1, stuck.output
    assert stuck.row("customers")["failed"] == 1200
    assert "did not finish within 2 s" in stuck.stdout
    # The next run looks at the job once: still running, and older than the job timeout,
    # it is given up and its rows sent again.
    again = sync_customers(project, emulator, "--job-timeout", "1")
    assert again.returncode == 0, again.output
    assert again.row("customers")["added"] == 1200
    assert held(emulator) == customers(project)


def test_a_refusal_of_the_whole_request_rejects_no_record(
    project: Path, emulator: Emulator
) -> None:
    """Klaviyo (or a proxy in front of it) refuses a whole job, pointing at no profile: that
    says nothing about the records in it. None is marked rejected; all go again, and the
    next healthy run leaves Klaviyo holding every one (issue 10, B1)."""
    emulator.inject(status=400, count=1, operation="bulk_import_profiles")
    refused = sync_customers(project, emulator)
    assert refused.returncode == 1, refused.output
    assert refused.row("customers")["rejected"] == 0
    assert refused.row("customers")["failed"] == 1200
    assert "Klaviyo refused the whole request, not this record" in refused.stdout
    assert emulator.stats()["requests_by_operation"]["bulk_import_profiles"] == 1
    again = then_clean_run_completes(project, emulator)
    assert again.row("customers")["added"] == 1200


def test_whole_requests_refused_again_and_again_stop_the_model_loudly(
    project: Path, emulator: Emulator
) -> None:
    change_model(project, "DELETE FROM main.customers WHERE customer_id > 'C00060'")
    emulator.inject(status=404, count=1000, operation="create_or_update_profile")
    stopped = sync_customers(project, emulator)
    assert stopped.returncode == 2, stopped.output
    assert stopped.row("customers")["rejected"] == 0
    assert stopped.row("customers")["failed"] == 60
    assert "requests in a row as a whole, for no record in them" in stopped.output
    sent = emulator.stats()["requests_by_operation"]["create_or_update_profile"]
    assert sent < 60  # it stopped sending, instead of trying every record in turn


def test_a_refusal_that_points_at_a_record_rejects_only_that_record(
    project: Path, emulator: Emulator
) -> None:
    emulator.inject(
        status=400,
        operation="bulk_import_profiles",
        pointer="/data/attributes/profiles/data/7/attributes/email",
    )
    done = sync_customers(project, emulator)
    assert done.returncode == 1, done.output
    assert done.row("customers")["rejected"] == 1
    assert done.row("customers")["added"] == 1199
    assert emulator.stats()["requests_by_operation"]["bulk_import_profiles"] == 2
    [line] = [text for text in done.stdout.splitlines() if "rejected customers" in text]
    assert " email: Injected by the emulator." in line


def test_fail_on_rejects_sets_the_share_of_rejects_that_fails_the_run(
    project: Path, emulator: Emulator
) -> None:
    one_bad = {"status": 400, "operation": "bulk_import_profiles"}
    emulator.inject(**one_bad, pointer="/data/attributes/profiles/data/7")
    tolerant = sync_customers(project, emulator, "--fail-on-rejects", "0.01")
    assert tolerant.returncode == 0, tolerant.output  # 1 of 1,200 is under 1%
    assert tolerant.row("customers")["rejected"] == 1

    emulator.inject(**one_bad, pointer="/data/attributes/profiles/data/3")
    strict = sync_customers(project, emulator, "--full-refresh", "--fail-on-rejects", "0.0001")
    assert strict.row("customers")["rejected"] == 1
    assert strict.returncode == 1  # 1 of 1,200 is over 0.01%
