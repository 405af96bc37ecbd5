"""Klaviyo misbehaving: every fault ends with each record synced or left pending for the
next run, attempts bounded, and no request ever sent before its Retry-After."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import Sync, model_rows, sync_customers


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
    again = then_clean_run_completes(project, emulator)
    assert again.row("customers")["added"] == 1200


def test_a_record_that_sinks_every_request_it_is_in_is_isolated(
    project: Path, emulator: Emulator
) -> None:
    """Klaviyo refuses the whole job, pointing at nothing: the job is halved until the bad
    profile stands alone, so the other 1,199 still go."""
    poison = next(r["email"] for r in model_rows(project) if r["customer_id"] == "C00042")
    emulator.inject(status=400, count=100, operation="bulk_import_profiles", body_contains=poison)
    done = sync_customers(project, emulator)
    assert done.returncode == 1, done.output
    assert done.row("customers")["rejected"] == 1
    assert "rejected customers 'C00042'" in done.stdout
    assert held(emulator) == customers(project) - {"C00042"}
    # log2(1,200) halvings, not one request per profile
    assert emulator.stats()["requests_by_operation"]["bulk_import_profiles"] < 30


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
