"""The only module that imports dbt.

It does what dbt knows best: (re)parse the project when its manifest is missing or older
than the project's files, build models for `sync --build`, and read the selected profile
target to find the DuckDB files that hold the built models. dbt is imported inside the
functions, so `--help` and the emulator stay fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dbt_klaviyo_sync.errors import ConfigurationError

# Folders that hold dbt's output or installed packages, not the project's own sources.
_SKIP_DIRS = {"target", "dbt_packages", "dbt_modules", "logs", "node_modules", "__pycache__"}
_SOURCE_SUFFIXES = {".sql", ".yml", ".yaml", ".csv", ".py", ".md", ".jinja"}


@dataclass(frozen=True)
class DbtProject:
    """Where the dbt project, its profiles and its target live, as the user gave them."""

    project_dir: Path
    profiles_dir: Path
    target: str | None = None

    @classmethod
    def locate(
        cls, project_dir: str | None, profiles_dir: str | None, target: str | None
    ) -> DbtProject:
        """Resolve directories exactly as dbt does, so both tools see the same project."""
        from dbt.cli.resolvers import default_profiles_dir, default_project_dir

        project = Path(project_dir) if project_dir else default_project_dir()
        if not (project / "dbt_project.yml").is_file():
            raise ConfigurationError(
                f"no dbt_project.yml in {project.resolve()}: "
                "run from your dbt project or pass --project-dir."
            )
        profiles = profiles_dir or os.environ.get("DBT_PROFILES_DIR") or default_profiles_dir()
        return cls(project.resolve(), Path(profiles).resolve(), target)

    def _project_yml(self) -> dict[str, Any]:
        with open(self.project_dir / "dbt_project.yml") as f:
            loaded = yaml.safe_load(f) or {}
        return loaded if isinstance(loaded, dict) else {}

    @property
    def target_path(self) -> Path:
        configured = os.environ.get("DBT_TARGET_PATH") or self._project_yml().get("target-path")
        return self.project_dir / (configured or "target")

    @property
    def manifest_path(self) -> Path:
        return self.target_path / "manifest.json"

    def _cli_args(self) -> list[str]:
        args = ["--project-dir", str(self.project_dir), "--profiles-dir", str(self.profiles_dir)]
        return args + (["--target", self.target] if self.target else [])


def manifest_is_stale(project: DbtProject) -> bool:
    """True when manifest.json is missing or any project source file is newer than it."""
    manifest = project.manifest_path
    if not manifest.is_file():
        return True
    built = manifest.stat().st_mtime
    skip = _SKIP_DIRS | {project.target_path.name}
    for root, dirs, files in os.walk(project.project_dir):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        for name in files:
            path = Path(root, name)
            if path.suffix in _SOURCE_SUFFIXES and path.stat().st_mtime > built:
                return True
    return False


def ensure_manifest(project: DbtProject) -> Path:
    """The path of a manifest that reflects the project's current files, parsing if needed."""
    if manifest_is_stale(project):
        from dbt.cli.main import dbtRunner

        result = dbtRunner().invoke(["parse", "--quiet", *project._cli_args()])
        if not result.success:
            raise ConfigurationError(
                f"`dbt parse` failed for {project.project_dir}: "
                f"{result.exception or 'see the dbt output above'}. "
                "Fix the project (try `dbt parse` yourself) and run again."
            )
    return project.manifest_path


def build(project: DbtProject, models: list[str]) -> set[str]:
    """`dbt build` the models (and their tests); the unique ids of those that built and
    passed their tests. A model whose tests fail is not synced: tests gate the sync.

    dbt runs in a process of its own: dbt-duckdb keeps the database open in the process
    that ran it, which would stop the sync from attaching it. Its output goes to stderr,
    so that stdout keeps to the summary (and to JSON with `--output json`)."""
    command = [sys.executable, "-c", "from dbt.cli.main import cli; cli()", "build"]
    process = subprocess.Popen(
        [*command, "--select", *models, *project._cli_args()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in process.stdout or []:
        sys.stderr.write(line)
    process.wait()
    results = project.target_path / "run_results.json"
    if process.returncode not in (0, 1) or not results.is_file():
        raise ConfigurationError(
            f"`dbt build` could not run for {project.project_dir} (exit status "
            f"{process.returncode}); see its output above. Fix the project and run again."
        )
    built: set[str] = set()
    failed: set[str] = set()
    nodes = json.loads(results.read_text())["results"]
    for node in nodes:
        kind, status = node["unique_id"].split(".")[0], node["status"]
        if kind == "model":
            (built if status == "success" else failed).add(node["unique_id"])
        elif kind in ("test", "unit_test") and status in ("fail", "error"):
            failed.update(_tested_models(project, node["unique_id"]))
    return built - failed


def _tested_models(project: DbtProject, test_id: str) -> list[str]:
    manifest = json.loads(project.manifest_path.read_text())
    node = manifest["nodes"].get(test_id) or manifest.get("unit_tests", {}).get(test_id, {})
    return list(node.get("depends_on", {}).get("nodes", []))


@dataclass(frozen=True)
class Warehouse:
    """The DuckDB files of the profile target, by the catalog name dbt gives them."""

    target_name: str
    databases: dict[str, Path]


def _local_file(path: str, what: str) -> Path:
    if path == ":memory:" or "://" in path or path.startswith(("md:", "motherduck:")):
        raise ConfigurationError(
            f"the dbt profile's {what} is {path!r}; dbt-klaviyo reads models from a local "
            "DuckDB file. Set `path:` in profiles.yml to a file."
        )
    # dbt-duckdb opens relative paths from the current directory; so do we.
    return Path(path).resolve()


def load_warehouse(project: DbtProject) -> Warehouse:
    """Read the profile target dbt would use and return its DuckDB database files."""
    from dbt.config.runtime import load_profile
    from dbt.flags import set_from_args
    from dbt_common.exceptions import DbtRuntimeError

    set_from_args(
        Namespace(
            project_dir=str(project.project_dir),
            profiles_dir=str(project.profiles_dir),
            target=project.target,
        ),
        None,
    )
    try:
        profile = load_profile(str(project.project_dir), {}, None, project.target)
    except DbtRuntimeError as exc:
        raise ConfigurationError(
            f"cannot load the dbt profile from {project.profiles_dir}: {exc}"
        ) from exc
    credentials: Any = profile.credentials  # DuckDBCredentials, checked just below
    if credentials.type != "duckdb":
        raise ConfigurationError(
            f"the dbt target '{profile.target_name}' uses the {credentials.type!r} adapter; "
            "dbt-klaviyo currently reads models from dbt-duckdb targets only."
        )
    databases = {credentials.database: _local_file(credentials.path, "path")}
    for attachment in credentials.attach or []:
        alias = attachment.alias or credentials.path_derived_database_name(attachment.path)
        databases[alias] = _local_file(attachment.path, f"attachment {alias!r}")
    return Warehouse(profile.target_name, databases)
