"""dbt drives the project: profiles, targets, vars and selection work as for `dbt build`.

Real dbt throughout. dbt costs seconds per invocation, so the selection cases share one
project parsed once, and each end-to-end test walks through several flags.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dbt_klaviyo_sync
from dbt_klaviyo_sync import runner
from dbt_klaviyo_sync.dbt import DbtArgs, DbtProject, select_models
from dbt_klaviyo_sync.emulator import Emulator
from dbt_klaviyo_sync.errors import ConfigurationError
from tests.conftest import (
    BIN,
    PRIVATE_KEY,
    PUBLIC_KEY,
    clean_env,
    dbt_klaviyo,
    environment,
    model_rows,
)

PARSING = "parsing the dbt project"

# -- Selection, with dbt's own selector ---------------------------------------------------


@pytest.fixture(scope="module")
def selectable(built_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo with tags, a model without `klaviyo` meta and selectors.yml (whose default
    selector applies when nothing is selected, as in dbt)."""
    # symlinks=True: dbt_packages/klaviyo_sync links to this checkout; following it copies
    # the whole checkout (and loops forever when integration_tests/ has its own dbt_packages).
    copy = tmp_path_factory.mktemp("sel") / "project"
    project = Path(shutil.copytree(built_project, copy, symlinks=True))
    (project / "models" / "staging_orders.sql").write_text("select 1 as order_id\n")
    with (project / "dbt_project.yml").open("a") as f:
        f.write(
            "\nmodels:\n  klaviyo_sync_integration_tests:\n"
            "    customers: {+tags: [crm]}\n    vip_audience: {+tags: [crm]}\n"
        )
    (project / "selectors.yml").write_text(
        """selectors:
  - name: lists_and_events
    default: true
    definition:
      union:
        - method: fqn
          value: vip_audience
        - method: fqn
          value: order_events
"""
    )
    return project


def selected(project: Path, **args: object) -> list[str]:
    """The names of the models selected in `project` with these DbtArgs."""
    given = DbtArgs(project_dir=str(project), profiles_dir=str(project))
    with environment(project, clean_env()):
        located = DbtProject.locate(dataclasses.replace(given, **args))  # type: ignore[arg-type]
        return [model.name for model in select_models(located)]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"select": ("customers",)}, ["customers"]),
        ({"select": ("customers vip_audience",)}, ["customers", "vip_audience"]),
        (
            {"select": ("model.klaviyo_sync_integration_tests.order_events", "loyalty_updates")},
            ["loyalty_updates", "order_events"],
        ),
        ({"select": ("cust*",)}, ["customers"]),
        ({"select": ("tag:crm",)}, ["customers", "vip_audience"]),
        ({"select": ("path:models/order_events.sql",)}, ["order_events"]),
        (
            {"select": ("config.materialized:table",), "exclude": ("tag:crm",)},
            ["erasure_requests", "loyalty_updates", "order_events"],
        ),
        ({"select": ("+vip_audience",)}, ["customers", "erasure_requests", "vip_audience"]),
        (
            {"select": ("customers+",), "exclude": ("order_events", "loyalty_updates")},
            ["customers", "vip_audience"],
        ),
        (
            {"select": ("@erasure_requests",)},
            ["customers", "erasure_requests", "order_events", "vip_audience"],
        ),
        ({"select": ("tag:crm,vip_audience",)}, ["vip_audience"]),
        ({"selector": "lists_and_events"}, ["order_events", "vip_audience"]),
        ({}, ["order_events", "vip_audience"]),  # selectors.yml's default selector
    ],
)
def test_selection_takes_dbt_selector_syntax(
    selectable: Path, args: dict[str, object], expected: list[str]
) -> None:
    assert selected(selectable, **args) == expected


