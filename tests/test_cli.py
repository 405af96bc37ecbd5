"""The command line itself: argument forms, exit statuses, and keys kept out of errors."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest

from dbt_klaviyo_sync import cli
from dbt_klaviyo_sync.dbt import DbtProject
from dbt_klaviyo_sync.emulator import Emulator
from dbt_klaviyo_sync.logs import configure
from tests.conftest import (
    PRIVATE_KEY,
    PUBLIC_KEY,
    REPO,
    clean_env,
    dbt_klaviyo,
    sync_customers,
)


@pytest.mark.parametrize(
    ("given", "expanded"),
    [
        (["sync", "--select", "a", "b"], ["sync", "--select", "a", "--select", "b"]),
        (["sync", "-s", "a", "--dry-run"], ["sync", "-s", "a", "--dry-run"]),
        (
            ["sync", "--select", "a", "b", "-s", "c"],
            ["sync", "--select", "a", "--select", "b", "-s", "c"],
        ),
        (["sync", "--select"], ["sync", "--select"]),
        (["sync", "--select", "--dry-run"], ["sync", "--select", "--dry-run"]),
    ],
)
def test_select_takes_several_names_as_dbt_does(given: list[str], expanded: list[str]) -> None:
    assert cli._expand_multi_values(given) == expanded


def test_an_unexpected_error_exits_2_without_a_traceback_or_keys(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KLAVIYO_PRIVATE_API_KEY", PRIVATE_KEY)
    monkeypatch.setenv("KLAVIYO_PUBLIC_API_KEY", PUBLIC_KEY)

    def explode(*args: object) -> None:
        raise RuntimeError(f"something broke near {PRIVATE_KEY} and {PUBLIC_KEY}")

    monkeypatch.setattr(DbtProject, "locate", explode)
    with pytest.raises(SystemExit) as exited:
        cli.main(["sync"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Internal error" in err and "RuntimeError" in err and "--log-level debug" in err
    assert "Traceback" not in err  # a traceback could carry what a library put in it
    assert PRIVATE_KEY not in err and PUBLIC_KEY not in err
    assert "[redacted key]" in err


# -- The console script exits without the interpreter's teardown ------------------------

#: Runs the console script's function, with a logging handler that writes to stdout only
#: as logging shuts down (as a library's might); with "closed", stdout closed under it;
#: with "semaphore", holding a semaphore as dbt's adapters do (unlinked at exit, or the
#: multiprocessing resource tracker warns of a leak on the user's terminal).
_COMMAND = """
import logging, multiprocessing, os, sys
from dbt_klaviyo_sync import cli

class Late(logging.Handler):
    def emit(self, record):
        pass

    def close(self):
        sys.stdout.write("written at shutdown;")
        super().close()

logging.getLogger("late").addHandler(Late())
if sys.argv[1] == "closed":
    os.close(1)
if sys.argv[1] == "semaphore":
    lock = multiprocessing.get_context("spawn").RLock()
