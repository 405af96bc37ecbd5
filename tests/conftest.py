"""Shared fixtures: a built copy of integration_tests/, the emulator, and the real CLI.

dbt takes seconds per invocation, so the demo project is copied and built once per test run,
pytest-xdist's workers sharing it (`shared_by_workers`); each test that syncs gets its own
copy of that built project (a few MB), so tests never see each other's state or data.

The same holds on PostgreSQL (`pg_project`, and `warehouse_project` for a test that runs on
both): the project is built once per run into a database of its own, and each test gets a
copy of that database, made with CREATE DATABASE ... TEMPLATE. The server is the
one `python3 dev.py test` starts (scripts/postgres.py), named by the DBT_KLAVIYO_PG_*
variables; without them the PostgreSQL tests are skipped, unless
DBT_KLAVIYO_REQUIRE_POSTGRES=1 (set by dev.py) makes that an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import duckdb
import psycopg2
import pytest
import requests
import yaml
from psycopg2.sql import SQL, Identifier

from dbt_klaviyo_sync.changeset import RunCounts
from dbt_klaviyo_sync.cli import main
from dbt_klaviyo_sync.dbt import DbtArgs, DbtProject, select_models
from dbt_klaviyo_sync.emulator import Emulator

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRIVATE_KEY = "pk_test_SECRET0000private0000key"
PUBLIC_KEY = "PubK3y"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for dbt and the CLI: none of the caller's DBT_ or KLAVIYO_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBT_", "KLAVIYO_"))}
    env.update(DBT_SEND_ANONYMOUS_USAGE_STATS="false", DBT_VERSION_CHECK="false")
    env.update(extra)
    return env


def run_dbt(
    project: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dbt"), *args, "--profiles-dir", str(project)],
        cwd=project,
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_integration_project(destination: Path) -> Path:
    """integration_tests/ without build output, its package pointing at this checkout."""
    shutil.copytree(
        REPO / "integration_tests",
        destination,
        ignore=shutil.ignore_patterns(
            "target",
            "dbt_packages",
            "logs",
            "*.duckdb",
            "*.duckdb.wal",
            ".klaviyo_sync",
            "package-lock.yml",
            ".user.yml",
        ),
    )
    # JSON strings are YAML strings: safe for any path.
    (destination / "packages.yml").write_text(f"packages:\n  - local: {json.dumps(str(REPO))}\n")
    return destination


T = TypeVar("T")


def shared_by_workers(
    tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], T]
) -> T:
    """What `make` builds in a folder of its own, built once for the whole test run: xdist's
    workers share it, the first to need it building it while the others wait (a session or
    module fixture is otherwise built again on each worker). Its result is kept pickled."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, kept = root / name, root / f"{name}.pickle"
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if kept.exists():
            return cast(T, pickle.loads(kept.read_bytes()))
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        made = make(folder)
        kept.write_bytes(pickle.dumps(made))
        return made


def _build_demo(folder: Path) -> Path:
    project = copy_integration_project(folder / "integration_tests")
    for args in (("deps",), ("build",)):
        done = run_dbt(project, *args)
        assert done.returncode == 0, done.stdout + done.stderr
    # Parse once as a sync does, so that the manifest is stamped with its target: the copies
    # of this project then start without parsing again (seconds per test).
    with environment(project, clean_env()):
        select_models(DbtProject.locate(DbtArgs(project_dir=".", profiles_dir=".")))
    return project


