"""What a user installs: one version for the tool and its dbt package, the emulator's
dependencies only with the `[emulator]` extra, the versions `--version` reports, the
license."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib

import yaml

from dbt_klaviyo_sync import __version__
from tests.conftest import BIN, REPO, clean_env


def test_the_dbt_package_has_the_tools_version() -> None:
    package = yaml.safe_load((REPO / "dbt_project.yml").read_text())
    assert package["name"] == "klaviyo_sync"
    assert str(package["version"]) == __version__
    assert importlib.metadata.version("dbt-klaviyo-sync") == __version__


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, cwd=REPO
    )


def test_syncing_never_imports_the_emulators_dependencies() -> None:
    done = _python(
        "import sys\n"
        "import dbt_klaviyo_sync.api, dbt_klaviyo_sync.cli, dbt_klaviyo_sync.runner\n"
        "from dbt_klaviyo_sync.cli import main\n"
        "for argv in (['--help'], ['sync', '--help'], ['validate', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('werkzeug', 'fastjsonschema')))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_the_emulator_without_its_extra_says_what_to_install() -> None:
    # As if `pip install dbt-klaviyo-sync` had left the extra out: the imports fail.
    done = _python(
        "import sys\n"
        "sys.modules['werkzeug'] = sys.modules['fastjsonschema'] = None\n"
        "from dbt_klaviyo_sync.cli import main\n"
        "main(['emulator', '--port', '0'])\n"
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "Error: the emulator needs werkzeug, which is not installed: "
        "pip install 'dbt-klaviyo-sync[emulator]'"
    ]


def test_the_emulators_dependencies_are_an_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    emulator_only = {"werkzeug", "fastjsonschema"}
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert not names & emulator_only
    extra = {d.split(">")[0] for d in project["optional-dependencies"]["emulator"]}
    assert extra == emulator_only
    assert "dbt-klaviyo-sync[emulator]" in project["optional-dependencies"]["dev"]


def test_version_shows_the_tools_dbts_and_the_adapters() -> None:
    done = subprocess.run(
        [str(BIN / "dbt-klaviyo"), "--version"], env=clean_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        f"dbt-klaviyo: {__version__}",
        f"dbt-core: {importlib.metadata.version('dbt-core')}",
    ]
    # Each adapter installed, as `dbt --version` lists them (found without dbt's private API).
    listed = dict(line.split(": ") for line in lines[2:])
    assert {"dbt-duckdb", "dbt-postgres"} <= set(listed)
    assert listed == {name: importlib.metadata.version(name) for name in listed}


def test_the_license_is_the_one_declared() -> None:
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == (
        "Apache-2.0"
    )
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
