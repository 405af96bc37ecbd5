"""Consent (`object: subscription`) and suppression (`object: suppression`) end to end.

Each test adds a small model of its own to a copy of the demo project, builds it with dbt,
and syncs it with the real CLI against the emulator, which keeps consent per channel, list
membership, suppressions and every global unsubscribe, so that a test can assert that
nobody was ever unsubscribed globally.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from dbt_klaviyo_sync.dbt import DbtArgs, DbtProject, select_models
from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import (
    Sync,
    change_model,
    clean_env,
    dbt_klaviyo,
    environment,
    klaviyo_api,
    run_dbt,
    shared_by_workers,
    sync,
)

LIST_ID = "NwsLtr"
#: email, phone, consent, consented_at
PEOPLE = [
    ("ann@example.com", "+12025550101", "true", "NULL"),
    ("bob@example.com", "+12025550102", "true", "NULL"),
    ("cat@example.com", "+12025550103", "false", "NULL"),
    ("dan@example.com", "+12025550104", "true", "NULL"),
    ("eve@example.com", "+12025550105", "false", "NULL"),
    ("hal@example.com", "+12025550106", "true", "NULL"),
]


def write_model(
    project: Path, name: str, rows: list[tuple[str, ...]], meta: str, columns: str
) -> None:
    """A table model `name` of (email, phone, consent, consented_at) rows, annotated with
    `meta` (model level) and `columns` (the columns' YAML)."""
    values = ",\n".join(
        f"('{email}', {_sql(phone)}, {flag}::BOOLEAN, {when}::TIMESTAMP)"
        for email, phone, flag, when in rows
    )
    (project / "models" / f"{name}.sql").write_text(
        "{{ config(materialized='table') }}\n"
        f"SELECT * FROM (VALUES {values}) AS t(email, phone, consent, consented_at)\n"
    )
    (project / "models" / f"{name}.yml").write_text(
        f"""version: 2
models:
  - name: {name}
    config:
      meta:
        klaviyo:
{_indent(meta, 10)}
    columns:
{_indent(columns, 6)}
"""
    )


def _sql(value: str) -> str:
    return "NULL" if value == "NULL" else f"'{value}'"


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.strip("\n").splitlines())


EMAIL_CONSENT = """
object: subscription
list_id: NwsLtr
custom_source: dbt consent model
"""
CONSENT_COLUMNS = """
- name: email
  config: {meta: {klaviyo: {sync_key: email}}}
- name: consent
  config: {meta: {klaviyo: {field: consent}}}
"""


def only(project: Path, emulator: Emulator, model: str, *args: str) -> Sync:
    return sync(project, emulator, "--select", model, *args)


def by_email(emulator: Emulator) -> dict[str, dict[str, Any]]:
    return {c["email"]: c for c in emulator.consent() if c["email"]}


def in_list(emulator: Emulator, channel: str, status: str) -> set[str]:
    """The emails whose `channel` consent for the list is `status`."""
    return {
        email
        for email, held in by_email(emulator).items()
        if held["channels"].get(channel, {}).get("lists", {}).get(LIST_ID) == status
    }


def members(emulator: Emulator) -> set[str]:
    ids = emulator.list_members(LIST_ID)
    return {p["attributes"]["email"] for p in emulator.profiles() if p["id"] in ids}


def consent_calls(emulator: Emulator) -> dict[str, int]:
    counts = emulator.stats()["requests_by_operation"]
    names = ("bulk_subscribe_profiles", "bulk_unsubscribe_profiles")
    names += ("bulk_suppress_profiles", "bulk_unsuppress_profiles")
    return {name: counts.get(name, 0) for name in names}


@pytest.fixture
def newsletter(emulator: Emulator) -> str:
    return emulator.create_list("Newsletter", list_id=LIST_ID)