@pytest.fixture(scope="session")
def built_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo project built with dbt, once for the run; each test works on a copy."""
    return shared_by_workers(tmp_path_factory, "built", _build_demo)


@pytest.fixture
def project(built_project: Path, tmp_path: Path) -> Path:
    """A private copy of the built demo project (data, manifest and all)."""
    return Path(shutil.copytree(built_project, tmp_path / "project", symlinks=True))


def make_emulator(job_seconds: float = 0.0) -> Emulator:
    """An emulator with the test keys. Every sync reads which account its key belongs to,
    from an endpoint Klaviyo limits to 1 a second and 15 a minute: fine for a schedule, but
    tests run syncs back to back, so that one limit is raised here (the others stay)."""
    emu = Emulator(private_key=PRIVATE_KEY, public_key=PUBLIC_KEY, job_seconds=job_seconds)
    emu.set_rate_limit("get_accounts", burst=1000, steady=100_000)
    return emu


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """The emulator every sync test talks to. Whatever the test, every request we sent
    must have validated against Klaviyo's OpenAPI spec."""
    with make_emulator(job_seconds=0.2) as emu:
        yield emu
        assert emu.stats()["spec_violations"] == 0, [
            entry for entry in emu.request_log() if entry["status"] == 400
        ][:5]


def set_model_meta(project: Path, **meta: str) -> None:
    """Add model-level `klaviyo` annotations to the demo's customers model."""
    schema = project / "models" / "schema.yml"
    lines = "".join(f"\n          {key}: {value}" for key, value in meta.items())
    schema.write_text(schema.read_text().replace("behavior: upsert", "behavior: upsert" + lines))


@dataclass
class Sync:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def row(self, model: str) -> dict[str, int]:
        """The summary table's numbers for a model."""
        for line in self.stdout.splitlines():
            cells = [c.strip() for c in line.replace("│", "|").split("|") if c.strip()]
            if cells and cells[0] == model:
                numbers = (int(c.replace(",", "")) for c in cells[1:])
                columns = [f.name for f in dataclasses.fields(RunCounts)]
                return dict(zip(columns, numbers, strict=True))
        raise AssertionError(f"no summary row for {model} in:\n{self.output}")


