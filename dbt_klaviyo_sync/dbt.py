"""The only module that drives dbt.

Whatever dbt decides, it decides here, the way a dbt command started with the same flags and
environment would: the project, profile and target (`--project-dir`, `--profiles-dir`,
`--target`, `--vars` and the `DBT_*` environment variables dbt binds, with `env_var()`
rendered inside dbt's invocation context), a manifest parsed for that target, which models a
selection names (dbt's own selector), and `dbt build` for `sync --build`. dbt is imported
inside the functions, so `--help` and the emulator stay fast.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
import pkgutil
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from dbt_klaviyo_sync import resolved
from dbt_klaviyo_sync.errors import ConfigurationError
from dbt_klaviyo_sync.logs import root_logger_kept
from dbt_klaviyo_sync.manifest import ModelNode, annotated_models, invocation_id, read_manifest
from dbt_klaviyo_sync.resolved import Resolved

log = logging.getLogger(__name__)

# Folders that hold dbt's output or installed packages, not the project's own sources.
_SKIP_DIRS = {"target", "dbt_packages", "dbt_modules", "logs", "node_modules", "__pycache__"}
_SOURCE_SUFFIXES = {".sql", ".yml", ".yaml", ".csv", ".py", ".md", ".jinja"}
#: Beside manifest.json: for which dbt invocation, target and settings we parsed it.
STAMP_FILE = "dbt-klaviyo-manifest.json"
_EVENT_LEVELS = {"info": logging.DEBUG, "warn": logging.WARNING, "error": logging.ERROR}


@dataclass(frozen=True)
class DbtArgs:
    """dbt's flags as the user gave them. What is left out, dbt decides, from the `DBT_*`
    environment variables and then its defaults, exactly as for `dbt build`."""

    project_dir: str | None = None
    profiles_dir: str | None = None
    target: str | None = None
    vars: str | None = None  # a YAML dictionary, as for `dbt --vars`
    select: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    selector: str | None = None

    def project_flags(self) -> list[str]:
        """The flags that choose the project, profile, target and vars, given to every dbt
        command we run, so that each sees the project as the user asked for it."""
        given = {
            "--project-dir": self.project_dir,
            "--profiles-dir": self.profiles_dir,
            "--target": self.target,
            "--vars": self.vars,
        }
        return [arg for flag, value in given.items() if value for arg in (flag, value)]

    @property
    def selects(self) -> bool:
        return bool(self.select or self.exclude or self.selector)

    def described(self) -> str:
        """The selection as the user typed it, for messages."""
        words = [f"--select {' '.join(self.select)}"] if self.select else []
        words += [f"--exclude {' '.join(self.exclude)}"] if self.exclude else []
        return " ".join(words + ([f"--selector {self.selector}"] if self.selector else []))


@dataclass(frozen=True)
class DbtProject:
    """A dbt project, its profile and target, loaded as `dbt build` would load them.

    `resolved` holds the plain facts a sync needs; `config`, dbt's RuntimeConfig (the
    project, the profile and the target's credentials, from which dbt's adapter for the
    target can be had), is loaded only when something needs dbt itself: a run whose facts
    come from the last run's cache (`resolved.py`) never imports dbt."""

    args: DbtArgs
    resolved: Resolved
    loaded: Any = None  # dbt's RuntimeConfig, when this run has loaded it

    @classmethod
    def locate(cls, args: DbtArgs) -> DbtProject:
        """Load the project and profile as a dbt command started with these flags, in this
        environment and from this directory would (see `_load`), or take what the last
        run's load resolved, when nothing it was resolved from has changed."""
        cached = resolved.load(args.project_flags(), args.project_dir)
        if cached is not None:
            return cls(args, cached)
        started = time.time_ns()
        config = _load(args)
        project = cls(args, _resolve(config), config)
        _keep(project, started)
        return project

    @functools.cached_property
    def config(self) -> Any:
        """dbt's RuntimeConfig, loaded now if this run has not loaded it yet."""
        if self.loaded is not None:
            return self.loaded
        log.debug("loading the dbt project and profile, which this run now needs")
        return _load(self.args)

    @property
    def project_dir(self) -> Path:
        return Path(self.resolved.project_dir)

    @property
    def target_name(self) -> str:
        return self.resolved.target_name

    @property
    def target_path(self) -> Path:
        """dbt's target folder (`--target-path`, DBT_TARGET_PATH or `target-path:`)."""
        return Path(self.resolved.target_path)

    @property
    def manifest_path(self) -> Path:
        return self.target_path / "manifest.json"

    @property
    def adapter_type(self) -> str:
        """The target's adapter: duckdb, postgres, ..."""
        return self.resolved.adapter_type