def test_email_consent_mirrors_the_model_and_never_unsubscribes_anyone_globally(
    project: Path, emulator: Emulator, newsletter: str
) -> None:
    # eve is in Klaviyo already, in no list: her false consent must not touch her.
    klaviyo_api(
        emulator,
        "POST",
        "/api/profile-import",
        {"data": {"type": "profile", "attributes": {"email": "eve@example.com"}}},
    )

    first = only(project, emulator, "email_consent")
    assert first.returncode == 0, first.output
    counts = first.row("email_consent")
    # cat and eve withdrew consent but are in no list: left alone, so not "updated".
    assert (counts["added"], counts["updated"], counts["unchanged"]) == (4, 0, 2)
    subscribed = {"ann@example.com", "bob@example.com", "dan@example.com", "hal@example.com"}
    assert in_list(emulator, "email_marketing", "SUBSCRIBED") == subscribed
    assert members(emulator) == subscribed
    held = by_email(emulator)
    assert held["ann@example.com"]["channels"]["email_marketing"]["custom_source"] == (
        "dbt consent model"
    )
    assert "sms_marketing" not in held["ann@example.com"]["channels"]  # only channels named
    assert "eve@example.com" not in held and "cat@example.com" not in held

    calls = consent_calls(emulator)
    assert only(project, emulator, "email_consent").returncode == 0
    assert consent_calls(emulator) == calls  # nothing changed, nothing sent

    # Someone else takes ann off the list; then ann and bob leave the model, cat (never
    # subscribed) leaves it too, dan withdraws consent and fay joins.
    ann = next(
        p["id"] for p in emulator.profiles() if p["attributes"]["email"] == "ann@example.com"
    )
    klaviyo_api(
        emulator,
        "DELETE",
        f"/api/lists/{LIST_ID}/relationships/profiles",
        {"data": [{"type": "profile", "id": ann}]},
    )
    change_model(
        project,
        """DELETE FROM main.email_consent
               WHERE email IN ('ann@example.com', 'bob@example.com', 'cat@example.com');
           UPDATE main.email_consent SET consent = false WHERE email = 'dan@example.com';
           INSERT INTO main.email_consent VALUES ('fay@example.com', NULL, true, NULL)""",
    )
    third = only(project, emulator, "email_consent")
    assert third.returncode == 0, third.output
    counts = third.row("email_consent")
    assert (counts["added"], counts["updated"], counts["removed"]) == (1, 1, 3)
    assert members(emulator) == {"fay@example.com", "hal@example.com"}
    # ann's consent record stays: taking her off the list did not change it (Klaviyo's
    # rule), and unsubscribing a non-member would unsubscribe her globally, so she is left
    # alone, and the log says so.
    assert in_list(emulator, "email_marketing", "SUBSCRIBED") == {
        "ann@example.com",
        "fay@example.com",
        "hal@example.com",
    }
    # bob and dan were members: unsubscribed from this list's consent only.
    assert in_list(emulator, "email_marketing", "UNSUBSCRIBED") == {
        "bob@example.com",
        "dan@example.com",
    }
    assert emulator.global_unsubscribes() == []
    assert by_email(emulator)["bob@example.com"]["suppression"] is None
    assert "not in list NwsLtr, left alone" in third.stderr

    calls = consent_calls(emulator)
    assert only(project, emulator, "email_consent").returncode == 0
    assert consent_calls(emulator) == calls


def test_the_plan_speaks_of_subscribing_and_unsubscribing(
    project: Path, emulator: Emulator, newsletter: str
) -> None:
    plan = only(project, emulator, "email_consent", "--dry-run")
    assert plan.returncode == 0, plan.output
    said = "4 to subscribe, 2 to unsubscribe, 0 to unsubscribe as they left the model"
    assert said in plan.stdout
    assert consent_calls(emulator) == dict.fromkeys(consent_calls(emulator), 0)


def test_validate_checks_the_consent_list_and_sends_nothing(
    project: Path, emulator: Emulator
) -> None:
    argv = ("validate", "--project-dir", ".", "--profiles-dir", ".", "--select", "email_consent")
    missing = dbt_klaviyo(project, emulator, *argv)
    assert missing.returncode == 2
    assert LIST_ID in missing.stdout and "email_consent" in missing.stdout
    emulator.create_list("Newsletter", list_id=LIST_ID)
    done = dbt_klaviyo(project, emulator, *argv)
    assert done.returncode == 0, done.output
    assert consent_calls(emulator) == dict.fromkeys(consent_calls(emulator), 0)


def test_a_subscribe_model_never_unsubscribes(
    project: Path, emulator: Emulator, newsletter: str
) -> None:
    assert only(project, emulator, "consent_log").returncode == 0
    change_model(project, "DELETE FROM main.consent_log WHERE email = 'ann@example.com'")
    done = only(project, emulator, "consent_log")
    assert done.returncode == 0, done.output
    assert consent_calls(emulator)["bulk_unsubscribe_profiles"] == 0
    assert "ann@example.com" in members(emulator)


SMS_CONSENT = """
object: subscription
list_id: NwsLtr
channels: [email_marketing, sms_marketing]
"""
SMS_COLUMNS = (
    CONSENT_COLUMNS
    + """
- name: phone
  config: {meta: {klaviyo: {field: phone_number}}}
"""
)


def test_sms_consent_without_a_phone_is_refused_for_that_row_only(
    project: Path, emulator: Emulator, newsletter: str
) -> None:
    done = only(project, emulator, "sms_consent")
    assert done.returncode == 1, done.output
    assert done.row("sms_consent")["rejected"] == 1
    assert done.row("sms_consent")["added"] == 2
    assert "'bob@example.com'" in done.stdout and "sms consent needs phone_number" in done.stdout
    assert in_list(emulator, "sms_marketing", "SUBSCRIBED") == {
        "ann@example.com",
        "cat@example.com",
    }
    assert in_list(emulator, "email_marketing", "SUBSCRIBED") == {
        "ann@example.com",
        "cat@example.com",
    }


HISTORICAL_COLUMNS = (
    CONSENT_COLUMNS
    + """
- name: consented_at
  config: {meta: {klaviyo: {field: consented_at}}}
"""
)


