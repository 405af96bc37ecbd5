#!/usr/bin/env python3
"""Set-up and everyday commands. Needs nothing but Python 3.11.

    python3 dev.py demo   # dbt builds 1,200 customers, the emulator starts, two syncs
    python3 dev.py test   # lint, type checks and the whole test suite (what CI runs)
    python3 dev.py bench  # benchmarks at 100k, 1M and 10M rows (see benchmarks/run.py)

Both create `.venv/` and install the project into it on first use (and again whenever
pyproject.toml changes), then run inside it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

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


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT)
    if done.returncode:
        sys.exit(done.returncode)


def test(pytest_args: list[str]) -> None:
    run(str(BIN / "ruff"), "check", ".")
    run(str(BIN / "ruff"), "format", "--check", ".")
    run(str(BIN / "mypy"), "dbt_klaviyo_sync")
    run(str(BIN / "pytest"), "-q", "-n", "3", *pytest_args)


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