def test_a_selection_without_annotated_models_says_which_are(selectable: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        selected(selectable, select=("staging_orders",))
    message = str(caught.value)
    assert "--select staging_orders selects no model with `klaviyo` meta" in message
    assert "(it selects staging_orders)" in message
    assert "Annotated models: customers, erasure_requests, loyalty_updates" in message

    with pytest.raises(ConfigurationError) as caught:
        selected(selectable, select=("customers", "custmers"))
    assert "--select custmers matches no model in the dbt project" in str(caught.value)

    done = dbt_klaviyo(selectable, None, "validate", "--selector", "nope")
    assert done.returncode == 2
    assert "Could not find selector named nope" in done.stdout


# -- Profiles, targets and the manifest ---------------------------------------------------

PROD_TARGET = """    prod:
      type: duckdb
      path: "{{ env_var('DBT_ENV_SECRET_PROD_DIR', 'nowhere') }}/{{ var('prod_file', 'x.duckdb') }}"
      threads: 1
"""


def test_targets_env_vars_secrets_and_vars_load_as_in_dbt_and_the_manifest_follows_the_target(
    project: Path, tmp_path: Path
) -> None:
    (project / "profiles.yml").write_text((project / "profiles.yml").read_text() + PROD_TARGET)
    secret = tmp_path / "secret-place"
    secret.mkdir()
    shutil.copy(project / "warehouse.duckdb", secret / "prod_wh.duckdb")
    # Someone parses the project for another target.
    parsed = subprocess.run(
        [str(BIN / "dbt"), "parse", "--profiles-dir", ".", "--target", "prod"],
        cwd=project,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert parsed.returncode == 0, parsed.stdout

    # The manifest is for prod: a plain plan parses again, for dev, and reads dev's models.
    plan = dbt_klaviyo(project, None, "plan", "--project-dir", ".", "--profiles-dir", ".")
    assert plan.returncode == 0, plan.output
    assert f"{PARSING} for target 'dev'" in plan.stderr
    assert "customers (profile upsert): 1,200 to create" in plan.stdout
    warehouse = project / "warehouse.duckdb"
    assert f"customers: reading main.customers from {warehouse} (target dev)" in plan.stderr

    # dbt's environment variables choose the project, profiles, target and target path; the
    # profile renders env_var() (a secret one too) and var() from --vars.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        "DBT_PROJECT_DIR": str(project),
        "DBT_PROFILES_DIR": str(project),
        "DBT_TARGET": "prod",
        "DBT_TARGET_PATH": "target_prod",
        "DBT_ENV_SECRET_PROD_DIR": str(secret),
    }
    plan = dbt_klaviyo(
        project,
        None,
        "plan",
        "--vars",
        "{prod_file: prod_wh.duckdb}",
        "-s",
        "customers+",
        "--exclude",
        "vip_audience",
        "order_events",
        "loyalty_updates",
        env=env,
        cwd=elsewhere,
    )
    assert plan.returncode == 0, plan.output
    assert f"{PARSING} for target 'prod'" in plan.stderr
    assert "customers: reading main.customers from *****/prod_wh.duckdb (target prod)" in (
        plan.stderr
    )
    assert "customers (profile upsert): 1,200 to create" in plan.stdout
    assert "vip_audience" not in plan.stdout and "order_events" not in plan.stdout
    assert str(secret) not in plan.output
    assert (project / "target_prod" / "manifest.json").is_file()

    # Nothing changed: the next run does not parse.
    again = dbt_klaviyo(project, None, "plan", "--project-dir", ".", "--profiles-dir", ".")
    assert again.returncode == 0, again.output
    assert PARSING not in again.stderr


def test_build_gets_the_same_flags_and_its_manifest_serves_the_next_run(project: Path) -> None:
    argv = ("plan", "--build", "--vars", "{demo_step: 1}", "-s", "customers")
    built = dbt_klaviyo(project, None, *argv)
    assert built.returncode == 0, built.output
    assert model_rows(project, "SELECT * FROM main.customers WHERE customer_id = 'C01201'")
    # `dbt build` ran with these very flags, so its manifest needs no new parse.
    again = dbt_klaviyo(project, None, "plan", "--vars", "{demo_step: 1}", "-s", "customers")
    assert again.returncode == 0, again.output
    assert PARSING not in again.stderr
    # Other vars: parse again.
    other = dbt_klaviyo(project, None, "plan", "-s", "customers")
    assert f"{PARSING} for target 'dev': the manifest was parsed with other vars" in other.stderr


# -- The Python API, from anywhere ------------------------------------------------------------


def test_the_python_api_reads_the_file_dbt_would_read_and_says_which(
    project: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    keys = {"KLAVIYO_PRIVATE_API_KEY": PRIVATE_KEY, "KLAVIYO_PUBLIC_API_KEY": PUBLIC_KEY}
    log = project / "target" / "dbt-klaviyo.log"

    # From another folder, the profile's relative path is not where the data is: say so.
    with environment(elsewhere, clean_env(**keys)):
        missing = dbt_klaviyo_sync.sync(project, profiles_dir=project, select="customers")
    assert missing.exit_status == 2
    assert f"reads models from {elsewhere / 'warehouse.duckdb'}, which does not exist" in (
        missing.error or ""
    )
    assert f"{project / 'warehouse.duckdb'} exists: run from {project}" in (missing.error or "")

    # A same-named file there is what dbt would read: it is read, with a warning.
    shutil.copy(project / "warehouse.duckdb", elsewhere / "warehouse.duckdb")
    with environment(elsewhere, clean_env(**keys)):
        shadowed = dbt_klaviyo_sync.sync(project, profiles_dir=project, dry_run=True)
    assert shadowed.exit_status == 0, shadowed.error
    assert f"The project's folder holds another {project / 'warehouse.duckdb'}" in log.read_text()

    # An absolute path, through the profile's env_var(), works from anywhere.
    absolute = clean_env(DBT_KLAVIYO_DEMO_DB=str(project / "warehouse.duckdb"), **keys)
    with environment(elsewhere, absolute):
        summary = dbt_klaviyo_sync.sync(
            project, profiles_dir=project, select=["customers"], dry_run=True
        )
    assert summary.exit_status == 0, summary.error
    assert summary.models[0].counts.added == 1200
    assert (
        f"customers: reading main.customers from {project / 'warehouse.duckdb'} (target dev)"
        in log.read_text()
    )


def test_the_python_api_leaves_the_root_logger_alone(project: Path) -> None:
    """An orchestrator's process keeps its logging as it set it up: dbt's first import
    configures the root logger (snowplow_tracker calls basicConfig), after which our own
    log lines went to the orchestrator's stderr."""
    script = (
        "import logging, dbt_klaviyo_sync\n"
        "dbt_klaviyo_sync.validate('.', profiles_dir='.')\n"
        "print(logging.getLogger().handlers, logging.getLogger().level)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=project,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] 30"
    assert "dbt_klaviyo_sync" not in done.stderr


def test_a_sync_gives_the_garbage_collector_back_as_it_found_it(
    project: Path, emulator: Emulator
) -> None:
    """Sending tunes Python's cyclic collector for its churn; the process (an orchestrator
    running the Python API, say) gets its own settings back, after a failure too."""
    before = gc.get_threshold()
    gc.set_threshold(900, 11, 12)
    try:
        done = dbt_klaviyo(project, emulator, "sync", "--select", "customers")
        assert done.returncode == 0, done.output
        assert (gc.get_threshold(), gc.get_freeze_count()) == ((900, 11, 12), 0)
        with pytest.raises(RuntimeError), runner._few_collections():
            assert gc.get_threshold()[0] == runner.FEW_COLLECTIONS
            assert gc.get_freeze_count() > 0  # what existed is out of the collector's reach
            raise RuntimeError
        assert (gc.get_threshold(), gc.get_freeze_count()) == ((900, 11, 12), 0)
    finally:
        gc.set_threshold(*before)
