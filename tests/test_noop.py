"""A repeat run of a dbt-duckdb project starts without dbt: what the last full load resolved
(dbt_klaviyo_sync/resolved.py) and the models dbt selected (in the manifest's stamp) are
reused while everything they came from holds. Each change that could change dbt's answer
makes the run ask dbt again, and get the new answer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dbt_klaviyo_sync import resolved
from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import (
    PRIVATE_KEY,
    PUBLIC_KEY,
    Sync,
    clean_env,
    dbt_klaviyo,
    run_dbt,
)

REUSED = "the dbt project and profile as resolved before"
SELECTED = "--select customers: as dbt selected it before in this manifest"
PARSING = "parsing the dbt project"
#: `dbt-klaviyo`, saying at exit whether the process imported dbt.
SCRIPT = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('dbt imported:', 'dbt' in sys.modules, file=sys.stderr))\n"
    "from dbt_klaviyo_sync.cli import main\n"
    "main()\n"
)


def test_a_repeat_no_op_sync_does_not_import_dbt(project: Path, emulator: Emulator) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        argv = ["sync", "--project-dir", ".", "--profiles-dir", ".", "--select", "customers"]
        keys = {"KLAVIYO_PRIVATE_API_KEY": PRIVATE_KEY, "KLAVIYO_PUBLIC_API_KEY": PUBLIC_KEY}
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, *argv],
            cwd=project,
            env=clean_env(KLAVIYO_BASE_URL=emulator.url, **keys),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    first = run()
    assert "dbt imported: True" in first.stderr
    assert "1,200 created" in first.stdout
    again = run()
    assert "dbt imported: False" in again.stderr
    counts = Sync(again.returncode, again.stdout, again.stderr).row("customers")
    assert (counts["added"], counts["unchanged"]) == (0, 1200)
    assert f"customers: reading main.customers from {project / 'warehouse.duckdb'}" in again.stderr


@pytest.fixture
def plan(project: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Sync]:
    """`dbt-klaviyo plan --select customers` in this process, at debug level. These tests
    edit a file and run at once: the file system's clock tick is 0 for them."""
    monkeypatch.setattr(resolved, "TICK_NS", 0)
    monkeypatch.setattr(resolved, "COARSE_TICK_NS", 0)

    def run(*args: str, env: dict[str, str] | None = None) -> Sync:
        argv = ("--log-level", "debug", "plan", "--profiles-dir", ".", "-s", "customers", *args)
        done = dbt_klaviyo(project, emulator, *argv, env=env)
        assert done.returncode == 0, done.output
        return done

    assert REUSED not in run().stderr  # the project's first run here loads it
    again = run()
    assert REUSED in again.stderr and SELECTED in again.stderr
    assert PARSING not in again.stderr
    return run


def reads(done: Sync, path: Path, target: str = "dev") -> bool:
    """Whether the run read the customers from `path`, for `target`, and found them all."""
    return (
        f"customers: reading main.customers from {path} (target {target})" in done.stderr
        and "customers (profile upsert): 1,200 to create" in done.stdout
    )


OTHER_TARGET = """    other:
      type: duckdb
      path: other.duckdb
      threads: 1
"""


def test_an_edited_profile_is_read_again(project: Path, plan: Callable[..., Sync]) -> None:
    shutil.copy(project / "warehouse.duckdb", project / "other.duckdb")
    profiles = project / "profiles.yml"
    profiles.write_text(profiles.read_text().replace("target: dev", "target: other") + OTHER_TARGET)
    edited = plan()
    assert REUSED not in edited.stderr
    assert f"{PARSING} for target 'other'" in edited.stderr
    assert reads(edited, project / "other.duckdb", "other")
    assert REUSED in plan().stderr

    # --target, given or from DBT_TARGET, is a flag the cache was not made with.
    dev = plan("--target", "dev")
    assert REUSED not in dev.stderr and reads(dev, project / "warehouse.duckdb")
    from_env = plan(env={"DBT_TARGET": "dev"})
    assert REUSED not in from_env.stderr and reads(from_env, project / "warehouse.duckdb")


