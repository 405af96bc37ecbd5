"""The dbt package `klaviyo_sync` and the integration_tests/ project, run with real dbt.

dbt is slow to start (seconds per invocation), so one module-scoped fixture copies
integration_tests/ once and runs dbt three times:

1. `dbt deps`;
2. `dbt build` of the demo project as shipped (demo_step 0);
3. after adding the models below, `dbt build --vars '{demo_step: 1}'`: the demo at step 1
   plus models that break the `klaviyo_sync.check()` post-hook in every way it detects.

Each test then reads the outcome of its model from the saved `run_results.json`, or the data
with DuckDB (after dbt has exited: dbt-duckdb locks the database file while it runs).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import phonenumbers
import pytest
from email_validator import validate_email

from tests.conftest import copy_integration_project, run_dbt, shared_by_workers

PROJECT = "klaviyo_sync_integration_tests"

MAPPED = [
    "email",
    "phone",
    "first_name",
    "last_name",
    "city",
    "country",
    "lifetime_value",
    "is_vip",
    "signup_date",
    "last_order_at",
]

HOOK = "{{ klaviyo_sync.check() }}"

# Models written into the copy before the second build. Those in models/checks/ get the
# hook from their properties YAML (`post_hook`, the key YAML needs), plain_model from its SQL
# config(); those in models/checks_project/ from `+post-hook` in dbt_project.yml.
CHECK_MODELS = {
    "models/checks/bad_null_key.sql": """
        {{ config(materialized='view') }}
        select case when i % 400 = 0 then null else 'K' || i end as customer_id,
               'k' || i || '@example.com' as email
        from range(1, 1001) as r(i)
    """,
    "models/checks/bad_duplicate_keys.sql": """
        {{ config(materialized='table') }}
        -- K1 .. K10 appear twice, K11 .. K989 once
        select 'K' || (i % 990) as customer_id, 'k' || i || '@example.com' as email
        from range(1, 1001) as r(i)
    """,
    "models/checks/bad_missing_column.sql": """
        {{ config(materialized='view') }}
        select 'K' || i as customer_id, 'k' || i || '@example.com' as email
        from range(1, 11) as r(i)
    """,
    "models/checks/bad_no_sync_key.sql": """
        {{ config(materialized='table') }}
        select 'K' || i as customer_id, 'k' || i || '@example.com' as email
        from range(1, 11) as r(i)
    """,
    "models/checks/bad_two_sync_keys.sql": """
        {{ config(materialized='view') }}
        select 'K' || i as customer_id, 'k' || i || '@example.com' as email
        from range(1, 11) as r(i)
    """,
    "models/checks/plain_model.sql": """
        {{ config(materialized='table', post_hook="{{ klaviyo_sync.check() }}") }}
        -- no klaviyo meta: NULL and duplicate ids are none of the check's business
        select null as customer_id union all select 'K1' union all select 'K1'
    """,
    "models/checks/checks.yml": f"""
version: 2
models:
  - name: bad_null_key
    config:
      post_hook: "{HOOK}"
      meta: {{klaviyo: {{object: profile}}}}
    columns:
      - name: customer_id
        config: {{meta: {{klaviyo: {{sync_key: external_id}}}}}}
      - name: email
        config: {{meta: {{klaviyo: {{field: email}}}}}}
  - name: bad_duplicate_keys
    config:
      post_hook: "{HOOK}"
      meta: {{klaviyo: {{object: profile}}}}
    columns:
      - name: customer_id
        config: {{meta: {{klaviyo: {{sync_key: external_id}}}}}}
  - name: bad_missing_column
    config:
      post_hook: "{HOOK}"
      meta: {{klaviyo: {{object: profile}}}}
    columns:
      - name: customer_id
        config: {{meta: {{klaviyo: {{sync_key: external_id}}}}}}
      - name: loyalty_tier
        config: {{meta: {{klaviyo: {{field: properties.loyalty_tier}}}}}}
  - name: bad_no_sync_key
    config:
      post_hook: "{HOOK}"
      meta: {{klaviyo: {{object: profile}}}}
    columns:
      - name: customer_id
        config: {{meta: {{klaviyo: {{field: external_id}}}}}}
      - name: email
        config: {{meta: {{klaviyo: {{field: email}}}}}}
  - name: bad_two_sync_keys
    config:
      post_hook: "{HOOK}"
      meta: {{klaviyo: {{object: profile}}}}
    columns:
      - name: customer_id
        config: {{meta: {{klaviyo: {{sync_key: external_id}}}}}}
      - name: email
        config: {{meta: {{klaviyo: {{sync_key: email}}}}}}
  - name: plain_model
    columns:
      - name: customer_id
        description: not synced
