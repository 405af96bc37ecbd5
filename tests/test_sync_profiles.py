"""Profile upsert end to end: real dbt, the real CLI, the emulator over HTTP on loopback."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path
from typing import Any

import duckdb
import requests

from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import (
    PRIVATE_KEY,
    PUBLIC_KEY,
    change_model,
    klaviyo_api,
    model_rows,
    run_dbt,
    set_model_meta,
    sync,
    sync_customers,
)


def expected(row: dict[str, Any]) -> dict[str, Any]:
    """What Klaviyo should hold for a row of the demo's customers model."""
    properties = {
        "lifetime_value": float(row["lifetime_value"]),
        "is_vip": row["is_vip"],
        "signup_date": row["signup_date"].isoformat(),
    }
    if row["last_order_at"] is not None:  # nulls: skip leaves it unset
        properties["last_order_at"] = row["last_order_at"].replace(tzinfo=UTC).isoformat()
    return {
        "external_id": row["customer_id"],
        "email": row["email"],
        "phone_number": row["phone"],
        "first_name": row["first_name"],
        "last_name": row["last_name"],
        "city": row["city"],
        "country": row["country"],
        "properties": properties,
    }


def held(emulator: Emulator) -> dict[str, dict[str, Any]]:
    """The emulator's profiles, by external_id, in the same shape as `expected`."""
    found = {}
    for profile in emulator.profiles():
        a = profile["attributes"]
        location = a.get("location") or {}
        found[a["external_id"]] = {
            "external_id": a["external_id"],
            "email": a.get("email"),
            "phone_number": a.get("phone_number"),
            "first_name": a.get("first_name"),
            "last_name": a.get("last_name"),
            "city": location.get("city"),
            "country": location.get("country"),
            "properties": {k: v for k, v in (a.get("properties") or {}).items()},
        }
    return found


def assert_holds_model(project: Path, emulator: Emulator, also: set[str] = frozenset()) -> None:
    rows = {r["customer_id"]: expected(r) for r in model_rows(project)}
    klaviyo = held(emulator)
    assert set(klaviyo) == set(rows) | also
    for key, want in rows.items():
        assert klaviyo[key] == want, key