def _load(args: DbtArgs) -> Any:
    """dbt's RuntimeConfig, as a dbt command started with these flags, in this environment
    and from this directory would load it: dbt's own flag parsing (its click command and
    `Flags`), then its profile and project loaders inside its invocation context."""
    import click

    with root_logger_kept():  # the first import of dbt, which configures logging
        from dbt.cli.flags import Flags, args_to_context
        from dbt.config.runtime import RuntimeConfig, load_profile, load_project
        from dbt.flags import set_flags
        from dbt_common.exceptions import DbtBaseException

    try:
        with _dbt():
            flags = Flags(args_to_context(["build", *args.project_flags()]))
            set_flags(flags)  # type: ignore[no-untyped-call]  # dbt leaves it unannotated
            project_dir = Path(flags.PROJECT_DIR).resolve()
            if not (project_dir / "dbt_project.yml").is_file():
                raise ConfigurationError(
                    f"no dbt_project.yml in {project_dir}: run from your dbt project or "
                    "pass --project-dir (or set DBT_PROJECT_DIR)."
                )
            profile = load_profile(
                str(project_dir), flags.VARS, flags.PROFILE, flags.TARGET, flags.THREADS
            )
            project = load_project(
                str(project_dir), flags.VERSION_CHECK, profile, flags.VARS, validate=True
            )
            return RuntimeConfig.from_parts(project, profile, flags)
    except click.ClickException as exc:
        raise ConfigurationError(
            _scrub(
                f"{exc.format_message()} dbt looks for the project from the current "
                "directory up, and for profiles.yml in the current directory, then in "
                "~/.dbt: pass --project-dir and --profiles-dir (or set DBT_PROJECT_DIR and "
                "DBT_PROFILES_DIR)."
            )
        ) from exc
    except DbtBaseException as exc:
        raise ConfigurationError(
            _scrub(f"dbt cannot load the project and its profile: {_said(exc)}")
        ) from exc


def _resolve(config: Any) -> Resolved:
    """The facts a sync needs of dbt's RuntimeConfig."""
    credentials = config.credentials
    databases: dict[str, tuple[str, str]] = {}
    if credentials.type == "duckdb":
        databases[credentials.database] = (credentials.path, "path")
        for attachment in credentials.attach or []:
            alias = attachment.alias or credentials.path_derived_database_name(attachment.path)
            databases[alias] = (attachment.path, f"attachment {alias!r}")
    return Resolved(
        project_dir=str(config.project_root),
        target_name=str(config.target_name),
        target_path=str(config.project_target_path),
        adapter_type=str(credentials.type),
        parse_key=_parse_key(config),
        default_selector=config.get_default_selector_name(),
        databases=databases,
    )


# -- What the next run may reuse of this load --------------------------------------------

#: The settings of a dbt-duckdb target that say where its files are, and nothing secret.
_DUCKDB_SETTINGS = {
    "type",
    "path",
    "database",
    "schema",
    "threads",
    "extensions",
    "external_root",
    "attach",
    "keep_open",
    "module_paths",
    "disable_transactions",
    "retries",
}
_ATTACH_SETTINGS = {"path", "alias", "read_only"}


def _keep(project: DbtProject, started_ns: int) -> None:
    """Keep what this load resolved for the next run (`resolved.save`) when it may be
    reused: a dbt-duckdb target of local files, the project and its target folder where the
    next run will look for them (where dbt looks by default), with YAML whose rendering
    reads nothing but environment variables and vars (no secret one)."""
    from dbt_common.exceptions import DbtBaseException

    config = project.config
    root = project.project_dir
    if (
        project.adapter_type != "duckdb"
        or root != resolved.candidate_dir(project.args.project_dir)
        or project.target_path.resolve() != (root / resolved.CACHE).parent
    ):
        return
    if not all(_is_local(path) for path, _ in project.resolved.databases.values()):
        return
    try:
        profiles = Path(config.args.PROFILES_DIR).resolve() / "profiles.yml"
        read = _variables_read(config, profiles)
        package = _installed(config)
    except (DbtBaseException, OSError, KeyError, TypeError, AttributeError):
        return  # the next run loads again, and says what is wrong where it matters
    if read is None:
        log.debug("not keeping what dbt resolved: its YAML is not plain enough to reuse")
        return
    here = Path.cwd()
    searched = []
    for folder in (here, *here.parents):  # where dbt looks for the project from here
        searched.append(str(folder / "dbt_project.yml"))
        if (folder / "dbt_project.yml").is_file():
            break
    packages = root / config.packages_install_path
    installed = [path / "dbt_project.yml" for path in _package_dirs(packages)]
    files = [
        *searched,
        *(str(root / name) for name in _PROJECT_FILES),
        str(here / "profiles.yml"),
        str(profiles),
        str(Path.home() / ".dbt" / "profiles.yml"),
        str(packages),
        *map(str, installed),
    ]
    inputs = resolved.Inputs(
        files=tuple(dict.fromkeys(files)),
        folders=(str(packages),),
        variables=tuple(sorted(_flag_variables() | read)),
    )
    facts = dataclasses.replace(project.resolved, package=package)
    folders = (str(root), str(profiles.parent), str(here))
    resolved.save(project.args.project_flags(), inputs, facts, started_ns, folders)


