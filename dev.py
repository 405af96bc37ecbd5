#!/usr/bin/env python3
"""Set-up and everyday commands. Needs nothing but Python 3.11.

    python3 dev.py demo   # dbt builds 1,200 customers, the emulator starts, two syncs
    python3 dev.py test   # lint, type checks and the whole test suite (what CI runs),
                          # with a throwaway PostgreSQL server (scripts/postgres.py) and,
                          # installed as root when missing, Chromium (scripts/chromium.py)
    python3 dev.py test --dbt 1.12   # the same next to dbt-core 1.12 (.venv-dbt112/)
    python3 dev.py docs   # rewrite the command outputs shown in the docs by running them
                          # (tests/test_docs_outputs.py), then build the site with --strict
    python3 dev.py dist   # build the sdist and the wheel into dist/, and `twine check` them
    python3 dev.py bench  # benchmarks at 100k, 1M and 10M rows (see benchmarks/run.py)

Each creates `.venv/` (or its lane's) and installs the project into it on first use (and
again whenever pyproject.toml or the lane's constraints change), then runs inside it. Each
lane pins dbt-core with a constraints file (constraints/): the package itself accepts any
dbt-core it supports.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

from scripts import chromium, postgres

ROOT = Path(__file__).resolve().parent
#: The dbt-core versions CI tests: each its virtual environment and constraints file.
LANES = {"1.11": ".venv", "1.12": ".venv-dbt112"}
DEFAULT_LANE = "1.11"
#: What the wheel must carry besides the Python modules (they are read at run time).
WHEEL_DATA = (
    "dbt_klaviyo_sync/py.typed",
    "dbt_klaviyo_sync/schema/annotations.json",
    "dbt_klaviyo_sync/klaviyo/openapi-subset.json",
)
VENV = ROOT / LANES[DEFAULT_LANE]
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"


def use_lane(lane: str) -> None:
    """Run in the virtual environment of dbt-core `lane` from now on."""
    global VENV, BIN, PYTHON
    if lane not in LANES:
        sys.exit(f"no test lane for dbt {lane}; there are: {', '.join(LANES)}")
    VENV = ROOT / LANES[lane]
    BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
    PYTHON = BIN / "python"


def ensure_venv() -> None:
    """Create the virtual environment and install the project with its dev extras, dbt-core
    held to the lane's version by its constraints file."""
    lane = next(name for name, folder in LANES.items() if ROOT / folder == VENV)
    constraints = ROOT / "constraints" / f"dbt-{lane}.txt"
    stamp = VENV / ".installed"
    wanted = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + constraints.read_bytes()
    ).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    if not PYTHON.exists():
        print(f"Creating {VENV} ...", flush=True)
        venv.create(VENV, with_pip=True)
    print(
        f"Installing dbt-klaviyo-sync and its dependencies, with dbt {lane} (a minute or two) ...",
        flush=True,
    )
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-c", str(constraints), "-e", f"{ROOT}[dev]"], check=True)
    stamp.write_text(wanted)


def run(*command: str, env: dict[str, str] | None = None) -> None:
    print("$", " ".join(command), flush=True)
    with subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}) as process:
        try:
            returncode = process.wait()
        except KeyboardInterrupt:  # the command got the same Ctrl-C: let it stop its own way
            returncode = process.wait()
        except BaseException:
            process.kill()
            raise
    if returncode:
        sys.exit(returncode)


def site() -> None:
    """Build the docs/ site with --strict into a throwaway directory: the link check, failing
    on a link to a missing page or anchor (README.md's links are tests/test_docs.py's)."""
    with tempfile.TemporaryDirectory(prefix="dbt-klaviyo-site-") as site:
        run(
            str(BIN / "mkdocs"),
            "build",
            "--strict",
            "--quiet",
            "--site-dir",
            site,
            env={"NO_MKDOCS_2_WARNING": "1"},
        )


@contextlib.contextmanager
def postgres_server() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL server, stopped whatever happens (a failure, Ctrl-C, or CI
    cancelling the job with SIGTERM); yields the environment that makes the tests use it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    print("Starting a throwaway PostgreSQL server for the tests ...", flush=True)
    try:
        server = postgres.start()
    except postgres.ServerError as exc:
        sys.exit(f"cannot start PostgreSQL for the tests: {exc}")
    print(f"PostgreSQL listens on 127.0.0.1:{server.port} ({server.directory})", flush=True)
    try:
        # Required: with the server up, a PostgreSQL test that cannot reach it is an error.
        yield {**server.env(), "DBT_KLAVIYO_REQUIRE_POSTGRES": "1"}
    finally:
        try:
            server.stop()
        except postgres.ServerError as exc:
            print(f"warning: stopping PostgreSQL: {exc}", file=sys.stderr)


def test(pytest_args: list[str]) -> None:
    """Lint, type checks, then the tests with a throwaway PostgreSQL server."""
    run(str(BIN / "ruff"), "check", ".")
    run(str(BIN / "ruff"), "format", "--check", ".")
    run(str(BIN / "mypy"), "dbt_klaviyo_sync")
    site()
    try:
        browser = chromium.ensure()
    except chromium.BrowserError as exc:
        sys.exit(f"cannot install Chromium for the tests: {exc}")
    if not browser:
        print("Chromium is not installed: the report's browser tests will be skipped.")
    with postgres_server() as env:
        if browser:  # and with Chromium here, a browser test that cannot run is an error
            env["DBT_KLAVIYO_REQUIRE_CHROMIUM"] = "1"
        run(str(BIN / "pytest"), "-q", "-n", "3", *pytest_args, env=env)


def docs() -> None:
    """Rewrite the command outputs shown in the docs from runs of the commands: the docs
    outputs test (tests/test_docs_outputs.py) told to write the blocks instead of comparing
    them, one scenario after another (they write the same pages); then build the site."""
    with postgres_server() as env:
        env["DBT_KLAVIYO_DOCS_WRITE"] = "1"
        run(str(BIN / "pytest"), "-q", "tests/test_docs_outputs.py", env=env)
    site()


def dist() -> None:
    """Build the sdist and the wheel as a release would (in an isolated environment), check
    their metadata with twine, and that the wheel carries the data files the tool reads."""
    out = ROOT / "dist"
    shutil.rmtree(out, ignore_errors=True)
    run(str(PYTHON), "-m", "build", "--outdir", str(out), str(ROOT))
    built = sorted(str(path) for path in out.iterdir())
    run(str(BIN / "twine"), "check", "--strict", *built)
    [wheel] = out.glob("*.whl")
    missing = set(WHEEL_DATA) - set(zipfile.ZipFile(wheel).namelist())
    if missing:
        sys.exit(f"{wheel.name} lacks {', '.join(sorted(missing))}")
    print(f"{wheel.name} holds the package and its data files", flush=True)


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    scripts = {"demo": ROOT / "scripts" / "demo.py", "bench": ROOT / "benchmarks" / "run.py"}
    if command not in ("test", "dist", "docs") and command not in scripts:
        sys.exit(__doc__)
    args = sys.argv[2:]
    if command == "test" and args[:1] == ["--dbt"]:
        if len(args) < 2:
            sys.exit("--dbt takes a dbt-core version: " + ", ".join(LANES))
        use_lane(args[1])
        args = args[2:]
    ensure_venv()
    if command == "test":
        test(args)
    elif command == "dist":
        dist()
    elif command == "docs":
        docs()
    else:
        script = scripts[command]
        done = subprocess.run([str(PYTHON), str(script), *args], cwd=script.parent)
        sys.exit(done.returncode)


if __name__ == "__main__":
    main()