def test_a_changed_variable_of_the_profile_is_read_again(
    project: Path, plan: Callable[..., Sync]
) -> None:
    elsewhere = project / "elsewhere.duckdb"
    shutil.copy(project / "warehouse.duckdb", elsewhere)
    moved = plan(env={"DBT_KLAVIYO_DEMO_DB": str(elsewhere)})
    assert REUSED not in moved.stderr and reads(moved, elsewhere)
    assert reads(plan(env={"DBT_KLAVIYO_DEMO_DB": str(elsewhere)}), elsewhere)
    back = plan()
    assert REUSED not in back.stderr and reads(back, project / "warehouse.duckdb")


def test_other_vars_parse_again(project: Path, plan: Callable[..., Sync]) -> None:
    other = plan("--vars", "{demo_step: 1}")
    assert REUSED not in other.stderr
    assert f"{PARSING} for target 'dev': the manifest was parsed with other vars" in other.stderr
    assert reads(other, project / "warehouse.duckdb")
    assert REUSED in plan("--vars", "{demo_step: 1}").stderr


def test_an_edited_dbt_project_is_read_again(project: Path, plan: Callable[..., Sync]) -> None:
    config = project / "dbt_project.yml"
    config.write_text(config.read_text().replace("target-path: target", "target-path: built"))
    moved = plan()
    assert REUSED not in moved.stderr
    assert f"{PARSING} for target 'dev': there is no manifest yet" in moved.stderr
    assert (project / "built" / "manifest.json").is_file()
    assert reads(moved, project / "warehouse.duckdb")


def test_a_manifest_rebuilt_by_dbt_is_parsed_again(
    project: Path, plan: Callable[..., Sync]
) -> None:
    done = run_dbt(project, "parse")
    assert done.returncode == 0, done.stdout
    again = plan()
    assert REUSED in again.stderr  # dbt's yml are as they were
    assert "another dbt command has rewritten the manifest since" in again.stderr
    assert SELECTED not in again.stderr  # selected in the new manifest, by dbt
    assert reads(again, project / "warehouse.duckdb")
    assert SELECTED in plan().stderr


def test_a_selection_that_reads_files_asks_dbt(plan: Callable[..., Sync]) -> None:
    """path: globs the project's folder: dbt selects, loaded for it after the reuse."""
    done = plan("-s", "path:models/order_events.sql")
    assert REUSED in done.stderr
    assert "loading the dbt project and profile, which this run now needs" in done.stderr
    assert "selects 2 annotated model(s): customers, order_events" in done.stderr


def test_secrets_and_jinja_beyond_variables_are_never_kept(
    project: Path, plan: Callable[..., Sync]
) -> None:
    profiles = project / "profiles.yml"
    plain = profiles.read_text()
    for path in (
        "\"{{ env_var('DBT_ENV_SECRET_WAREHOUSE', 'warehouse.duckdb') }}\"",
        "\"{{ 'warehouse' ~ '.duckdb' }}\"",
    ):
        profiles.write_text(
            plain.replace("\"{{ env_var('DBT_KLAVIYO_DEMO_DB', 'warehouse.duckdb') }}\"", path)
        )
        for _ in range(2):
            done = plan()
            assert REUSED not in done.stderr and reads(done, project / "warehouse.duckdb")
    assert "DBT_ENV_SECRET" not in (project / resolved.CACHE).read_text()


@pytest.mark.parametrize(
    ("text", "read"),
    [
        ("warehouse.duckdb", set()),
        ("{{ env_var('A') }}/{{ env_var(\"B\", 'x') | as_number }}", {"A", "B"}),
        ("{{ var('file', 'x.duckdb') }}", set()),
        ("{{ run_started_at }}.duckdb", None),
        ("{{ env_var('A' ~ 'B') }}", None),
        ("{% if true %}x{% endif %}", None),
        ("{{ env_var('A') }}{# note #}", None),
    ],
)
def test_only_jinja_that_reads_variables_is_plain(text: str, read: set[str] | None) -> None:
    assert resolved.pure_jinja(text) == read