#: The project's files that dbt reads as it loads the project and its packages' list.
_PROJECT_FILES = (
    "dbt_project.yml",
    "profiles.yml",
    "selectors.yml",
    "packages.yml",
    "dependencies.yml",
    "package-lock.yml",
)


def _is_local(path: str) -> bool:
    """A local DuckDB file's path (anything else may carry a token, and is refused later)."""
    return path != ":memory:" and not any(mark in path for mark in ("://", "?", "md:"))


def _package_dirs(folder: Path) -> list[Path]:
    """The installed packages, as dbt lists them (`RuntimeConfig._get_project_directories`)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("__"))


def _flag_variables() -> set[str]:
    """The environment variables dbt binds to the flags of `dbt build` (DBT_TARGET,
    DBT_PROFILES_DIR, DBT_ENGINE_TARGET_PATH, ...), as its click command declares them."""
    from dbt.cli.main import cli

    names: set[str] = set()
    for param in [*cli.params, *cli.commands["build"].params]:
        envvar = param.envvar or ()
        names.update([envvar] if isinstance(envvar, str) else envvar)
    return names


def _variables_read(config: Any, profiles: Path) -> set[str] | None:
    """The environment variables the YAML dbt renders as it loads this project reads: the
    project's and its packages' dbt_project.yml (the keys dbt renders at load),
    selectors.yml, packages.yml, and this target of profiles.yml. None when a rendered
    string does more than read environment variables and vars, when one reads a
    DBT_ENV_SECRET_* variable, or when the target has settings beyond where its files are."""
    from dbt.clients.yaml_helper import load_yaml_text
    from dbt.config.renderer import DbtProjectYamlRenderer
    from dbt_common.utils.dict import deep_map_render

    texts: list[str] = []

    def gather(data: Any, rendered: Callable[[tuple[Any, ...]], bool] = lambda _: True) -> None:
        def take(value: Any, keypath: tuple[Any, ...]) -> Any:
            if isinstance(value, str) and rendered(keypath):
                texts.append(value)
            return value

        deep_map_render(take, data)

    def yaml_file(path: Path) -> Any:
        return load_yaml_text(path.read_text()) if path.is_file() else None

    root = Path(config.project_root)
    project_renderer = DbtProjectYamlRenderer(None, config.cli_vars)
    packages = root / config.packages_install_path
    for folder in [root, *_package_dirs(packages)]:
        gather(yaml_file(folder / "dbt_project.yml"), project_renderer.should_render_keypath)
    for name in ("selectors.yml", "packages.yml", "dependencies.yml"):
        gather(yaml_file(root / name))
    raw = yaml_file(profiles)
    profile = raw[config.profile_name]
    output = profile["outputs"][config.target_name]
    attached = output.get("attach") or []
    if set(output) - _DUCKDB_SETTINGS or any(
        not isinstance(entry, dict) or set(entry) - _ATTACH_SETTINGS for entry in attached
    ):
        return None
    gather([profile.get("target"), output, raw.get("config")])
    names: set[str] = set()
    for text in texts:
        found = resolved.pure_jinja(text)
        if found is None or resolved.SECRET_PREFIX in text:
            return None
        names |= found
    return names


@contextmanager
def _dbt(listen: Callable[[Any], None] | None = None) -> Iterator[None]:
    """Run dbt code as a dbt command runs it: in an invocation context that holds the
    environment (where `env_var()` reads), with dbt's events going to our log (and to
    `listen`) rather than to stdout, which belongs to the summary and to `--output json`."""
    from dbt.cli import requires
    from dbt_common.clients.system import get_env
    from dbt_common.context import set_invocation_context
    from dbt_common.events.event_manager_client import get_event_manager

    env = get_env()
    # dbt 1.11 accepts both names of its renamed DBT_ENGINE_* variables.
    propagate = getattr(requires, "_cross_propagate_engine_env_vars", None)
    if propagate:
        propagate(env)
    set_invocation_context(env)
    events = get_event_manager()
    loggers, callbacks = list(events.loggers), list(events.callbacks)
    events.loggers[:] = []
    events.callbacks[:] = [_log_event, *([listen] if listen else [])]
    try:
        yield
    finally:
        events.loggers[:] = loggers
        events.callbacks[:] = callbacks


def _log_event(event: Any) -> None:
    """dbt's warnings and errors in our log; its other messages at debug level. dbt's
    closing error is left out: it is the exception we report."""
    level = _EVENT_LEVELS.get(event.info.level)
    if level and event.info.name != "MainEncounteredError":
        log.log(level, "dbt: %s", _scrub(event.info.msg))


def _said(exc: BaseException) -> str:
    """A dbt error's own words, without dbt's heading ("Runtime Error")."""
    return str(getattr(exc, "msg", None) or exc).strip()


def _scrub(text: str) -> str:
    """Without the values of DBT_ENV_SECRET_* variables, as dbt scrubs its own output.
    Without any such variable there is nothing to scrub, and dbt is not imported for it."""
    if not any(name.startswith(resolved.SECRET_PREFIX) for name in os.environ):
        return text
    from dbt_common.exceptions.base import env_secrets, scrub_secrets

    return str(scrub_secrets(text, env_secrets()))


# -- The manifest, for this run's target ---------------------------------------------------


def _files_changed(project: DbtProject) -> bool:
    """True when any project source file is newer than manifest.json."""
    built = project.manifest_path.stat().st_mtime
    skip = _SKIP_DIRS | {project.target_path.name}
    for root, dirs, files in os.walk(project.project_dir):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        for name in files:
            path = Path(root, name)
            if path.suffix in _SOURCE_SUFFIXES and path.stat().st_mtime > built:
                return True
    return False


def _parse_key(config: Any) -> str:
    """A digest of what shapes a parse besides the project's files, as dbt's partial
    parsing checks them: dbt's version, the profile, the target's rendered connection
    settings and --vars. Only the digest is stored: vars and settings may hold secrets."""
    from dbt.version import __version__

    described = {
        "dbt": __version__,
        "profile": config.profile_name,
        "target": config.target_name,
        "connection": dict(config.credentials.connection_info()),
        "vars": config.cli_vars,
    }
    return resolved.digest(described)


def _stamp_path(project: DbtProject) -> Path:
    return project.target_path / STAMP_FILE


def _read_stamp(project: DbtProject) -> dict[str, Any]:
    try:
        stamp = orjson.loads(_stamp_path(project).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _write_stamp(project: DbtProject, manifest: dict[str, Any]) -> None:
    """Record that the manifest, as written by that dbt invocation, is for this run's target
    and settings."""
    stamp = {
        "invocation_id": invocation_id(manifest),
        "target": project.target_name,
        "key": project.resolved.parse_key,
    }
    _store_stamp(project, stamp)


def _store_stamp(project: DbtProject, stamp: dict[str, Any]) -> None:
    """Write the stamp beside manifest.json. Atomic, so that a stamp is never half written."""
    path = _stamp_path(project)
    partial = path.with_suffix(".partial")
    try:
        partial.write_bytes(orjson.dumps(stamp))
        partial.replace(path)
    except OSError as exc:
        log.warning(
            "cannot record which target %s is for (%s); the next run parses again",
            project.manifest_path,
            exc,
        )


def _why_parse(project: DbtProject, stamp: dict[str, Any]) -> str | None:
    """Why the manifest on disk cannot serve this run, as far as cheap checks tell."""
    if not project.manifest_path.is_file():
        return "there is no manifest yet"
    if _files_changed(project):
        return "project files changed since the manifest was written"
    if not stamp:
        return "the manifest was written by a dbt command that did not record its target"
    if stamp.get("target") != project.target_name:
        return f"the manifest was parsed for target '{stamp.get('target')}'"
    if stamp.get("key") != project.resolved.parse_key:
        return "the manifest was parsed with other vars or profile settings"
    return None


def current_manifest(project: DbtProject) -> dict[str, Any]:
    """manifest.json parsed for this run's target, profile and vars (see below)."""
    return _current_manifest(project)[0]


