"""Shared fixtures: a built copy of integration_tests/, the emulator, and the real CLI.

dbt takes seconds per invocation, so the demo project is copied and built once per session;
each test that syncs gets its own copy of that built project (a few MB), so tests never see
each other's state or data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
import requests

from dbt_klaviyo_sync.cli import main
from dbt_klaviyo_sync.dbt import DbtArgs, DbtProject, select_models
from dbt_klaviyo_sync.emulator import Emulator
from dbt_klaviyo_sync.state import RunCounts

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


def run_dbt(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dbt"), *args, "--profiles-dir", str(project)],
        cwd=project,
        env=clean_env(),
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


@pytest.fixture(scope="session")
def built_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_integration_project(tmp_path_factory.mktemp("built") / "integration_tests")
    for args in (("deps",), ("build",)):
        done = run_dbt(project, *args)
        assert done.returncode == 0, done.stdout + done.stderr
    # Parse once as a sync does, so that the manifest is stamped with its target: the copies
    # of this project then start without parsing again (seconds per test).
    with environment(project, clean_env()):
        select_models(DbtProject.locate(DbtArgs(project_dir=".", profiles_dir=".")))
    return project


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
    with duckdb.connect(str(project / "warehouse.duckdb"), read_only=True) as con:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def change_model(project: Path, sql: str) -> None:
    """Change the built model directly, for cases the demo's dbt vars do not cover."""
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