def test_historical_consent_is_imported_and_a_future_one_refused(
    project: Path, emulator: Emulator, newsletter: str
) -> None:
    done = only(project, emulator, "historical_consent")
    assert done.returncode == 1, done.output
    assert done.row("historical_consent")["rejected"] == 1
    assert "'cat@example.com'" in done.stdout and "in the future" in done.stdout
    held = {email: c["channels"]["email_marketing"] for email, c in by_email(emulator).items()}
    assert held["ann@example.com"]["historical_import"] is True
    assert held["ann@example.com"]["consented_at"].startswith("2024-03-01T10:00:00")
    assert held["bob@example.com"]["historical_import"] is False
    assert held["bob@example.com"]["consented_at"] is None
    assert "cat@example.com" not in held


def test_a_null_consent_is_refused_with_the_fix(
    project: Path, emulator: Emulator, newsletter: str
) -> None:
    done = only(project, emulator, "unsure_consent")
    assert done.returncode == 1, done.output
    assert "'ann@example.com' consent" in done.stdout and "consent is NULL" in done.stdout
    assert in_list(emulator, "email_marketing", "SUBSCRIBED") == {"bob@example.com"}


SUPPRESSION_COLUMNS = """
- name: email
  config: {meta: {klaviyo: {sync_key: email}}}
- name: consent
  config: {meta: {klaviyo: {field: suppressed}}}
"""


def test_suppression_mirrors_the_model(project: Path, emulator: Emulator) -> None:
    first = only(project, emulator, "suppressed")
    assert first.returncode == 0, first.output
    suppressed = {e for e, c in by_email(emulator).items() if c["suppression"]}
    assert suppressed == {"ann@example.com", "bob@example.com"}
    assert by_email(emulator)["ann@example.com"]["suppression"] == "USER_SUPPRESSED"
    # cat was never suppressed, and unsuppressing an unknown email creates nobody.
    assert "cat@example.com" not in {p["attributes"]["email"] for p in emulator.profiles()}

    calls = consent_calls(emulator)
    assert only(project, emulator, "suppressed").returncode == 0
    assert consent_calls(emulator) == calls

    change_model(
        project,
        """DELETE FROM main.suppressed WHERE email = 'bob@example.com';
           UPDATE main.suppressed SET consent = false WHERE email = 'ann@example.com'""",
    )
    third = only(project, emulator, "suppressed")
    assert third.returncode == 0, third.output
    counts = third.row("suppressed")
    assert (counts["added"], counts["updated"], counts["removed"]) == (0, 1, 1)
    assert not any(c["suppression"] for c in emulator.consent())
    calls = consent_calls(emulator)
    assert only(project, emulator, "suppressed").returncode == 0
    assert consent_calls(emulator) == calls


MODELS = {
    "email_consent": (PEOPLE, EMAIL_CONSENT, CONSENT_COLUMNS),
    "consent_log": (PEOPLE, EMAIL_CONSENT + "behavior: subscribe\n", CONSENT_COLUMNS),
    "sms_consent": (
        [
            ("ann@example.com", "+12025550101", "true", "NULL"),
            ("bob@example.com", "NULL", "true", "NULL"),
            ("cat@example.com", "+12025550103", "true", "NULL"),
        ],
        SMS_CONSENT,
        SMS_COLUMNS,
    ),
    "historical_consent": (
        [
            ("ann@example.com", "NULL", "true", "'2024-03-01 10:00:00'"),
            ("bob@example.com", "NULL", "true", "NULL"),
            ("cat@example.com", "NULL", "true", "'2999-01-01 00:00:00'"),
        ],
        EMAIL_CONSENT,
        HISTORICAL_COLUMNS,
    ),
    "unsure_consent": (
        [("ann@example.com", "NULL", "NULL", "NULL"), ("bob@example.com", "NULL", "true", "NULL")],
        EMAIL_CONSENT,
        CONSENT_COLUMNS,
    ),
    "suppressed": (
        [
            ("ann@example.com", "NULL", "true", "NULL"),
            ("bob@example.com", "NULL", "true", "NULL"),
            ("cat@example.com", "NULL", "false", "NULL"),
        ],
        "object: suppression",
        SUPPRESSION_COLUMNS,
    ),
}


@pytest.fixture(scope="module")
def built_consent(built_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo project with the models above, built and parsed once for the test run."""
    return shared_by_workers(
        tmp_path_factory, "consent", lambda folder: _build_consent(built_project, folder)
    )


def _build_consent(built_project: Path, folder: Path) -> Path:
    project = Path(shutil.copytree(built_project, folder / "p", symlinks=True))
    for name, (rows, meta, columns) in MODELS.items():
        write_model(project, name, rows, meta, columns)
    built = run_dbt(project, "run", "--select", *MODELS)
    assert built.returncode == 0, built.stdout + built.stderr
    with environment(project, clean_env()):
        select_models(DbtProject.locate(DbtArgs(project_dir=".", profiles_dir=".")))
    return project


@pytest.fixture
def project(built_consent: Path, tmp_path: Path) -> Path:
    """A private copy of the project with the consent models."""
    return Path(shutil.copytree(built_consent, tmp_path / "project", symlinks=True))
