"""The PostgreSQL test infrastructure: the server `python3 dev.py test` starts, the demo
project built on it with the same rows as on DuckDB, the package's check post-hook there, and
private copies of the built database for each test (see conftest.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import (
    BIN,
    REPO,
    PgDatabase,
    change_model,
    clean_env,
    dbt_klaviyo,
    model_rows,
    pg_database,
    run_dbt,
)

MODELS = sorted(path.stem for path in (REPO / "integration_tests" / "models").glob("*.sql"))


def test_the_server_drops_databases_in_use(pg_server: PgDatabase) -> None:
    """DROP DATABASE ... WITH (FORCE), which the fixtures rely on, needs PostgreSQL 13."""
    with pg_server.connect() as con, con.cursor() as cursor:
        cursor.execute("SHOW server_version_num")
        assert int(cursor.fetchone()[0]) >= 130000


def rows(project: Path, model: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """A model's column names, and its rows in a fixed order."""
    found = model_rows(project, f"SELECT * FROM main.{model}")
    assert found, f"{model} is empty"
    return list(found[0]), sorted((tuple(row.values()) for row in found), key=repr)


@pytest.mark.parametrize("demo_step", [0, 1])
def test_every_model_has_the_same_rows_on_postgresql_as_on_duckdb(
    project: Path, pg_project: Path, demo_step: int
) -> None:
    if demo_step:
        for copy in (project, pg_project):
            done = run_dbt(copy, "build", "--vars", f"{{demo_step: {demo_step}}}")
            assert done.returncode == 0, done.stdout + done.stderr
    assert MODELS  # the models as shipped, so that a new one is compared too
    for model in MODELS:
        assert rows(pg_project, model) == rows(project, model), model


def test_the_check_post_hook_fails_a_bad_model_on_postgresql(pg_project: Path) -> None:
    models = pg_project / "models"
    (models / "bad_keys.sql").write_text(
        "select customer_id from {{ ref('customers') }}\n"
        "union all select 'C00001'\n"
        "union all select null\n"
    )
    (models / "bad_keys.yml").write_text(
        "models:\n"
        "  - name: bad_keys\n"
        "    config:\n"
        '      post_hook: "{{ klaviyo_sync.check() }}"\n'
        "      meta: {klaviyo: {object: profile, behavior: upsert}}\n"
        "    columns:\n"
        "      - name: customer_id\n"
        "        config: {meta: {klaviyo: {sync_key: external_id}}}\n"
    )
    done = run_dbt(pg_project, "build", "--select", "bad_keys")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "has 1 NULL value" in done.stdout
    assert "1 duplicate key (values found on more than one row; 2 rows in all)" in done.stdout
    assert "'C00001' (2 rows)" in done.stdout


def test_each_copy_has_a_database_of_its_own(make_pg_project: Callable[[str], Path]) -> None:
    first = make_pg_project("")
    change_model(
        first,
        "DELETE FROM main.customers WHERE customer_id = 'C00001'; CREATE SCHEMA klaviyo_sync",
    )
    second = make_pg_project("b")  # made after the change: the template is untouched
    count = "SELECT count(*) AS n FROM main.customers"
    assert model_rows(first, count) == [{"n": 1199}]
    assert model_rows(second, count) == [{"n": 1200}]
    schemas = (
        "SELECT schema_name FROM information_schema.schemata WHERE schema_name = 'klaviyo_sync'"
    )
    assert model_rows(first, schemas) == [{"schema_name": "klaviyo_sync"}]
    assert model_rows(second, schemas) == []
    first_db, second_db = pg_database(first), pg_database(second)
    assert first_db is not None and second_db is not None
    assert first_db.name != second_db.name


def test_validate_reads_the_postgres_target(pg_project: Path, emulator: Emulator) -> None:
    """The CLI loads the copy's profile, its postgres target and the manifest parsed for it,
    and checks every model's columns in PostgreSQL."""
    emulator.create_list("VIP customers", list_id="VipLst")
    argv = ("validate", "--project-dir", ".", "--profiles-dir", ".", "--target", "postgres")
    done = dbt_klaviyo(pg_project, emulator, *argv)
    assert done.returncode == 0, done.output
    assert "FAIL" not in done.output
    assert "from the postgres target 'postgres'" in done.output
    assert "parsing the dbt project" not in done.output  # the copy's manifest was ready


def test_without_a_server_the_postgresql_tests_skip_unless_required() -> None:
    """A developer running pytest by hand gets a skip that says what to run; dev.py (and so
    CI) requires the server, so there a missing one is an error, never a skip."""
    base = clean_env()  # without the DBT_KLAVIYO_PG_* variables
    command = [str(BIN / "pytest"), "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-rs"]
    command += [f"{__file__}::test_the_server_drops_databases_in_use"]
    for required, expected in ((None, "1 skipped"), ("1", "1 error")):
        env = base if required is None else {**base, "DBT_KLAVIYO_REQUIRE_POSTGRES": required}
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert expected in done.stdout, done.stdout + done.stderr
        assert "run `python3 dev.py test`" in done.stdout
