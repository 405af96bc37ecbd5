"""The dbt package beside the tool: `sync` and `validate` refuse one of another minor
version and say how to install the right one, warn for another patch; its history sources
leave the project with a var. Real dbt, a real project, the emulator over HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from dbt_klaviyo_sync import __version__
from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import REPO, dbt_klaviyo, run_dbt, sync_customers

MAJOR, MINOR, PATCH = (int(part) for part in __version__.split("."))


def install_package_version(project: Path, version: str) -> Path:
    """Put a copy of the dbt package of `version` where `dbt deps` installed ours."""
    installed = project / "dbt_packages" / "klaviyo_sync"
    installed.unlink()  # `local:` packages are symlinks
    for part in ("macros", "models"):
        shutil.copytree(REPO / part, installed / part)
    config = yaml.safe_load((REPO / "dbt_project.yml").read_text())
    (installed / "dbt_project.yml").write_text(yaml.safe_dump({**config, "version": version}))
    return installed


def test_a_dbt_package_of_another_minor_version_stops_before_sending(
    project: Path, emulator: Emulator
) -> None:
    older = f"{MAJOR}.{MINOR - 1 if MINOR else MINOR + 1}.0"
    installed = install_package_version(project, older)

    done = sync_customers(project, emulator)

    assert done.returncode == 2, done.output
    assert emulator.request_log() == []
    expected = (
        f"the dbt package klaviyo_sync installed in {installed} is version {older}, but "
        f"dbt-klaviyo is {__version__}: in packages.yml, point `local: {REPO}` at a checkout of "
        f"dbt-klaviyo-sync {__version__}, then run `dbt deps`."
    )
    assert expected in done.stderr
    assert f"pip install 'dbt-klaviyo-sync=={older}'" in done.stderr

    checked = dbt_klaviyo(
        project, emulator, "validate", "--project-dir", ".", "--profiles-dir", "."
    )
    assert checked.returncode == 2
    assert expected in " ".join(checked.stdout.split())  # as wrapped to the terminal


def test_a_dbt_package_of_another_patch_version_is_a_warning(
    project: Path, emulator: Emulator
) -> None:
    newer = f"{MAJOR}.{MINOR}.{PATCH + 1}"
    install_package_version(project, newer)
    done = sync_customers(project, emulator)
    assert done.returncode == 0, done.output
    assert "Warning: the dbt package klaviyo_sync installed in" in done.stderr
    assert f"is version {newer}, but dbt-klaviyo is {__version__}" in done.stderr
    assert done.row("customers")["added"] == 1200


def test_the_fix_names_the_git_revision_to_install(project: Path, emulator: Emulator) -> None:
    install_package_version(project, f"{MAJOR + 1}.0.0")
    url = "https://github.com/dbt-klaviyo-sync/dbt-klaviyo-sync.git"
    (project / "packages.yml").write_text(
        yaml.safe_dump({"packages": [{"git": url, "revision": f"v{MAJOR + 1}.0.0"}]})
    )
    done = sync_customers(project, emulator)
    assert done.returncode == 2, done.output
    assert f'in packages.yml, set the entry of {url} to `revision: "v{__version__}"`' in done.stderr


def test_the_history_sources_leave_the_project_with_a_var(project: Path) -> None:
    def sources(*args: str) -> set[str]:
        listed = run_dbt(project, "ls", "--resource-type", "source", "-q", *args)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        return {line for line in listed.stdout.splitlines() if line.startswith("source:")}

    history = {f"source:klaviyo_sync.klaviyo_sync.{t}" for t in ("runs", "rejects", "syncs")}
    assert history <= sources()
    assert not sources("--vars", "{klaviyo_sync_history: false}")