""",
    "models/checks_project/good_legacy_view.sql": """
        {{ config(materialized='view') }}
        select i as "Customer_ID", 'k' || i || '@example.com' as "Email"
        from range(1, 11) as r(i)
    """,
    "models/checks_project/bad_project_hook.sql": """
        {{ config(materialized='table') }}
        select 'K1' as customer_id union all select 'K1'
    """,
    "models/checks_project/checks_project.yml": """
version: 2
models:
  # the older top-level `meta`, and column names in another case than in the relation
  - name: good_legacy_view
    meta: {klaviyo: {object: profile}}
    columns:
      - name: customer_id
        meta: {klaviyo: {sync_key: external_id}}
      - name: EMAIL
        meta: {klaviyo: {field: email}}
  - name: bad_project_hook
    config:
      meta: {klaviyo: {object: profile}}
    columns:
      - name: customer_id
        config: {meta: {klaviyo: {sync_key: external_id}}}
""",
}

PROJECT_HOOK = f"""
models:
  {PROJECT}:
    checks_project:
      +post-hook: "{HOOK}"
"""


@dataclass
class Outcome:
    returncode: int
    output: str
    results: dict[str, dict[str, Any]]  # model name -> its entry in run_results.json
    customers: dict[str, dict[str, Any]]  # customer_id -> row of the customers table


def outcome(project: Path, proc: subprocess.CompletedProcess[str]) -> Outcome:
    output = proc.stdout + proc.stderr
    results: dict[str, dict[str, Any]] = {}
    run_results = project / "target" / "run_results.json"
    if run_results.exists():
        for result in json.loads(run_results.read_text())["results"]:
            # model.<project>.<name> or test.<project>.<name>.<hash>
            results[result["unique_id"].split(".")[2]] = result
        run_results.unlink()  # never read a stale file after the next run
    customers: dict[str, dict[str, Any]] = {}
    database = project / "warehouse.duckdb"
    if database.exists():
        with duckdb.connect(str(database), read_only=True) as con:
            cursor = con.execute("select * from main.customers order by customer_id")
            names = [d[0] for d in cursor.description]
            for row in cursor.fetchall():
                customers[row[0]] = dict(zip(names, row, strict=True))
    return Outcome(proc.returncode, output, results, customers)


@dataclass
class Runs:
    step0: Outcome
    step1: Outcome


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The demo built, then built again with the checked models: three dbt commands, run
    once for all of xdist's workers."""
    return shared_by_workers(tmp_path_factory, "macro_runs", _build_twice)


def _build_twice(folder: Path) -> Runs:
    project = copy_integration_project(folder / "integration_tests")
    deps = run_dbt(project, "deps")
    assert deps.returncode == 0, deps.stdout + deps.stderr

    step0 = outcome(project, run_dbt(project, "build"))

    for name, text in CHECK_MODELS.items():
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    with (project / "dbt_project.yml").open("a") as f:
        f.write(PROJECT_HOOK)
    step1 = outcome(project, run_dbt(project, "build", "--vars", "{demo_step: 1}"))
    return Runs(step0, step1)


def test_demo_project_builds(runs: Runs) -> None:
    step0 = runs.step0
    assert step0.returncode == 0, step0.output
    assert {name: r["status"] for name, r in step0.results.items()} == {
        "customers": "success",
        "not_null_customers_customer_id": "pass",
        "unique_customers_customer_id": "pass",
        # one model for each of the other Census objects and behaviours, checked too
        "vip_audience": "success",
        "loyalty_updates": "success",
        "erasure_requests": "success",
        "order_events": "success",
    }
    assert len(step0.customers) == 1200
    assert min(step0.customers) == "C00001"
    assert max(step0.customers) == "C01200"