def test_first_sync_sends_everything_and_a_rerun_sends_nothing(
    project: Path, emulator: Emulator
) -> None:
    first = sync_customers(project, emulator)
    assert first.returncode == 0, first.output
    assert first.row("customers") | {"requests": 0} == {
        "added": 1200,
        "updated": 0,
        "removed": 0,
        "unchanged": 0,
        "rejected": 0,
        "failed": 0,
        "requests": 0,
    }
    assert_holds_model(project, emulator)
    stats = emulator.stats()
    # 1,200 changed profiles go as one bulk import job, not 1,200 requests.
    assert stats["requests_by_operation"]["bulk_import_profiles"] == 1
    assert "create_or_update_profile" not in stats["requests_by_operation"]
    assert stats["spec_violations"] == 0
    # Each accepted row's memo came back with its answer, through the journal: the re-run
    # computes no row's MD5.
    with duckdb.connect(str(project / ".klaviyo_sync" / "state.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(memo), count(*) FROM snapshot").fetchall() == [
            (1200, 1200)
        ]

    writes_before = stats["writes"]
    second = sync_customers(project, emulator)
    assert second.returncode == 0, second.output
    assert second.row("customers")["unchanged"] == 1200
    assert second.row("customers")["added"] == second.row("customers")["updated"] == 0
    assert emulator.stats()["writes"] == writes_before


def test_a_dbt_change_sends_exactly_the_changed_rows(project: Path, emulator: Emulator) -> None:
    assert sync_customers(project, emulator).returncode == 0
    done = run_dbt(project, "run", "--vars", "{demo_step: 1}")
    assert done.returncode == 0, done.stdout
    before = emulator.stats()

    second = sync_customers(project, emulator)

    assert second.returncode == 0, second.output
    assert second.row("customers") | {"requests": 0} == {
        "added": 1,
        "updated": 3,
        "removed": 1,
        "unchanged": 1196,
        "rejected": 0,
        "failed": 0,
        "requests": 0,
    }
    after = emulator.stats()
    sent = after["requests_by_operation"].get("create_or_update_profile", 0) - before[
        "requests_by_operation"
    ].get("create_or_update_profile", 0)
    assert sent == 4  # a few changes go one by one through profile-import
    assert after["writes"] - before["writes"] == 4
    # An upsert never deletes: the removed customer stays in Klaviyo, as in Census.
    assert_holds_model(project, emulator, also={"C00013"})
    assert after["spec_violations"] == 0


def test_an_unmapped_column_change_sends_nothing(project: Path, emulator: Emulator) -> None:
    assert sync_customers(project, emulator).returncode == 0
    change_model(project, "UPDATE main.customers SET internal_score = internal_score + 1")
    writes = emulator.stats()["writes"]
    again = sync_customers(project, emulator)
    assert again.returncode == 0 and again.row("customers")["unchanged"] == 1200
    assert emulator.stats()["writes"] == writes


def test_a_conflict_and_a_bad_phone_are_rejected_while_the_rest_sync(
    project: Path, emulator: Emulator
) -> None:
    # Klaviyo already has C00005's external id and C00005's email on two different profiles.
    c5 = model_rows(project, "SELECT * FROM main.customers WHERE customer_id = 'C00005'")[0]
    session = requests.Session()
    session.headers.update(
        {
            "Authorization": f"Klaviyo-API-Key {PRIVATE_KEY}",
            "revision": "2026-07-15",
            "Content-Type": "application/vnd.api+json",
        }
    )
    for attributes in (
        {"external_id": "C00005", "email": "old@example.com"},
        {"email": c5["email"], "external_id": "SOMEONE-ELSE"},
    ):
        created = session.post(
            f"{emulator.url}/api/profile-import",
            json={"data": {"type": "profile", "attributes": attributes}},
        )
        assert created.status_code == 201, created.text
    other_id = created.json()["data"]["id"]
    change_model(project, "UPDATE main.customers SET phone = '+1 555' WHERE customer_id = 'C00007'")

    first = sync_customers(project, emulator)

    assert first.returncode == 1, first.output
    assert first.row("customers")["rejected"] == 2
    assert first.row("customers")["added"] == 1198
    assert "'C00007' phone" in first.stdout and "E.164" in first.stdout
    assert "'C00005'" in first.stdout and other_id in first.stdout
    assert "external_id 'C00005' on profile" in first.stdout
    with duckdb.connect(str(project / ".klaviyo_sync" / "state.duckdb"), read_only=True) as con:
        rejects = dict(con.execute("SELECT key, reason FROM rejects").fetchall())
    assert set(rejects) == {"C00005", "C00007"}
    assert other_id in rejects["C00005"]

    # Both stay out of step, so every run says so (exit 1) until they are fixed. The
    # conflict, which a merge in Klaviyo may resolve, is tried again on every run; the bad
    # phone waits for its row to change.
    before = len(emulator.request_log())
    again = sync_customers(project, emulator)
    assert again.returncode == 1, again.output
    assert again.row("customers")["rejected"] == 2
    assert again.row("customers")["unchanged"] == 1198
    retried = [e["operation_id"] for e in emulator.request_log()[before:]]
    assert retried.count("create_or_update_profile") == 1
    change_model(
        project, "UPDATE main.customers SET phone = '+14155559999' WHERE customer_id = 'C00007'"
    )
    fixed = sync_customers(project, emulator)
    assert fixed.returncode == 1, fixed.output
    assert (fixed.row("customers")["added"], fixed.row("customers")["rejected"]) == (1, 1)
    assert held(emulator)["C00007"]["phone_number"] == "+14155559999"


def test_a_dry_run_sends_nothing_and_keeps_no_state(project: Path, emulator: Emulator) -> None:
    dry = sync_customers(project, emulator, "--dry-run")
    assert dry.returncode == 0, dry.output
    assert "Dry run" in dry.stdout
    assert dry.row("customers")["added"] == 1200
    assert sum(emulator.stats()["requests_by_operation"].values()) == 0
    assert not (project / ".klaviyo_sync" / "state.duckdb").exists()

    assert sync_customers(project, emulator).returncode == 0
    change_model(project, "UPDATE main.customers SET city = 'Oslo' WHERE customer_id = 'C00001'")
    requests_before = sum(emulator.stats()["requests_by_operation"].values())
    state_before = (project / ".klaviyo_sync" / "state.duckdb").read_bytes()
    dry = sync_customers(project, emulator, "--dry-run")
    assert dry.row("customers")["updated"] == 1
    assert sum(emulator.stats()["requests_by_operation"].values()) == requests_before
    assert (project / ".klaviyo_sync" / "state.duckdb").read_bytes() == state_before


def test_rate_limits_and_server_errors_are_survived(project: Path, emulator: Emulator) -> None:
    emulator.set_rate_limit("bulk_import_profiles", burst=1, steady=2)
    emulator.set_rate_limit("get_bulk_import_profiles_job", burst=1, steady=4)
    emulator.inject(status=503, count=2, operation="bulk_import_profiles")
    emulator.inject(status=500, count=1, operation="get_bulk_import_profiles_job")
    emulator.inject(status=429, count=1, operation="get_accounts", retry_after=1)

    done = sync_customers(project, emulator)

    assert done.returncode == 0, done.output
    assert_holds_model(project, emulator)
    stats = emulator.stats()
    assert stats["retry_after_violations"] == 0
    assert stats["throttled"] >= 1
    assert stats["spec_violations"] == 0


def test_full_refresh_sends_every_row_again(project: Path, emulator: Emulator) -> None:
    assert sync_customers(project, emulator).returncode == 0
    again = sync_customers(project, emulator, "--full-refresh")
    assert again.returncode == 0
    assert again.row("customers")["added"] == 1200
    assert emulator.stats()["requests_by_operation"]["bulk_import_profiles"] == 2


def test_select_limits_the_sync_and_an_unknown_name_is_an_error(
    project: Path, emulator: Emulator
) -> None:
    unknown = sync_customers(project, emulator, "--select", "nope")
    assert unknown.returncode == 2
    assert "nope" in unknown.stderr and "customers" in unknown.stderr
    chosen = sync_customers(project, emulator, "--select", "customers")
    assert chosen.returncode == 0 and chosen.row("customers")["added"] == 1200


def test_a_wrong_key_or_an_unreachable_api_exits_2(project: Path, emulator: Emulator) -> None:
    wrong = sync(
        project, emulator, env={"KLAVIYO_PRIVATE_API_KEY": "pk_wrong_0123456789"}, isolated=True
    )
    assert wrong.returncode == 2
    assert "KLAVIYO_PRIVATE_API_KEY" in wrong.stderr and "pk_wrong_0123456789" not in wrong.output
    gone = sync_customers(project, None, isolated=True)
    assert gone.returncode == 2
    assert "cannot reach Klaviyo" in gone.stderr


def test_the_client_api_uses_the_public_key_and_no_private_key(
    project: Path, emulator: Emulator
) -> None:
    set_model_meta(project, api="client")
    change_model(project, "DELETE FROM main.customers WHERE customer_id > 'C00020'")
    done = sync_customers(project, emulator, env={"KLAVIYO_PRIVATE_API_KEY": ""})
    assert done.returncode == 0, done.output
    assert emulator.stats()["requests_by_operation"] == {"create_client_profile": 20}
    assert_holds_model(project, emulator)


def test_nulls_clear_clears_klaviyo_values(project: Path, emulator: Emulator) -> None:
    assert sync_customers(project, emulator).returncode == 0
    set_model_meta(project, nulls="clear")
    change_model(
        project, "UPDATE main.customers SET city = NULL, is_vip = NULL WHERE customer_id = 'C00002'"
    )
    done = sync_customers(project, emulator, "--select", "customers")
    assert done.returncode == 0, done.output
    c2 = held(emulator)["C00002"]
    assert c2["city"] is None
    assert "is_vip" not in c2["properties"]


def test_nulls_clear_clears_values_when_many_rows_change_too(
    project: Path, emulator: Emulator
) -> None:
    """Over 100 changed rows go in bulk import jobs, which ignore nulls (Klaviyo's guide):
    rows that clear a value must go another way."""
    set_model_meta(project, nulls="clear")
    assert sync_customers(project, emulator).returncode == 0
    change_model(project, "UPDATE main.customers SET city = NULL WHERE customer_id <= 'C00300'")
    done = sync_customers(project, emulator)
    assert done.returncode == 0, done.output
    assert done.row("customers")["updated"] == 300
    cities = {key: profile["city"] for key, profile in held(emulator).items()}
    assert all(cities[f"C{n:05d}"] is None for n in range(1, 301))
    assert all(cities[f"C{n:05d}"] is not None for n in range(301, 1201))


def test_keys_appear_in_no_output_state_or_request_log(project: Path, emulator: Emulator) -> None:
    """Every path, good and bad, in real processes; then search everything they left."""
    change_model(project, "UPDATE main.customers SET phone = 'bad' WHERE customer_id = 'C00003'")
    outputs = [
        sync_customers(project, emulator, isolated=True).output,
        sync(
            project, emulator, env={"KLAVIYO_PRIVATE_API_KEY": PRIVATE_KEY + "x"}, isolated=True
        ).output,
        sync_customers(project, None, isolated=True).output,
    ]
    set_model_meta(project, api="client")
    emulator.inject(kind="reset", count=3)
    emulator.inject(status=400, count=1, operation="create_client_profile")
    change_model(project, "DELETE FROM main.customers WHERE customer_id > 'C00030'")
    outputs.append(sync_customers(project, emulator, "--full-refresh", isolated=True).output)
    haystacks = [*outputs, str(emulator.request_log()), str(emulator.state())]
    for path in project.rglob("*"):
        if path.is_file() and "dbt_packages" not in path.parts:
            haystacks.append(path.read_bytes().decode("latin-1"))
    assert "rejected customers" in outputs[0] and "cannot reach" in outputs[2]
    for secret in (PRIVATE_KEY, PUBLIC_KEY):
        assert not [h[:200] for h in haystacks if secret in h], secret


def test_numbers_klaviyo_finds_invalid_refuse_the_job_and_only_their_rows_are_rejected(
    project: Path, emulator: Emulator
) -> None:
    """The client checks that a phone number is E.164 and possible; whether it exists is
    Klaviyo's to say, when the job is created: a 400 pointing at each such profile. Those
    rows are rejected with Klaviyo's reason and the rest of the job goes again."""
    change_model(
        project,
        "UPDATE main.customers SET phone = '+1 555 555 01' || right(customer_id, 2) "
        "WHERE customer_id IN ('C00007', 'C00900')",
    )
    done = sync_customers(project, emulator)
    assert done.returncode == 1, done.output
    assert (done.row("customers")["rejected"], done.row("customers")["added"]) == (2, 1198)
    assert emulator.stats()["requests_by_operation"]["bulk_import_profiles"] == 2
    assert "'C00007' phone: +15555550107 is not a valid phone number." in done.stdout
    assert {"C00007", "C00900"}.isdisjoint(held(emulator))
    assert emulator.state()["bulk_jobs"][0]["errors"] == []


def profile_body(**attributes: Any) -> dict[str, Any]:
    return {"data": {"type": "profile", "attributes": attributes}}


def test_the_client_api_cannot_see_an_identifier_conflict(
    project: Path, emulator: Emulator
) -> None:
    """Klaviyo answers the client endpoint 202 for a row whose email and external id are on
    two profiles, and applies the row to the email's profile without the external id
    (API.md §2.3); nothing in the answer says so, and the row counts as synced."""
    set_model_meta(project, api="client")
    change_model(project, "DELETE FROM main.customers WHERE customer_id > 'C00005'")
    c5 = model_rows(project, "SELECT * FROM main.customers WHERE customer_id = 'C00005'")[0]
    klaviyo_api(emulator, "POST", "/api/profile-import", profile_body(external_id="C00005"))
    klaviyo_api(emulator, "POST", "/api/profile-import", profile_body(email=c5["email"]))
    done = sync_customers(project, emulator, env={"KLAVIYO_PRIVATE_API_KEY": ""})
    assert done.returncode == 0, done.output
    assert done.row("customers")["added"] == 5
    by_email = {p["attributes"]["email"]: p["attributes"] for p in emulator.profiles()}
    assert by_email[c5["email"]]["external_id"] is None  # not applied
    assert by_email[c5["email"]]["first_name"] == c5["first_name"]  # the rest was


def test_the_client_api_rejects_what_klaviyo_points_at_and_fails_the_rest(
    project: Path, emulator: Emulator
) -> None:
    """The client endpoint answers 202 for conflicts, but Klaviyo may still refuse one
    request with a 4xx: a pointer into the profile rejects that row; an answer about no
    record fails its row, sent again next run."""
    set_model_meta(project, api="client")
    change_model(project, "DELETE FROM main.customers WHERE customer_id > 'C00005'")
    rows = {r["customer_id"]: r for r in model_rows(project)}
    emulator.inject(
        status=409,
        operation="create_client_profile",
        pointer="/data/attributes",
        body_contains=rows["C00002"]["email"],
    )
    emulator.inject(
        status=400, operation="create_client_profile", body_contains=rows["C00004"]["email"]
    )
    done = sync_customers(project, emulator, env={"KLAVIYO_PRIVATE_API_KEY": ""})
    assert done.returncode == 1, done.output
    row = done.row("customers")
    assert (row["added"], row["rejected"], row["failed"]) == (3, 1, 1)
    assert "'C00002'" in done.stdout
    again = sync_customers(project, emulator, env={"KLAVIYO_PRIVATE_API_KEY": ""})
    assert (again.row("customers")["added"], again.row("customers")["rejected"]) == (1, 1)
