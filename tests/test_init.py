"""`dbt-klaviyo init` wires the dbt package into a new dbt-duckdb project: packages.yml at
the tool's version, the commented example, then a real `dbt deps`, after which `dbt parse`
succeeds. The package comes from this checkout (`--local`), there being no network here;
the git entry users get is checked as text, with `--no-deps`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dbt_klaviyo_sync import __version__
from dbt_klaviyo_sync.dbt import PACKAGE_GIT
from tests.conftest import REPO, dbt_klaviyo, run_dbt

GIT_ENTRY = f'  - git: "{PACKAGE_GIT}"\n    revision: "v{__version__}"\n'


@pytest.fixture
def new_project(tmp_path: Path) -> Path:
    """A minimal dbt-duckdb project, as `dbt init` would leave one: one model, no packages."""
    project = tmp_path / "shop"
    (project / "models").mkdir(parents=True)
    (project / "dbt_project.yml").write_text(
        'name: shop\nversion: "1.0.0"\nprofile: shop\nmodel-paths: ["models"]\n'
    )
    (project / "profiles.yml").write_text(
        "shop:\n  target: dev\n  outputs:\n    dev:\n      type: duckdb\n"
        f"      path: {project / 'shop.duckdb'}\n"
    )
    (project / "models" / "customers.sql").write_text("select 1 as customer_id\n")
    return project


def test_init_wires_the_package_into_a_new_dbt_duckdb_project(new_project: Path) -> None:
    done = dbt_klaviyo(new_project, None, "init", "--local", str(REPO))

    assert done.returncode == 0, done.output
    assert done.stdout.splitlines() == [
        f'Added klaviyo_sync {__version__} to packages.yml (local: "{REPO}").',
        "Wrote models/klaviyo/klaviyo_example.yml: a commented-out profile upsert annotation "
        "to adapt.",
        "Ran `dbt deps`: the dbt package klaviyo_sync is installed.",
        "Next: annotate a model (see models/klaviyo/klaviyo_example.yml), `dbt build`, then "
        "`dbt-klaviyo validate`.",
    ]
    assert (new_project / "packages.yml").read_text() == f'packages:\n  - local: "{REPO}"\n'
    assert "Installed from <local" in done.stderr  # dbt's own output, on stderr
    installed = yaml.safe_load(
        (new_project / "dbt_packages" / "klaviyo_sync" / "dbt_project.yml").read_text()
    )
    assert installed["name"] == "klaviyo_sync" and installed["version"] == __version__
    example = (new_project / "models" / "klaviyo" / "klaviyo_example.yml").read_text()
    assert "#           object: profile" in example
    assert "{meta: {klaviyo: {sync_key: external_id}}}" in example
    assert "Profile upsert (Census: Update or Create)" in example  # docs/behaviours.md's section
    parsed = run_dbt(new_project, "parse")
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr

    files = ("packages.yml", "package-lock.yml", "models/klaviyo/klaviyo_example.yml")
    before = {name: (new_project / name).read_bytes() for name in files}
    again = dbt_klaviyo(new_project, None, "init", "--local", str(REPO))
    assert again.returncode == 0, again.output
    assert "packages.yml already has an entry for klaviyo_sync" in again.stdout
    assert "models/klaviyo/klaviyo_example.yml exists: left as it is." in again.stdout
    assert {name: (new_project / name).read_bytes() for name in files} == before


def test_the_git_entry_joins_the_list_keeping_comments_and_entries(new_project: Path) -> None:
    (new_project / "packages.yml").write_text(
        "# shared packages\npackages:\n"
        '    - package: dbt-labs/dbt_utils   # utilities\n      version: [">=1.0.0", "<2.0.0"]\n'
        "# the end\n"
    )
    done = dbt_klaviyo(new_project, None, "init", "--no-deps")

    assert done.returncode == 0, done.output
    assert f"Added klaviyo_sync {__version__} to packages.yml (git: " in done.stdout
    assert (new_project / "packages.yml").read_text() == (
        "# shared packages\npackages:\n"
        '    - package: dbt-labs/dbt_utils   # utilities\n      version: [">=1.0.0", "<2.0.0"]\n'
        + f'    - git: "{PACKAGE_GIT}"\n      revision: "v{__version__}"\n'
        + "# the end\n"
    )
    assert "Skipped `dbt deps` (--no-deps)" in done.stdout
    assert not (new_project / "dbt_packages").exists()


def test_a_new_packages_yml_gets_the_git_entry_sync_asks_for(new_project: Path) -> None:
    done = dbt_klaviyo(new_project, None, "init", "--no-deps")
    assert done.returncode == 0, done.output
    assert (new_project / "packages.yml").read_text() == "packages:\n" + GIT_ENTRY


def test_an_entry_of_another_revision_is_left_with_a_warning(new_project: Path) -> None:
    text = f"packages:\n  - git: {PACKAGE_GIT}\n    revision: v0.0.3\n"
    (new_project / "packages.yml").write_text(text)
    done = dbt_klaviyo(new_project, None, "init", "--no-deps")
    assert done.returncode == 0, done.output
    assert "left as it is. Warning: dbt-klaviyo is" in done.stdout
    assert f'set its `revision: "v{__version__}"` and run `dbt deps`' in done.stdout
    assert (new_project / "packages.yml").read_text() == text


def test_a_one_line_packages_list_is_refused_unchanged(new_project: Path) -> None:
    (new_project / "packages.yml").write_text("packages: []\n")
    done = dbt_klaviyo(new_project, None, "init", "--no-deps")
    assert done.returncode == 2
    assert "add the entry yourself" in done.stderr
    assert (new_project / "packages.yml").read_text() == "packages: []\n"


def test_no_dbt_project_is_refused(tmp_path: Path) -> None:
    done = dbt_klaviyo(tmp_path, None, "init", "--no-deps")
    assert done.returncode == 2
    assert f"Error: no dbt_project.yml in {tmp_path}: run `dbt-klaviyo init`" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failing_dbt_deps_is_exit_status_2(new_project: Path) -> None:
    done = dbt_klaviyo(new_project, None, "init", "--local", str(new_project / "missing"))
    assert done.returncode == 2
    assert f"Error: `dbt deps` failed for {new_project} (exit status" in done.stderr


def test_from_a_subdirectory_it_finds_the_project_and_its_dependencies_yml(
    new_project: Path,
) -> None:
    """dbt reads packages from dependencies.yml when there is no packages.yml."""
    (new_project / "dependencies.yml").write_text(
        "projects:\n  - name: core\npackages:\n  - local: ../utils\n"
    )
    done = dbt_klaviyo(new_project, None, "init", "--no-deps", cwd=new_project / "models")
    assert done.returncode == 0, done.output
    assert "to dependencies.yml (git: " in done.stdout
    assert not (new_project / "packages.yml").exists()
    assert (new_project / "dependencies.yml").read_text() == (
        "projects:\n  - name: core\npackages:\n  - local: ../utils\n" + GIT_ENTRY
    )
    assert (new_project / "models" / "klaviyo" / "klaviyo_example.yml").is_file()