def test_demo_data_is_valid_for_klaviyo(runs: Runs) -> None:
    rows = list(runs.step0.customers.values()) + list(runs.step1.customers.values())
    assert rows
    assert set(rows[0]) == {"customer_id", *MAPPED, "internal_score"}
    for row in rows:
        assert validate_email(row["email"], check_deliverability=False).normalized == row["email"]
        assert row["email"] == row["email"].lower()
        number = phonenumbers.parse(row["phone"])
        assert phonenumbers.is_valid_number(number), row["phone"]
        e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        assert e164 == row["phone"]
        assert isinstance(row["lifetime_value"], Decimal)
        assert isinstance(row["is_vip"], bool)
    for step in (runs.step0, runs.step1):
        assert len({r["email"] for r in step.customers.values()}) == len(step.customers)
        assert len({r["phone"] for r in step.customers.values()}) == len(step.customers)
    # customers who never ordered have no last order: NULLs are part of the demo
    assert any(r["last_order_at"] is None for r in runs.step0.customers.values())


def test_demo_step_1_changes_three_adds_one_removes_one(runs: Runs) -> None:
    step0, step1 = runs.step0, runs.step1
    assert step1.results["customers"]["status"] == "success", step1.output
    assert step1.results["unique_customers_customer_id"]["status"] == "pass"
    assert len(step1.customers) == 1200

    before, after = step0.customers, step1.customers
    assert set(after) - set(before) == {"C01201"}
    assert set(before) - set(after) == {"C00013"}
    common = set(before) & set(after)
    changed = {k for k in common if any(before[k][c] != after[k][c] for c in MAPPED)}
    assert changed == {"C00010", "C00042", "C00077"}
    # 3 changed + 1 added rows differ in mapped columns
    assert len(changed) + len(set(after) - set(before)) == 4

    assert (before["C00010"]["city"], after["C00010"]["city"]) == ("San Francisco", "Oakland")
    assert before["C00042"]["lifetime_value"] == Decimal("325.98")
    assert after["C00042"]["lifetime_value"] == Decimal("575.98")
    assert (before["C00077"]["is_vip"], after["C00077"]["is_vip"]) == (False, True)
    assert (after["C01201"]["first_name"], after["C01201"]["last_name"]) == ("Nora", "Lindqvist")
    # the unmapped column changes everywhere
    assert all(before[k]["internal_score"] != after[k]["internal_score"] for k in common)


@pytest.mark.parametrize(
    ("model", "column", "fragments"),
    [
        ("bad_null_key", "customer_id", ["has 2 NULL values", "is not null"]),
        (
            "bad_duplicate_keys",
            "customer_id",
            ["has 10 duplicate keys", "20 rows in all", "'K1' (2 rows), 'K10' (2 rows)"],
        ),
        ("bad_missing_column", "loyalty_tier", ["does not exist", "customer_id, email"]),
        ("bad_no_sync_key", "customer_id", ["'customer_id', 'email') has `sync_key`"]),
        ("bad_two_sync_keys", "customer_id", ["'customer_id', 'email' all have `sync_key`"]),
        ("bad_project_hook", "customer_id", ["has 1 duplicate key ", "'K1' (2 rows)"]),
    ],
)
def test_check_fails_the_model(runs: Runs, model: str, column: str, fragments: list[str]) -> None:
    result = runs.step1.results[model]
    assert result["status"] == "error", result
    message = result["message"]
    assert f"klaviyo_sync.check() failed for model '{model}'" in message
    assert f"'{column}'" in message
    for fragment in fragments:
        assert fragment in message
    assert runs.step1.returncode == 1


def test_check_shows_at_most_five_duplicate_examples(runs: Runs) -> None:
    message = runs.step1.results["bad_duplicate_keys"]["message"]
    assert message.count(" (2 rows)") == 5


@pytest.mark.parametrize("model", ["plain_model", "good_legacy_view"])
def test_check_passes(runs: Runs, model: str) -> None:
    # plain_model has no klaviyo meta (and NULL, duplicate ids); good_legacy_view is a view
    # annotated with the older top-level `meta`, its columns named in another case.
    assert runs.step1.results[model]["status"] == "success", runs.step1.results[model]
