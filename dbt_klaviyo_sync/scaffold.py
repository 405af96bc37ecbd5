"""`dbt-klaviyo init`: wire the tool into a user's dbt project.

It adds the dbt package entry to packages.yml at the tool's version (the one `sync` and
`validate` check), writes an annotated example the user adapts, and runs `dbt deps`. It
edits packages.yml as text, so the user's comments and layout stay, and checks that the
result parses to exactly the old entries plus ours before writing it. It never overwrites a
file and never changes an entry that is already there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dbt_klaviyo_sync import __version__
from dbt_klaviyo_sync.dbt import PACKAGE, PACKAGE_GIT, deps, is_package_entry, package_revision
from dbt_klaviyo_sync.errors import ConfigurationError

#: Where the example goes, under the project's first model path.
EXAMPLE = Path("klaviyo") / "klaviyo_example.yml"

_EXAMPLE_TEXT = """\
# An example annotation for dbt-klaviyo, written by `dbt-klaviyo init`. It is commented out,
# so dbt ignores it: copy it into the .yml file of the model you want in Klaviyo, put in your
# model's and columns' names, then `dbt build` and `dbt-klaviyo validate`.
# Each key is described in the docs, docs/annotations.md ("Annotation reference"); this
# behaviour in docs/behaviours.md, "Profile upsert (Census: Update or Create)".
#
# models:
#   - name: customers                  # your model: one row per person
#     config:
#       post_hook: "{{ klaviyo_sync.check() }}"   # fail the build if it cannot be synced
#       meta:
#         klaviyo:
#           object: profile
#           behavior: upsert           # update the matching profile, or create one
#     columns:
#       - name: customer_id            # the row's key, sent as the profile's external_id
#         config: {meta: {klaviyo: {sync_key: external_id}}}
#       - name: email
#         config: {meta: {klaviyo: {field: email}}}
#       - name: first_name
#         config: {meta: {klaviyo: {field: first_name}}}
"""


def init(project_dir: Path, local: str | None, run_deps: bool, say: Callable[[str], None]) -> None:
    """Add the package entry and the example to the dbt project in `project_dir`, then run
    `dbt deps` unless `run_deps` is false; `say` each step done. `local`, for development,
    is a path for a `local:` entry in place of the git entry."""
    if not (project_dir / "dbt_project.yml").is_file():
        raise ConfigurationError(
            f"no dbt_project.yml in {project_dir}: run `dbt-klaviyo init` from your dbt "
            "project, or pass --project-dir (or set DBT_PROJECT_DIR)."
        )
    say(add_package(project_dir, local))
    say(add_example(project_dir))
    if run_deps:
        deps(project_dir)
        say(f"Ran `dbt deps`: the dbt package {PACKAGE} is installed.")
    else:
        say("Skipped `dbt deps` (--no-deps): run it before `dbt build`.")
    say(
        f"Next: annotate a model (see {_example_path(project_dir)}), `dbt build`, then "
        "`dbt-klaviyo validate`."
    )


def add_package(project_dir: Path, local: str | None) -> str:
    """Add our entry to the project's packages.yml (made if missing), unless an entry for
    the package is there already; what was done, in a sentence."""
    path = project_dir / "packages.yml"
    if not path.is_file() and "packages" in _load(project_dir / "dependencies.yml"):
        path = project_dir / "dependencies.yml"  # dbt reads packages from there instead
    text = path.read_text() if path.is_file() else ""
    data = _load(path)
    entry: dict[str, Any] = (
        {"local": local}
        if local
        else {"git": PACKAGE_GIT, "revision": package_revision(__version__)}
    )
    packages = data.get("packages", [])
    if not isinstance(packages, list):
        raise ConfigurationError(
            f"{path.name} has `packages:` but not as a list: add the entry yourself, "
            f"{_described(entry)}."
        )
    for found in packages:
        if isinstance(found, dict) and is_package_entry(project_dir, found):
            return _already(path, found)
    changed = _with_entry(text, entry)
    if yaml.safe_load(changed) != {**data, "packages": [*packages, entry]}:
        raise ConfigurationError(
            f"cannot add the entry to {path} without changing what else it says: add it "
            f"yourself, {_described(entry)}, then run `dbt deps`."
        )
    path.write_text(changed)
    return f"Added {PACKAGE} {__version__} to {path.name} ({_described(entry)})."


def _load(path: Path) -> dict[str, Any]:
    """A packages.yml or dependencies.yml as a dictionary; {} when missing or empty."""
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} should be a YAML mapping with `packages:`.")
    return data


def _with_entry(text: str, entry: dict[str, Any]) -> str:
    """`text` with `entry` as the last item of its `packages:` list (or a new list at the
    end), in the list's own indentation, right after the line of its last value."""
    root = yaml.compose(text)
    listed = next(
        (value for key, value in getattr(root, "value", []) if key.value == "packages"), None
    )
    if listed is None:
        return (
            (text.rstrip("\n") + "\n" if text.strip() else "")
            + "packages:\n"
            + (_entry_lines(entry, "  "))
        )
    if listed.flow_style or not listed.value:
        raise ConfigurationError(
            f"`packages:` is written on one line (flow style): add the entry yourself, "
            f"{_described(entry)}, then run `dbt deps`."
        )
    last = listed.value[-1]
    while isinstance(last.value, list) and last.value:  # down to its last scalar
        item = last.value[-1]
        last = item[1] if isinstance(item, tuple) else item
    end = text.find("\n", last.end_mark.index)
    end = len(text) if end < 0 else end + 1
    before = text[:end] if text[:end].endswith("\n") else text[:end] + "\n"
    return before + _entry_lines(entry, " " * listed.start_mark.column) + text[end:]


def _fields(entry: dict[str, Any]) -> list[str]:
    """The entry's fields as YAML lines, each value double-quoted (JSON is YAML)."""
    return [f"{key}: {json.dumps(value)}" for key, value in entry.items()]


def _entry_lines(entry: dict[str, Any], indent: str) -> str:
    lines = _fields(entry)
    return "".join(f"{indent}{'- ' if n == 0 else '  '}{line}\n" for n, line in enumerate(lines))


def _described(entry: dict[str, Any]) -> str:
    return ", ".join(_fields(entry))


def _already(path: Path, found: dict[str, Any]) -> str:
    """The sentence for an entry that was there: left as it is, with what to change when
    it is a git entry of another revision than the tool's."""
    said = f"{path.name} already has an entry for {PACKAGE} ({_described(found)}): left as it is."
    wanted = package_revision(__version__)
    if "git" in found and str(found.get("revision")) != wanted:
        said += (
            f' Warning: dbt-klaviyo is {__version__}; set its `revision: "{wanted}"` and run '
            "`dbt deps`, or `sync` and `validate` will refuse or warn."
        )
    return said


def _example_path(project_dir: Path) -> Path:
    config = _load(project_dir / "dbt_project.yml")
    model_paths = config.get("model-paths") or ["models"]
    return Path(str(model_paths[0])) / EXAMPLE


def add_example(project_dir: Path) -> str:
    """Write the commented example under the first model path, unless a file is there."""
    relative = _example_path(project_dir)
    path = project_dir / relative
    if path.exists():
        return f"{relative} exists: left as it is."
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_EXAMPLE_TEXT)
    return f"Wrote {relative}: a commented-out profile upsert annotation to adapt."
