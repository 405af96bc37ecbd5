"""What dbt resolved for a project, kept for the next run while everything it was resolved
from holds, so that a no-op sync of a dbt-duckdb project starts without importing dbt.

dbt takes seconds to import and to load a project and its profile. What a sync needs of
that is a handful of plain facts: the project folder, the target, its DuckDB files, the
default selector, the installed klaviyo_sync package. After a full load (`dbt.py`) they are
written to `target/dbt-klaviyo-project.json` with what they were resolved from: the flags,
the working and home folders, the installed versions, the values of the environment
variables dbt binds to its flags and of those the YAML files read with `env_var()`, and
the identity of every file dbt read (or would read, were it there). A run reuses the facts
only when all of these are as they were, so they are what dbt would resolve now.

Nothing secret is kept: a target that is not DuckDB, settings beyond the few that say
where the files are, and any `DBT_ENV_SECRET_*` variable rule the cache out. Files are
compared by their stat (inode, size, modification and change times), never their
contents: profiles.yml may hold passwords of other targets. A file changed so recently that
a second change might keep its times is not trusted (as git treats a racily clean index).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

#: In dbt's target folder, beside the manifest's stamp, where only the default target path
#: (`target`) can be found without dbt. (`dbt clean` removes it; the next run writes it.)
CACHE = Path("target") / "dbt-klaviyo-project.json"
#: The layout of the cache and the meaning of its facts; a change makes old caches unused.
FORMAT = 1
#: The distributions whose code resolves a project (dbt's own, and its DuckDB adapter).
_DISTRIBUTIONS = ("dbt-core", "dbt-adapters", "dbt-common", "dbt-duckdb", "dbt-klaviyo-sync")
#: A Jinja expression whose value depends on nothing but an environment variable or a var:
#: `{{ env_var('NAME') }}`, `{{ var('name', 'default') | as_number }}`.
_PURE_EXPRESSION = re.compile(
    r"\{\{\s*(?P<call>env_var|var)\(\s*(?P<q>['\"])(?P<name>[^'\"]*)(?P=q)\s*"
    r"(?:,\s*(?P<d>['\"])[^'\"]*(?P=d)\s*)?\)\s*"
    r"(?:\|\s*(?:as_text|as_bool|as_number|as_native|int|string|lower|upper|trim)\s*)*\}\}"
)
_JINJA = re.compile(r"\{[{%#]|[}%#]\}")
SECRET_PREFIX = "DBT_ENV_SECRET"
#: The longest a file system's clock may take to tick: Linux stamps files with a clock that
#: moves in jiffies (up to 10 ms); a coarse one, in seconds. (Tests set them to 0, as they
#: edit files and run at once, in one process.)
TICK_NS = 20_000_000
COARSE_TICK_NS = 2_000_000_000


@dataclass(frozen=True)
class Resolved:
    """What a sync needs of dbt's RuntimeConfig, as plain data."""

    project_dir: str
    target_name: str
    target_path: str
    adapter_type: str
    #: A digest of what shapes a parse besides the project's files (see `dbt._parse_key`).
    parse_key: str
    default_selector: str | None
    #: DuckDB's databases: catalog name -> (the path as the profile gives it, what it is).
    databases: dict[str, tuple[str, str]]
    #: The klaviyo_sync package dbt loads: (its folder, its version); None when there is none
    #: or when it is the project itself. Only known here when read from the cache.
    package: tuple[str, str] | None = None


@dataclass(frozen=True)
class Inputs:
    """What a resolution was made from, beyond the flags and the environment: the files
    whose stat must be unchanged, the folders whose listing must be, and the environment
    variables whose values must be."""

    files: tuple[str, ...]
    folders: tuple[str, ...]
    variables: tuple[str, ...]


def pure_jinja(text: str) -> set[str] | None:
    """The environment variables a string that dbt renders reads, or None when its Jinja
    does more than read environment variables and vars (its value could then change with
    nothing else changing: `run_started_at`, `modules.datetime`...)."""
    names = {m["name"] for m in _PURE_EXPRESSION.finditer(text) if m["call"] == "env_var"}
    return None if _JINJA.search(_PURE_EXPRESSION.sub("", text)) else names