sys.argv = ["dbt-klaviyo", *sys.argv[2:]]
cli.run()
"""


@pytest.mark.parametrize(
    ("argv", "status", "out", "err"),
    [
        (["open", "--version"], 0, "dbt-klaviyo: ", ""),
        (["open", "status", "--project-dir", "/nowhere"], 2, "", "Error: "),
        (["closed", "status", "--project-dir", "/nowhere"], 2, None, "Error: "),
        (["semaphore", "--version"], 0, "dbt-klaviyo: ", ""),
    ],
)
def test_the_command_flushes_its_output_and_keeps_its_status(
    argv: list[str], status: int, out: str | None, err: str
) -> None:
    """The console script skips the interpreter's teardown (`cli.run`): the exit handlers
    run (logging's shutdown, multiprocessing's) and what was written is flushed first, the
    exit status is `main`'s, and a stdout gone away is no traceback."""
    env = clean_env()
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as for most users (not this machine's CI)
    done = subprocess.run(
        [sys.executable, "-c", _COMMAND, *argv], capture_output=True, text=True, env=env
    )
    assert done.returncode == status, done.stderr
    if out is None:
        assert done.stdout == ""
    else:
        assert done.stdout.startswith(out) and done.stdout.endswith("written at shutdown;")
    assert done.stderr.startswith(err) and "Traceback" not in done.stderr, done.stderr
    assert err or done.stderr == ""  # nothing else, the resource tracker's warning included


def test_the_installed_command_is_the_one_that_exits_fast() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["dbt-klaviyo"] == "dbt_klaviyo_sync.cli:run"


# -- dbt's conventions: global flags anywhere, options from the environment, JSON logs -----

PLAN = ("plan", "--project-dir", ".", "--profiles-dir", ".")


@pytest.mark.parametrize(
    "argv",
    [
        ("--log-level", "warning", *PLAN),
        (*PLAN, "--log-level", "warning"),
        ("-q", *PLAN),
        (*PLAN, "-q"),
    ],
)
def test_logging_options_go_before_or_after_the_command(
    project: Path, emulator: Emulator, argv: tuple[str, ...]
) -> None:
    loud = dbt_klaviyo(project, emulator, *PLAN, "-s", "customers")
    assert "customers: reading" in loud.stderr
    quiet = dbt_klaviyo(project, emulator, *argv, "-s", "customers")
    assert quiet.returncode == 0, quiet.output
    assert "customers: reading" not in quiet.stderr
    assert "customers" in quiet.stdout  # the summary still prints


def test_every_option_also_comes_from_the_environment(project: Path, emulator: Emulator) -> None:
    env = {
        "DBT_KLAVIYO_SELECT": "customers",
        "DBT_KLAVIYO_PROJECT_DIR": ".",
        "DBT_KLAVIYO_PROFILES_DIR": ".",
        "DBT_KLAVIYO_OUTPUT": "json",
        "DBT_KLAVIYO_LOG_LEVEL": "warning",
    }
    planned = dbt_klaviyo(project, emulator, "plan", env=env)
    assert planned.returncode == 0, planned.output
    assert [m["model"] for m in json.loads(planned.stdout)["models"]] == ["customers"]
    assert "customers: reading" not in planned.stderr
    # The command line wins, before or after the command.
    for argv in (("--log-level", "info", "plan"), ("plan", "--log-level", "info")):
        chosen = dbt_klaviyo(project, emulator, *argv, "-s", "loyalty_updates", env=env)
        assert [m["model"] for m in json.loads(chosen.stdout)["models"]] == ["loyalty_updates"]
        assert "loyalty_updates: reading" in chosen.stderr


def test_every_option_names_its_environment_variable_in_help() -> None:
    logging_options = {"log_level", "log_format", "quiet"}
    assert {param.name for param in cli.cli.params} == {"version", *logging_options}
    for command in [cli.cli, *cli.cli.commands.values()]:
        for param in command.params:
            if not isinstance(param, click.Option) or param.name == "version":
                continue
            if command is not cli.cli and param.name in logging_options:
                assert param.envvar is None  # read once, before the command
                continue
            longest = max(param.opts, key=len).lstrip("-").upper().replace("-", "_")
            assert param.envvar == f"DBT_KLAVIYO_{longest}", (command.name, param.name)
            assert param.show_envvar


def test_log_format_json_writes_one_object_per_line_keys_scrubbed(
    project: Path, emulator: Emulator
) -> None:
    done = dbt_klaviyo(project, emulator, "--log-format", "json", *PLAN, "-s", "customers")
    assert done.returncode == 0, done.output
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any(line["message"].startswith("customers: reading") for line in lines)
    assert {line["level"] for line in lines} == {"info"}
    logged = (project / "target" / "dbt-klaviyo.log").read_text().splitlines()
    assert json.loads(logged[-1])["logger"].startswith("dbt_klaviyo_sync")
    assert PRIVATE_KEY not in done.output + "".join(logged)

    out = io.StringIO()
    with contextlib.redirect_stderr(out), pytest.MonkeyPatch.context() as patch:
        patch.setenv("KLAVIYO_PRIVATE_API_KEY", PRIVATE_KEY)
        configure("INFO", "json")
        logging.getLogger("dbt_klaviyo_sync.test").info("sent with %s", PRIVATE_KEY)
        configure("INFO", "text")
    assert json.loads(out.getvalue())["message"] == "sent with [redacted key]"


# -- status and rejects: the project found as sync finds it, unknown models alike --------


def test_history_commands_find_the_project_from_a_subdirectory(
    project: Path, emulator: Emulator, tmp_path: Path
) -> None:
    assert sync_customers(project, emulator).returncode == 0
    below = project / "models"
    for argv in (("status",), ("rejects", "customers")):
        done = dbt_klaviyo(project, None, *argv, cwd=below)
        assert done.returncode == 0, done.output
        assert "customers" in done.stdout
    elsewhere = dbt_klaviyo(
        project, None, "status", cwd=tmp_path, env={"DBT_PROJECT_DIR": str(project)}
    )
    assert elsewhere.returncode == 0 and "customers" in elsewhere.stdout, elsewhere.output


def test_status_and_rejects_treat_an_unknown_model_alike(project: Path, emulator: Emulator) -> None:
    assert sync_customers(project, emulator).returncode == 0
    status = dbt_klaviyo(project, None, "status", "custmers")
    rejects = dbt_klaviyo(project, None, "rejects", "custmers")
    assert status.returncode == rejects.returncode == 2
    assert status.stderr == rejects.stderr
    assert "model 'custmers' has never been synced" in status.stderr
    assert "customers" in status.stderr
