#!/usr/bin/env python3
"""Set-up and everyday commands. Needs nothing but Python 3.11.

    python3 dev.py demo   # dbt builds 1,200 customers, the emulator starts, two syncs
    python3 dev.py test   # lint, type checks and the whole test suite (what CI runs),
                          # with a throwaway PostgreSQL server (scripts/postgres.py) and,
                          # installed as root when missing, Chromium (scripts/chromium.py)
    python3 dev.py bench  # benchmarks at 100k, 1M and 10M rows (see benchmarks/run.py)

Both create `.venv/` and install the project into it on first use (and again whenever
pyproject.toml changes), then run inside it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

from scripts import chromium, postgres

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"


def ensure_venv() -> None:
    """Create the virtual environment and install the project with its dev extras."""
    stamp = VENV / ".installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    if not PYTHON.exists():
        print(f"Creating {VENV} ...", flush=True)
        venv.create(VENV, with_pip=True)
    print("Installing dbt-klaviyo-sync and its dependencies (a minute or two) ...", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
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


def test(pytest_args: list[str]) -> None:
    """Lint, type checks, then the tests with a throwaway PostgreSQL server, which is
    stopped whatever happens (a failure, Ctrl-C, or CI cancelling the job with SIGTERM)."""
    run(str(BIN / "ruff"), "check", ".")
    run(str(BIN / "ruff"), "format", "--check", ".")
    run(str(BIN / "mypy"), "dbt_klaviyo_sync")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        browser = chromium.ensure()
    except chromium.BrowserError as exc:
        sys.exit(f"cannot install Chromium for the tests: {exc}")
    if not browser:
        print("Chromium is not installed: the report's browser tests will be skipped.")
    print("Starting a throwaway PostgreSQL server for the tests ...", flush=True)
    try:
        server = postgres.start()
    except postgres.ServerError as exc:
        sys.exit(f"cannot start PostgreSQL for the tests: {exc}")
    print(f"PostgreSQL listens on 127.0.0.1:{server.port} ({server.directory})", flush=True)
    try:
        # Required: with the server up, a PostgreSQL test that cannot reach it is an error.
        env = {**server.env(), "DBT_KLAVIYO_REQUIRE_POSTGRES": "1"}
        if browser:  # and with Chromium here, a browser test that cannot run is an error
            env["DBT_KLAVIYO_REQUIRE_CHROMIUM"] = "1"
        run(str(BIN / "pytest"), "-q", "-n", "3", *pytest_args, env=env)
    finally:
        try:
            server.stop()
        except postgres.ServerError as exc:
            print(f"warning: stopping PostgreSQL: {exc}", file=sys.stderr)


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    scripts = {"demo": ROOT / "scripts" / "demo.py", "bench": ROOT / "benchmarks" / "run.py"}
    if command != "test" and command not in scripts:
        sys.exit(__doc__)
    ensure_venv()
    if command == "test":
        test(sys.argv[2:])
    else:
        script = scripts[command]
        done = subprocess.run([str(PYTHON), str(script), *sys.argv[2:]], cwd=script.parent)
        sys.exit(done.returncode)


if __name__ == "__main__":
    main()