def candidate_dir(project_dir: str | None) -> Path:
    """Where the project most likely is, before dbt is asked: --project-dir, DBT_PROJECT_DIR,
    or the nearest folder up from here with a dbt_project.yml. Only where the cache is
    looked for: that dbt agrees is part of what the cache checks."""
    given = (
        project_dir or os.environ.get("DBT_ENGINE_PROJECT_DIR") or os.environ.get("DBT_PROJECT_DIR")
    )
    if given:
        return Path(given).resolve()
    here = Path.cwd()
    return next((p for p in (here, *here.parents) if (p / "dbt_project.yml").is_file()), here)


def _stat(path: str) -> list[int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return [found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns]


def _listing(path: str) -> list[str] | None:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in _DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _state(flags: Iterable[str], inputs: Inputs) -> dict[str, Any]:
    """Everything a resolution depends on, as it is now."""
    return {
        "format": FORMAT,
        "flags": list(flags),
        "cwd": os.getcwd(),
        "home": str(Path.home()),
        "python": sys.executable,
        "versions": _versions(),
        "files": {path: _stat(path) for path in inputs.files},
        "folders": {path: _listing(path) for path in inputs.folders},
        "variables": {name: os.environ.get(name) for name in inputs.variables},
    }


def digest(described: Mapping[str, Any]) -> str:
    """A SHA-256 of what something depends on, whatever order its keys came in: kept in
    place of values (settings, variables) that may be secret."""
    encoded = orjson.dumps(described, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(encoded).hexdigest()


def load(flags: list[str], project_dir: str | None) -> Resolved | None:
    """What the last full load resolved with these flags, if all it depended on holds."""
    folder = candidate_dir(project_dir)
    path = folder / CACHE
    try:
        cached = orjson.loads(path.read_bytes())
        inputs = Inputs(**{name: tuple(value) for name, value in cached["inputs"].items()})
        if cached["digest"] != digest(_state(flags, inputs)):
            log.debug("not reusing %s: what dbt resolved it from has changed", path)
            return None
        facts = cached["resolved"]
        if facts["project_dir"] != str(folder):  # a copy of the project, say
            return None
        resolved = Resolved(
            **{
                **facts,
                "databases": {k: tuple(v) for k, v in facts["databases"].items()},
                "package": tuple(facts["package"]) if facts["package"] else None,
            }
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("not reusing %s: %s", path, exc)
        return None
    log.debug("the dbt project and profile as resolved before (%s): nothing changed", path)
    return resolved


def save(
    flags: list[str],
    inputs: Inputs,
    resolved: Resolved,
    started_ns: int,
    folders: Iterable[str] = (),
) -> None:
    """Keep what a full load resolved, unless one of its files changed so recently (since
    `started_ns`, when the load began, or just before) that its stat cannot vouch for it,
    or a file was added to or removed from one of `folders` then (a file that dbt read and
    is gone now has no stat to compare)."""
    state = _state(flags, inputs)
    stats = [*state["files"].items(), *((folder, _stat(folder)) for folder in folders)]
    for path, stat in stats:
        if stat and _racy(stat[4], started_ns):
            log.debug("not keeping what dbt resolved: %s changed while it was read", path)
            return
    target = Path(resolved.project_dir) / CACHE
    record = {
        "inputs": asdict(inputs),
        "digest": digest(state),
        "resolved": asdict(resolved),
    }
    partial = target.with_suffix(".partial")
    try:
        target.parent.mkdir(exist_ok=True)
        partial.write_bytes(orjson.dumps(record))
        partial.replace(target)
    except OSError as exc:
        log.debug("cannot keep what dbt resolved in %s: %s", target, exc)


def _racy(changed_ns: int, started_ns: int) -> bool:
    """Whether a file changed at `changed_ns` (its ctime, which no one can set) may change
    again with the same times: within the file system's clock tick of the load. A time in
    whole milliseconds may come from a coarse clock (FAT's 2 s, HFS+'s 1 s)."""
    tick = COARSE_TICK_NS if changed_ns % 1_000_000 == 0 else TICK_NS
    return changed_ns >= started_ns - tick