def _current_manifest(project: DbtProject) -> tuple[dict[str, Any], Any | None]:
    """manifest.json parsed for this run's target, profile and vars, as plain data; and dbt's
    own Manifest when this call had to parse.

    dbt's manifest does not record its target, so a stamp beside it does: the invocation id
    of the manifest we parsed (or built) and a digest of the settings we parsed it with.
    The project is parsed again when the manifest is missing, older than a project file,
    parsed for another target or other settings, or rewritten since by another dbt command.
    Otherwise nothing runs: the common case costs a file walk and a JSON read."""
    stamp = _read_stamp(project)
    reason = _why_parse(project, stamp)
    if reason is None:
        try:
            manifest = read_manifest(project.manifest_path)
        except ConfigurationError:
            reason = "the manifest cannot be read"
        else:
            if invocation_id(manifest) == stamp.get("invocation_id"):
                return manifest, None
            reason = "another dbt command has rewritten the manifest since"
    log.info("parsing the dbt project for target '%s': %s", project.target_name, reason)
    parsed = _parse(project)
    manifest = read_manifest(project.manifest_path)
    _write_stamp(project, manifest)
    return manifest, parsed


def _parse(project: DbtProject) -> Any:
    """`dbt parse` in this process, with the user's flags; dbt's own Manifest."""
    from dbt.cli.main import dbtRunner

    with _dbt():
        result = dbtRunner(callbacks=[_log_event]).invoke(
            ["parse", "--log-level", "none", *project.args.project_flags()]
        )
    if not result.success:
        raise ConfigurationError(
            _scrub(
                f"`dbt parse` failed for {project.project_dir}: "
                f"{_said(result.exception) if result.exception else 'see the messages above'}. "
                "Fix the project (`dbt parse` shows the same) and run again."
            )
        )
    return result.result