def dbt_klaviyo(
    project: Path,
    emulator: Emulator | None,
    *argv: str,
    env: dict[str, str] | None = None,
    isolated: bool = False,
    cwd: Path | None = None,
) -> Sync:
    """Run a `dbt-klaviyo` command from the project directory (or `cwd`), as a user would,
    with the test keys and the emulator's URL in the environment.

    By default the CLI's `main` runs in this process (dbt takes seconds to import, once);
    `isolated=True` runs the installed console script in a fresh process instead, for tests
    about exit statuses and what reaches the terminal.
    """
    settings = {
        "KLAVIYO_PRIVATE_API_KEY": PRIVATE_KEY,
        "KLAVIYO_PUBLIC_API_KEY": PUBLIC_KEY,
        "KLAVIYO_BASE_URL": emulator.url if emulator else "http://127.0.0.1:9",
        **(env or {}),
    }
    if isolated:
        done = subprocess.run(
            [str(BIN / "dbt-klaviyo"), *argv],
            cwd=cwd or project,
            env=clean_env(**settings),
            capture_output=True,
            text=True,
            timeout=600,
        )
        return Sync(done.returncode, done.stdout, done.stderr)
    out, err = io.StringIO(), io.StringIO()
    with (
        environment(cwd or project, clean_env(**settings)),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return Sync(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def environment(cwd: Path, env: dict[str, str]) -> Iterator[None]:
    """This process in `cwd`, with `env` in place of the caller's DBT_ and KLAVIYO_ settings."""
    with pytest.MonkeyPatch.context() as patch:
        for name in os.environ:
            if name.startswith(("DBT_", "KLAVIYO_")):
                patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        patch.chdir(cwd)
        yield


def sync(
    project: Path,
    emulator: Emulator | None,
    *args: str,
    env: dict[str, str] | None = None,
    isolated: bool = False,
) -> Sync:
    """Run `dbt-klaviyo sync` on the project (see `dbt_klaviyo`)."""
    argv = ("sync", "--project-dir", ".", "--profiles-dir", ".", *args)
    return dbt_klaviyo(project, emulator, *argv, env=env, isolated=isolated)


def sync_customers(project: Path, emulator: Emulator | None, *args: str, **options: Any) -> Sync:
    """Sync only the demo's customers model (profile upsert)."""
    return sync(project, emulator, "--select", "customers", *args, **options)


def start_sync(project: Path, emulator: Emulator, select: str) -> subprocess.Popen[str]:
    """A real `dbt-klaviyo sync` process in the background."""
    command = ["sync", "--project-dir", ".", "--profiles-dir", ".", "--select", select]
    return subprocess.Popen(
        [str(BIN / "dbt-klaviyo"), *command],
        cwd=project,
        env=clean_env(
            KLAVIYO_PRIVATE_API_KEY=PRIVATE_KEY,
            KLAVIYO_PUBLIC_API_KEY=PUBLIC_KEY,
            KLAVIYO_BASE_URL=emulator.url,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(ready: Callable[[], bool], process: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        assert process is None or process.poll() is None, "the sync finished too soon"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def kill_when(
    project: Path, emulator: Emulator, ready: Callable[[Emulator], bool], select: str = "customers"
) -> None:
    """Start a real sync process and SIGKILL it once `ready(emulator)` holds."""
    process = start_sync(project, emulator, select)
    wait_for(lambda: ready(emulator), process)
    process.send_signal(signal.SIGKILL)
    process.communicate()


def model_rows(project: Path, sql: str = "SELECT * FROM main.customers") -> list[dict[str, Any]]:
    """Rows from the project's warehouse: its DuckDB file, or for a PostgreSQL copy
    (`pg_project`) its database, with `sql` in that database's dialect."""
    database = pg_database(project)
    if database is not None:
        with database.connect() as con, con.cursor() as cursor:
            cursor.execute(sql)
            return _as_dicts(cursor)
    with duckdb.connect(str(project / "warehouse.duckdb"), read_only=True) as con:
        return _as_dicts(con.execute(sql))


def _as_dicts(cursor: Any) -> list[dict[str, Any]]:
    """A DB-API cursor's rows, each by column name."""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def change_model(project: Path, sql: str) -> None:
    """Change the built model directly, for cases the demo's dbt vars do not cover (in the
    dialect of the project's warehouse, as for `model_rows`)."""
    database = pg_database(project)
    if database is not None:
        with database.connect() as con, con.cursor() as cursor:
            cursor.execute(sql)
        return
    with duckdb.connect(str(project / "warehouse.duckdb")) as con:
        con.execute(sql)


def klaviyo_api(emulator: Emulator, method: str, path: str, body: Any = None) -> Any:
    """Change Klaviyo as someone else would (the web app, another tool): one request to
    the emulator with the test key, outside the sync. Returns the JSON answer, if any."""
    answer = requests.request(
        method,
        emulator.url + path,
        json=body,
        headers={
            "Authorization": f"Klaviyo-API-Key {PRIVATE_KEY}",
            "revision": "2026-07-15",
            "Content-Type": "application/vnd.api+json",
            "Accept": "application/vnd.api+json",
        },
        timeout=30,
    )
    assert answer.status_code < 300, answer.text
    return answer.json() if answer.content else None


# -- PostgreSQL ------------------------------------------------------------------------------

PROFILE = "klaviyo_sync_integration_tests"


@dataclass(frozen=True)
class PgDatabase:
    """A database on the test server (`postgres`, the maintenance database, for the server)."""

    host: str
    port: int
    user: str
    name: str = "postgres"

    def env(self) -> dict[str, str]:
        """The variables integration_tests/profiles.yml reads for its postgres target."""
        return {
            "DBT_KLAVIYO_PG_HOST": self.host,
            "DBT_KLAVIYO_PG_PORT": str(self.port),
            "DBT_KLAVIYO_PG_USER": self.user,
            "DBT_KLAVIYO_PG_DATABASE": self.name,
        }

    @contextlib.contextmanager
    def connect(self) -> Iterator[Any]:
        """A connection whose work is committed when the block ends (rolled back on an
        error), then closed. psycopg2's own `with` closes nothing."""
        con = self._connect(self.name)
        try:
            with con:
                yield con
        finally:
            con.close()

    def database(self, name: str) -> PgDatabase:
        return dataclasses.replace(self, name=name)

    def create(self, template: PgDatabase | None = None) -> None:
        """Create the database afresh (a leftover of a killed run is dropped first), empty or
        as a copy of `template`, which the server copies block by block: no dbt, no SQL."""
        create = SQL("CREATE DATABASE {}").format(Identifier(self.name))
        if template is not None:
            create += SQL(" TEMPLATE {}").format(Identifier(template.name))
        self.drop()
        self._maintenance(create)

    def drop(self) -> None:
        """Drop the database, closing whatever connections are still open to it."""
        drop = SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        self._maintenance(drop.format(Identifier(self.name)))

    def _maintenance(self, statement: Any) -> None:
        """A statement that cannot run in a transaction, from the maintenance database."""
        con = self._connect("postgres")
        try:
            con.autocommit = True
            with con.cursor() as cursor:
                cursor.execute(statement)
        finally:
            con.close()

    def _connect(self, name: str) -> Any:
        return psycopg2.connect(
            host=self.host, port=self.port, user=self.user, dbname=name, connect_timeout=10
        )


@pytest.fixture(scope="session")
def pg_server() -> PgDatabase:
    """The server `python3 dev.py test` started, from the variables it sets."""
    variables = ("DBT_KLAVIYO_PG_HOST", "DBT_KLAVIYO_PG_PORT", "DBT_KLAVIYO_PG_USER")
    if not all(os.environ.get(name) for name in variables):
        reason = (
            "no PostgreSQL server for the tests: run `python3 dev.py test`, which starts one "
            "(or start one with `python3 scripts/postgres.py` and export the variables it "
            f"prints: {', '.join(variables)})"
        )
        if os.environ.get("DBT_KLAVIYO_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    host, port, user = (os.environ[name] for name in variables)
    server = PgDatabase(host, int(port), user)
    try:
        with server.connect():
            pass
    except psycopg2.Error as exc:
        pytest.fail(f"cannot reach PostgreSQL at {host}:{port} as {user}: {exc}", pytrace=False)
    return server


def write_pg_profile(project: Path, database: PgDatabase) -> None:
    """Make the project's profile default to its postgres target, connected to `database`
    with the values written out: the tests' helpers run dbt and the CLI without the caller's
    DBT_ variables (`clean_env`), so the profile must not depend on them."""
    profiles_yml = project / "profiles.yml"
    profiles = yaml.safe_load(profiles_yml.read_text())
    profiles[PROFILE]["target"] = "postgres"
    output = profiles[PROFILE]["outputs"]["postgres"]
    output.update(host=database.host, port=database.port, user=database.user)
    output.update(dbname=database.name)
    profiles_yml.write_text(yaml.safe_dump(profiles, sort_keys=False))


def pg_database(project: Path) -> PgDatabase | None:
    """The database a project copy's profile reads by default, when it is PostgreSQL."""
    try:
        profile = yaml.safe_load((project / "profiles.yml").read_text())[PROFILE]
        output = profile["outputs"][profile["target"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    if output.get("type") != "postgres":
        return None
    return PgDatabase(output["host"], int(output["port"]), output["user"], output["dbname"])


#: The demo project's database on PostgreSQL, built once a run (`built_pg_project`): the
#: template of every test's copy. The same name on every run, so that a run drops what a
#: killed one left behind.
PG_BUILT = "klaviyo_built"


def _pg_copy_name() -> str:
    """This worker's name for its tests' copies of `PG_BUILT` (pytest-xdist runs workers
    side by side)."""
    return f"klaviyo_test_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"


@pytest.fixture(scope="session")
def built_pg_project(pg_server: PgDatabase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo project built on PostgreSQL once for the run, all workers sharing it, into
    the database `PG_BUILT`, which `pytest_sessionfinish` drops. Each worker parses a copy
    of the folder for its copies' database, so that each copy starts without parsing."""
    built = shared_by_workers(
        tmp_path_factory, "built_pg", lambda folder: _build_pg(pg_server.database(PG_BUILT), folder)
    )
    folder = tmp_path_factory.mktemp("built_pg") / "integration_tests"
    project = Path(shutil.copytree(built, folder, symlinks=True))
    write_pg_profile(project, pg_server.database(_pg_copy_name()))
    with environment(project, clean_env()):
        select_models(DbtProject.locate(DbtArgs(project_dir=".", profiles_dir=".")))
    return project


def _build_pg(built: PgDatabase, folder: Path) -> Path:
    built.create()
    project = copy_integration_project(folder / "integration_tests")
    # Built through the repository's own profile, as a user would: DBT_TARGET and the
    # variables its postgres target reads.
    env = {**built.env(), "DBT_TARGET": "postgres"}
    for args in (("deps",), ("build",)):
        done = run_dbt(project, *args, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    return project


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Once every worker is done, the controller (or a run without xdist) drops the
    database the workers shared (`built_pg_project`), if the run had a server."""
    variables = ("DBT_KLAVIYO_PG_HOST", "DBT_KLAVIYO_PG_PORT", "DBT_KLAVIYO_PG_USER")
    if os.environ.get("PYTEST_XDIST_WORKER") or not all(os.environ.get(v) for v in variables):
        return
    host, port, user = (os.environ[name] for name in variables)
    try:
        PgDatabase(host, int(port), user).database(PG_BUILT).drop()
    except psycopg2.Error as exc:
        print(f"\nwarning: could not drop the test database {PG_BUILT}: {exc}", file=sys.stderr)


@pytest.fixture
def make_pg_project(
    built_pg_project: Path, pg_server: PgDatabase, tmp_path: Path
) -> Iterator[Callable[[str], Path]]:
    """Makes private copies of the built PostgreSQL project: `make_pg_project("")` is the
    one `pg_project` gives, `make_pg_project("b")` another, in a database of its own (its
    first sync parses the project again, for that database). Dropped after the test."""
    made: list[PgDatabase] = []

    def make(suffix: str = "") -> Path:
        database = pg_server.database(_pg_copy_name() + (f"_{suffix}" if suffix else ""))
        assert database not in made, f"a copy with the suffix {suffix!r} exists: pick another"
        database.create(template=pg_server.database(PG_BUILT))
        made.append(database)
        project = Path(
            shutil.copytree(built_pg_project, tmp_path / f"pg_project{suffix}", symlinks=True)
        )
        if suffix:
            write_pg_profile(project, database)
        return project

    yield make
    for database in made:
        database.drop()


@pytest.fixture
def pg_project(make_pg_project: Callable[[str], Path]) -> Path:
    """A private copy of the demo project built on PostgreSQL: its own database (the
    sync's state schema goes there too) and its own folder, whose profiles.yml defaults to
    that database's postgres target. The helpers take it as they take `project`:
    `sync(pg_project, emulator)` runs the real CLI against PostgreSQL, and `model_rows` and
    `change_model` query its database (in PostgreSQL's SQL)."""
    return make_pg_project("")


@pytest.fixture(params=["duckdb", "postgres"])
def warehouse_project(request: pytest.FixtureRequest) -> Path:
    """`project` and then `pg_project`: a test taking this fixture runs on each warehouse,
    as test_x[duckdb] and test_x[postgres] (`-k postgres` picks the PostgreSQL runs)."""
    return Path(request.getfixturevalue("project" if request.param == "duckdb" else "pg_project"))