# -- Selection -------------------------------------------------------------------------------


def select_models(project: DbtProject) -> list[ModelNode]:
    """The models with `klaviyo` meta that the selection names, as dbt's selector reads
    --select, --exclude and --selector (or selectors.yml's default selector); all of them
    when nothing is selected. Raises when a --select criterion matches nothing at all, or
    when the selection names no annotated model."""
    manifest, parsed = _current_manifest(project)
    annotated = annotated_models(manifest)
    default = project.resolved.default_selector
    if not project.args.selects and not default:
        return annotated
    chosen = _selection(project, manifest, parsed)
    models = [m for m in annotated if m.unique_id in chosen]
    how = project.args.described() or f"the default selector '{default}' of selectors.yml"
    if not models:
        others = sorted(uid.split(".", 2)[-1] for uid in chosen)
        raise ConfigurationError(
            f"{how} selects no model with `klaviyo` meta"
            + (f" (it selects {_listed(others)})" if others else "")
            + f". Annotated models: {_listed([m.name for m in annotated]) or 'none'}."
        )
    log.info(
        "%s selects %d annotated model(s): %s%s",
        how,
        len(models),
        _listed([m.name for m in models]),
        f"; {len(chosen) - len(models)} other selected model(s) have no `klaviyo` meta"
        if len(chosen) > len(models)
        else "",
    )
    return models


#: A selection criterion whose answer depends on the manifest alone: names, fqns, tags,
#: configs, packages... with graph operators; not path:, file:, state:, result: or
#: source_status:, which read files, nor a bare file name (dbt reads it as a path).
_MANIFEST_CRITERION = re.compile(
    r"(\d*\+|@)?((fqn|tag|package|resource_type|group|access|version|config\.[\w.-]+):)?"
    r"(?![\w*.-]*\.(sql|py|csv)$)[\w*.-]+(\+\d*)?",
    re.IGNORECASE,
)


def _selection(project: DbtProject, manifest: dict[str, Any], parsed: Any | None) -> set[str]:
    """The models dbt selects (`_dbt_selection`), or those it selected for the same
    --select and --exclude in this very manifest, kept in its stamp: when each criterion
    depends on the manifest alone, and the environment (where dbt's flags are) is the same."""
    key = _selection_key(project.args)
    if key is None:
        return _dbt_selection(project, manifest, parsed)
    stamp = _read_stamp(project)
    current = bool(stamp) and stamp.get("invocation_id") == invocation_id(manifest)
    kept = (stamp.get("selections") or {}).get(key) if current else None
    if isinstance(kept, list):
        log.debug("%s: as dbt selected it before in this manifest", project.args.described())
        return set(kept)
    chosen = _dbt_selection(project, manifest, parsed)
    if current:
        selections = {**(stamp.get("selections") or {}), key: sorted(chosen)}
        _store_stamp(project, {**stamp, "selections": selections})
    return chosen


def _selection_key(args: DbtArgs) -> str | None:
    """What dbt's answer to --select and --exclude depends on besides the manifest, as a
    digest (the environment may hold anything); None when it may depend on more."""
    if args.selector or not args.selects:
        return None
    criteria = [part for value in (*args.select, *args.exclude) for part in value.split()]
    if not all(_MANIFEST_CRITERION.fullmatch(c) for w in criteria for c in w.split(",")):
        return None
    env = {
        name: value
        for name, value in os.environ.items()
        if name.startswith("DBT_") and not name.startswith((resolved.SECRET_PREFIX, "DBT_KLAVIYO_"))
    }
    described = {"select": args.select, "exclude": args.exclude, "cwd": os.getcwd(), "env": env}
    return resolved.digest(described)


def _dbt_selection(project: DbtProject, manifest: dict[str, Any], parsed: Any | None) -> set[str]:
    """The unique ids of the models dbt selects, through dbt's `ls` task, which reads the
    flags, the selectors and the default selector exactly as every dbt command does."""
    from dbt.cli.flags import Flags, args_to_context
    from dbt.compilation import Linker
    from dbt.flags import set_flags
    from dbt.graph.graph import Graph
    from dbt.task.list import ListTask
    from dbt_common.exceptions import DbtBaseException

    args = project.args
    config = project.config  # loaded (if it is not yet) before the flags of `ls` are set
    # dbt has no selector for a unique id; dbt's own selector for a node is its fqn.
    fqns = {
        uid: ".".join(node["fqn"])
        for uid, node in (manifest.get("nodes") or {}).items()
        if node.get("fqn")
    }
    select = [fqns.get(token, token) for value in args.select for token in value.split()]
    argv = ["list", "--resource-type", "model", *args.project_flags()]
    argv += [arg for token in select for arg in ("--select", token)]
    argv += [arg for value in args.exclude for arg in ("--exclude", value)]
    argv += ["--selector", args.selector] if args.selector else []
    unmatched: list[str] = []

    def listen(event: Any) -> None:
        if event.info.name == "NoNodesForSelectionCriteria":
            unmatched.append(event.data.spec_raw)

    try:
        with _dbt(listen):
            flags = Flags(args_to_context(argv))
            set_flags(flags)  # type: ignore[no-untyped-call]  # dbt leaves it unannotated
            dbt_manifest = parsed or _dbt_manifest(project.manifest_path)
            linker = Linker()
            linker.link_graph(dbt_manifest)
            task = ListTask(flags, config, dbt_manifest)
            task.graph = Graph(linker.graph)
            chosen = task.get_node_selector().get_selected(task.get_selection_spec())
    except DbtBaseException as exc:
        raise ConfigurationError(
            _scrub(f"dbt cannot select {args.described()}: {_said(exc)}")
        ) from exc
    typos = [token for token in select if token in unmatched]
    if typos and not args.selector:
        raise ConfigurationError(
            f"--select {' '.join(typos)} matches no model in the dbt project (dbt's selector "
            f"syntax, as for `dbt ls --select`). Annotated models: "
            f"{_listed([m.name for m in annotated_models(manifest)]) or 'none'}."
        )
    return {str(uid) for uid in chosen}


def _dbt_manifest(path: Path) -> Any:
    """dbt's Manifest from manifest.json, as dbt reads one for `--state`."""
    from dbt.artifacts.schemas.manifest import WritableManifest
    from dbt.contracts.graph.manifest import Manifest

    return Manifest.from_writable_manifest(WritableManifest.read_and_check_versions(str(path)))


def _listed(names: list[str], most: int = 10) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


# -- Build -----------------------------------------------------------------------------------


def build(project: DbtProject, models: list[ModelNode]) -> set[str]:
    """`dbt build` the models (and their tests), with the user's project, profile, target and
    vars; the unique ids of those that built and passed their tests. A model whose tests
    fail is not synced: tests gate the sync.

    dbt runs in a process of its own: dbt-duckdb keeps the database open in the process
    that ran it, which would stop the sync from attaching it. The process inherits this
    one's environment and directory, so it resolves everything as we did. Its output goes
    to stderr, so that stdout keeps to the summary (and to JSON with `--output json`)."""
    selected = [arg for model in models for arg in ("--select", model.selector)]
    status = _run_dbt(["build", *project.args.project_flags(), *selected])
    results = project.target_path / "run_results.json"
    if status not in (0, 1) or not results.is_file():
        raise ConfigurationError(
            f"`dbt build` could not run for {project.project_dir} (exit status "
            f"{status}); see its output above. Fix the project and run again."
        )
    run = orjson.loads(results.read_bytes())
    manifest = read_manifest(project.manifest_path)
    if invocation_id(run) == invocation_id(manifest):
        _write_stamp(project, manifest)  # parsed by that build, with this run's flags
    built: set[str] = set()
    failed: set[str] = set()
    for node in run.get("results") or []:
        kind, status = node["unique_id"].split(".")[0], node["status"]
        if kind == "model":
            (built if status == "success" else failed).add(node["unique_id"])
        elif kind in ("test", "unit_test") and status in ("fail", "error"):
            failed.update(_tested_models(manifest, node["unique_id"]))
    return built - failed


def _run_dbt(args: list[str]) -> int:
    """Run dbt with `args` in a process of its own, its output on stderr; its exit status."""
    command = [sys.executable, "-c", "from dbt.cli.main import cli; cli()", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout or []:
        sys.stderr.write(line)
    return process.wait()


def _tested_models(manifest: dict[str, Any], test_id: str) -> list[str]:
    node = manifest["nodes"].get(test_id) or manifest.get("unit_tests", {}).get(test_id, {})
    return list(node.get("depends_on", {}).get("nodes", []))


# -- The warehouse ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Warehouse:
    """The DuckDB files of the profile target, by the catalog name dbt gives them."""

    target_name: str
    databases: dict[str, Path]


def load_warehouse(project: DbtProject, models: Iterable[ModelNode] = ()) -> Warehouse:
    """The DuckDB files of the target dbt uses, where dbt-duckdb opens them: a relative
    `path:` from the current directory, as for `dbt build` run from here. Checks that the
    files holding `models` exist, and logs which file each model is read from."""
    if project.adapter_type != "duckdb":
        raise ConfigurationError(
            f"the dbt target '{project.target_name}' uses the {project.adapter_type!r} adapter; "
            "dbt-klaviyo currently reads models from dbt-duckdb targets only."
        )
    given = project.resolved.databases
    databases = {name: _local_file(path, what) for name, (path, what) in given.items()}
    checked: set[Path] = set()
    for model in models:
        file = databases.get(model.database)
        if file is None:
            raise ConfigurationError(
                f"model '{model.name}' is in the database '{model.database}', which the dbt "
                f"target '{project.target_name}' neither opens nor attaches "
                f"({', '.join(databases)}). Attach it in profiles.yml (`attach:`)."
            )
        if file not in checked:
            _check_file(project, given[model.database][0], file)
            checked.add(file)
        log.info(
            "%s: reading %s.%s from %s (target %s)",
            model.name,
            model.schema,
            model.alias or model.name,
            _scrub(str(file)),
            project.target_name,
        )
    return Warehouse(project.target_name, databases)


def _local_file(path: str, what: str) -> Path:
    if path == ":memory:" or "://" in path or path.startswith(("md:", "motherduck:")):
        raise ConfigurationError(
            _scrub(
                f"the dbt profile's {what} is {path!r}; dbt-klaviyo reads models from a local "
                "DuckDB file. Set `path:` in profiles.yml to a file."
            )
        )
    return Path(path).resolve()  # from the current directory, as dbt-duckdb opens it


def _check_file(project: DbtProject, given: str, file: Path) -> None:
    """The file must exist where dbt-duckdb would open it. A same-named file in the project
    folder is what a run from elsewhere most likely meant: name it, and what to do."""
    beside = project.project_dir / given
    shadowed = not Path(given).is_absolute() and beside.is_file() and beside.resolve() != file
    fix = (
        f"run from {project.project_dir} (in an orchestrator, make it the task's working "
        "directory), or make `path:` absolute in profiles.yml, for example "
        "`path: \"{{ env_var('DBT_DUCKDB_PATH') }}\"` with DBT_DUCKDB_PATH set for dbt and "
        "dbt-klaviyo alike."
    )
    where = (
        f"dbt-duckdb opens the profile's relative path {given!r} from the current directory "
        f"({Path.cwd()}), as `dbt build` run from here would"
    )
    if not file.is_file():
        text = (
            f"the dbt target '{project.target_name}' reads models from {file}, which does not exist"
        )
        if shadowed:
            text += f": {where}. {beside} exists: {fix}"
        else:
            text += ". Run `dbt build` first, or fix `path:` in profiles.yml."
        raise ConfigurationError(_scrub(text))
    if shadowed:
        log.warning(
            "%s",
            _scrub(
                f"reading {file}: {where}. The project's folder holds another {beside}; "
                f"if that is the one you mean, {fix}"
            ),
        )


# -- The adapter, for a warehouse that keeps the sync state ----------------------------------


@contextmanager
def adapter(project: DbtProject) -> Iterator[Any]:
    """dbt's adapter for the project's target, as a dbt command sets it up (the project's
    macros, ours among them, resolvable; one connection for this thread), for the length
    of the block. The manifest must be current (`select_models` makes it so)."""
    from dbt.adapters.factory import cleanup_connections, get_adapter, register_adapter
    from dbt.context.providers import generate_runtime_macro_context
    from dbt.mp_context import get_mp_context
    from dbt_common.exceptions import DbtBaseException

    with _dbt():
        try:
            register_adapter(project.config, get_mp_context())
            found = get_adapter(project.config)
            found.set_macro_context_generator(generate_runtime_macro_context)
            found.set_macro_resolver(_dbt_manifest(project.manifest_path))
            with found.connection_named("dbt-klaviyo"):
                yield found
        except DbtBaseException as exc:
            raise ConfigurationError(
                _scrub(f"dbt's {project.adapter_type} adapter failed: {_said(exc)}")
            ) from exc
        finally:
            cleanup_connections()  # type: ignore[no-untyped-call]  # dbt leaves it unannotated


# -- Versions ------------------------------------------------------------------------------


def adapter_versions() -> list[tuple[str, str]]:
    """Each installed dbt adapter's name and version, as `dbt --version` lists them: the
    adapter plugins' convention is a module `dbt/adapters/<name>/__version__.py` holding
    `version`. Found with the import system, as dbt's own function for it is private."""
    spec = importlib.util.find_spec("dbt.adapters")
    locations = (spec.submodule_search_locations or []) if spec else []
    found = set()
    for location in locations:
        for plugin in pkgutil.iter_modules([location]):
            if not (Path(location) / plugin.name / "__version__.py").is_file():
                continue  # dbt-adapters' own subpackages, not an adapter
            try:
                module = importlib.import_module(f"dbt.adapters.{plugin.name}.__version__")
            except ImportError:
                continue
            found.add((plugin.name, str(getattr(module, "version", "unknown"))))
    return sorted(found)


# -- The dbt package beside the tool --------------------------------------------------------

PACKAGE = "klaviyo_sync"
#: Where the dbt package is released: a git tag `v<version>` for each version of the tool.
PACKAGE_GIT = "https://github.com/dbt-klaviyo-sync/dbt-klaviyo-sync.git"


def package_revision(tool: str) -> str:
    """The git revision of the dbt package that goes with the tool of version `tool`."""
    return f"v{tool}"


def check_package(project: DbtProject, tool: str) -> str | None:
    """Compare the dbt package `klaviyo_sync` that `dbt deps` installed in the project (as
    dbt itself loads it, wherever `packages-install-path` puts it) with the tool's version
    `tool`: its macros write the state the tool reads, so another major or minor version
    raises ConfigurationError before anything is sent. Another patch version is returned as
    a warning to show. None when they match, or the package is not installed."""
    if project.loaded is None:  # taken from the last run's load, still current
        installed = project.resolved.package
    else:
        from dbt_common.exceptions import DbtBaseException

        try:
            installed = _installed(project.config)
        except DbtBaseException as exc:
            raise ConfigurationError(
                _scrub(f"dbt cannot load the project's packages: {_said(exc)}")
            ) from exc
    if installed is None:
        return None
    root, version = installed
    if version == tool:
        return None
    problem = (
        f"the dbt package {PACKAGE} installed in {root} is version "
        f"{version}, but dbt-klaviyo is {tool}: {_package_fix(project, tool)} (Or install "
        f"the tool that matches the package: pip install 'dbt-klaviyo-sync=={version}'.)"
    )
    if version.split(".")[:2] != tool.split(".")[:2]:
        raise ConfigurationError(problem)
    return problem


def _installed(config: Any) -> tuple[str, str] | None:
    """The package klaviyo_sync as dbt loads it (its folder and version), unless it is the
    project itself."""
    installed = config.load_dependencies().get(PACKAGE)
    if installed is None or Path(installed.project_root) == Path(config.project_root):
        return None
    return str(installed.project_root), str(installed.version)


def _package_fix(project: DbtProject, tool: str) -> str:
    """How to install the dbt package of version `tool`, in the words of the project's own
    packages.yml entry for it."""
    path = getattr(project.config, "packages_specified_path", "packages.yml")
    entries = [
        entry
        for entry in project.config.packages.packages
        if is_package_entry(project.project_dir, vars(entry))
    ]
    then = "then run `dbt deps`."
    if len(entries) != 1:
        return (
            f"in {path}, install {PACKAGE} {tool} (git `revision: {package_revision(tool)}` of the "
            f"dbt-klaviyo-sync repository), {then}"
        )
    entry = entries[0]
    if hasattr(entry, "git"):
        revision = package_revision(tool)
        return f'in {path}, set the entry of {entry.git} to `revision: "{revision}"`, {then}'
    if hasattr(entry, "package"):
        return f'in {path}, set the entry of {entry.package} to `version: "{tool}"`, {then}'
    if hasattr(entry, "local"):
        return (
            f"in {path}, point `local: {entry.local}` at a checkout of dbt-klaviyo-sync "
            f"{tool}, {then}"
        )
    return f"in {path}, install {PACKAGE} {tool}, {then}"


def is_package_entry(project_dir: Path, entry: Mapping[str, Any]) -> bool:
    """Whether a packages.yml entry (its fields) installs `klaviyo_sync`: by its name, the
    project at its local path, or a git URL or hub name that says klaviyo."""
    if entry.get("name") == PACKAGE:
        return True
    if entry.get("local"):
        import yaml

        config = project_dir / str(entry["local"]) / "dbt_project.yml"
        try:
            return bool(yaml.safe_load(config.read_text()).get("name") == PACKAGE)
        except (OSError, yaml.YAMLError, AttributeError):
            return False
    return "klaviyo" in str(entry.get("git") or entry.get("package") or "")


def deps(project_dir: Path) -> None:
    """`dbt deps` for the project, in a process of its own as for `build`, its output on
    stderr; ConfigurationError when it fails."""
    status = _run_dbt(["deps", "--project-dir", str(project_dir)])
    if status != 0:
        raise ConfigurationError(
            f"`dbt deps` failed for {project_dir} (exit status {status}); see its "
            "output above. Fix packages.yml (or your network) and run `dbt deps` again."
        )
