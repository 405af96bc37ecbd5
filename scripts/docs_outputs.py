"""The command outputs shown in README.md and docs/*.md, made by running the commands.

Each ```text block that shows what a command prints follows a marker line,
`<!-- output: NAME -->`. The scenarios below run the real `dbt-klaviyo` (in the test's
process, as the other tests do, or in a process of its own where a signal or a kill is the
point), real dbt and the bundled emulator on loopback, in a private copy of the built demo
project (integration_tests/), and make the text of every named block. A ```text block that
is not a command's output (a diagram, a command's synopsis) follows `<!-- not run: WHY -->`
instead, so that no block is left unaccounted for.

What differs from run to run becomes a placeholder of the same width, so that a reader
never takes it for a measured value and a table keeps its columns: durations `x.x s`,
times `YYYY-MM-DD hh:mm:ss`, Klaviyo's ids `<id1>`, `<id2>`... by first appearance, the
temporary project `.../integration_tests`, a PostgreSQL database `<database>`. Long lines
are shown whole, as a terminal wide enough shows them.

tests/test_docs_outputs.py runs each scenario on the session's built project and fails on
any difference, naming the page, the line and the marker; `python3 dev.py docs` runs it so
that it rewrites the blocks instead.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from dbt_klaviyo_sync import resolved
from dbt_klaviyo_sync.cli import main as cli_main
from dbt_klaviyo_sync.dbt import PACKAGE_GIT
from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import (
    PRIVATE_KEY,
    PUBLIC_KEY,
    REPO,
    change_model,
    clean_env,
    environment,
    kill_when,
    klaviyo_api,
    make_emulator,
    model_rows,
    pg_database,
    run_dbt,
    wait_for,
)
from tests.test_dbt_package import install_package_version
from tests.test_sync_consent import (
    CONSENT_COLUMNS,
    EMAIL_CONSENT,
    PEOPLE,
    write_model,
)

PAGES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
DEFAULT_URL = "http://127.0.0.1:8765"  # the emulator's, in place of the random port
#: On the line before the fence, alone or, in a list item (where a line of its own would end
#: the list), at the end of the paragraph's last line.
MARKER = re.compile(r"(.*\S )?\s*<!-- (output: (?P<name>[\w.-]+)|not run: .+) -->")
FENCE = re.compile(r"(?P<indent>\s*)```text")


# -- the blocks in the pages ---------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A ```text block of a page: its marker's name (None: `not run`), where its text is."""

    page: Path
    name: str | None
    marked: bool
    line: int  # of the opening fence, from 1
    end: int  # the closing fence's index in the page's lines
    indent: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found = []
    for at, line in enumerate(lines):
        fence = FENCE.fullmatch(line)
        if not fence:
            continue
        indent = fence["indent"]
        end = next(i for i in range(at + 1, len(lines)) if lines[i].strip() == "```")
        text = "\n".join(item.removeprefix(indent) for item in lines[at + 1 : end])
        marker = MARKER.fullmatch(lines[at - 1]) if at else None
        name = marker["name"] if marker else None
        found.append(Block(page, name, marker is not None, at + 1, end, indent, text))
    return found


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks(page)]


def differences(outputs: dict[str, str]) -> list[str]:
    """A readable diff for each block whose text is not what its scenario printed."""
    found = []
    for block in all_blocks():
        if block.name is None or block.name not in outputs:
            continue
        if block.text != outputs[block.name]:
            diff = difflib.unified_diff(
                block.text.splitlines(),
                outputs[block.name].splitlines(),
                f"{block.where} (the page)",
                f"<!-- output: {block.name} --> (the run)",
                lineterm="",
            )
            found.append("\n".join(diff))
    return found


def write(outputs: dict[str, str]) -> list[str]:
    """Put each output into its blocks; where the blocks rewritten were."""
    changed = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        stale = [b for b in blocks(page) if b.name in outputs and b.text != outputs[b.name]]
        for block in reversed(stale):  # from the end: the lines before stay where they are
            text = outputs[str(block.name)].split("\n")
            lines[block.line : block.end] = [block.indent + t if t else "" for t in text]
        if stale:
            page.write_text("\n".join(lines) + "\n")
            changed += [block.where for block in stale]
    return changed


# -- running the commands ------------------------------------------------------------------


class _Stream(io.StringIO):
    """stdout or stderr: each write also goes, in order, to the terminal's list of chunks."""

    def __init__(self, terminal: list[tuple[bool, str]], is_stdout: bool) -> None:
        super().__init__()
        self.terminal, self.is_stdout = terminal, is_stdout

    def write(self, text: str) -> int:
        written = super().write(text)  # a TypeError for bytes, which click then decodes
        self.terminal.append((self.is_stdout, text))
        return written


#: Off a terminal the CLI has rich wrap what it prints at this width (report.console).
WRAP = 160


def unwrap(text: str) -> str:
    """Lines rich wrapped at `WRAP` columns joined again, as a terminal wide enough shows
    them: a line continues the one before when that one's next word would not have fit."""
    lines: list[str] = []
    last = ""  # the line before, as printed
    for line in text.split("\n"):
        word = line.split(" ", 1)[0]
        wrapped = 0 < len(last.rstrip()) <= WRAP < len(last.rstrip()) + 1 + len(word)
        if wrapped and word and not line.startswith((" ", "│", "└", "┃", "┡", "┏")):
            lines[-1] = lines[-1].rstrip() + " " + line
        else:
            lines.append(line)
        last = line
    return "\n".join(lines)


@dataclass
class Run:
    command: str
    code: int
    stdout: str
    stderr: str
    terminal: str  # both, in the order a terminal shows them

    def shown(self, text: str | None = None, status: bool = False) -> str:
        """The command as typed, then `text` (all it printed when None), then its status."""
        shown = [f"$ {self.command}", (self.terminal if text is None else text).rstrip("\n")]
        if status:
            shown += ["$ echo $?", str(self.code)]
        return "\n".join(part for part in shown if part)


@dataclass
class Lab:
    """A copy of the built demo project, the emulator (with the tests' keys), and what the
    scenario has shown so far."""

    project: Path
    emulator: Emulator
    outputs: dict[str, str] = field(default_factory=dict)

    def run(self, command: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Run:
        """`command` as a user types it (starting `dbt-klaviyo`), run in the project (or
        `cwd`)."""
        argv = shlex.split(command.split("  #")[0])[1:]
        settings = {
            "KLAVIYO_PRIVATE_API_KEY": PRIVATE_KEY,
            "KLAVIYO_PUBLIC_API_KEY": PUBLIC_KEY,
            "KLAVIYO_BASE_URL": self.emulator.url,
            **(env or {}),
        }
        terminal: list[tuple[bool, str]] = []
        out, err = _Stream(terminal, True), _Stream(terminal, False)
        with (
            environment(cwd or self.project, clean_env(**settings)),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                cli_main(argv)
                code = 0
            except SystemExit as exit_:
                code = int(exit_.code or 0)
        # What rich wrapped is joined again (a print is one write), and placeholders put in.
        shown = "".join(unwrap(text) if is_stdout else text for is_stdout, text in terminal)
        stdout = "".join(unwrap(text) for is_stdout, text in terminal if is_stdout)
        clean = self.normalise
        return Run(command, code, clean(stdout), clean(err.getvalue()), clean(shown))

    def normalise(self, text: str) -> str:
        database = pg_database(self.project)
        if database is not None:  # each test worker's copy is a database of its own
            text = text.replace(f'"{database.name}"', '"<database>"')
        return normalise(text, self.project, self.emulator.url)

    def show(self, name: str, text: str) -> None:
        assert name not in self.outputs, f"{name} shown twice"
        self.outputs[name] = renumber_ids(text.rstrip("\n"))

    def dbt(self, *args: str) -> None:
        done = run_dbt(self.project, *args)
        assert done.returncode == 0, done.stdout + done.stderr

    def sql(self, statement: str) -> None:
        change_model(self.project, statement)

    def rows(self, sql: str) -> list[dict[str, Any]]:
        return model_rows(self.project, sql)


def normalise(text: str, project: Path, url: str) -> str:
    """The output with what differs from run to run put as placeholders (module docstring)."""
    text = text.replace(str(project), ".../integration_tests").replace(url, DEFAULT_URL)
    text = re.sub(r"\b\d+\.\d+ s\b", lambda m: "x.x s".rjust(len(m[0])), text)
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", "YYYY-MM-DDThh:mm:ss+00:00", text)
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "YYYY-MM-DD hh:mm:ss", text)
    # A run history's row: its seconds and waited cells.
    text = "\n".join(
        re.sub(r"(?<![\w.])\d+\.\d(?![\w.])", lambda m: "x.x".rjust(len(m[0])), line)
        if "YYYY-MM-DD hh:mm:ss" in line
        else line
        for line in text.split("\n")
    )
    text = re.sub(r"held in .*? \(PID \d+\)", "held in ... (PID ...)", text)
    return "\n".join(line.rstrip() for line in text.split("\n"))


ULID = re.compile(r"\b01[0-9A-HJKMNP-TV-Z]{24}\b")


def renumber_ids(text: str) -> str:
    """Klaviyo's ids (profiles, jobs) as `<id1>`, `<id2>`... by first appearance."""
    seen: dict[str, str] = {}
    return ULID.sub(lambda m: seen.setdefault(m[0], f"<id{len(seen) + 1}>"), text)


def elide(text: str, prefix: str) -> str:
    """`text` with each run of lines that start with `prefix` shown as one `  ...`."""
    lines: list[str] = []
    for line in text.split("\n"):
        if not line.startswith(prefix):
            lines.append(line)
        elif not lines or lines[-1] != "  ...":
            lines.append("  ...")
    return "\n".join(lines)


def lines_with(text: str, *wanted: str) -> str:
    """Only the lines of `text` that contain one of `wanted`, in order."""
    found = [line for line in text.split("\n") if any(w in line for w in wanted)]
    assert found, f"none of {wanted} in:\n{text}"
    return "\n".join(found)


# -- the scenarios -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    run: Callable[[Lab], None]
    shows: frozenset[str]  # the names of the blocks it makes
    postgres: bool  # runs on the demo project built on PostgreSQL


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    shows: str, postgres: bool = False
) -> Callable[[Callable[[Lab], None]], Callable[[Lab], None]]:
    """Register a scenario under its function's name, with the names of the blocks it makes
    (separated by spaces)."""

    def register(run: Callable[[Lab], None]) -> Callable[[Lab], None]:
        SCENARIOS[run.__name__] = Scenario(run, frozenset(shows.split()), postgres)
        return run

    return register


SYNC = "dbt-klaviyo sync --project-dir . --profiles-dir ."


@scenario(
    "version validate-no-list no-list backfill-warning reading-line plan-step-5 "
    "json-log demo-step-6 other-objects rate-limit-wait status rejects status-typo "
    "fail-on-rejects report reconcile nothing-to-delete safety-brake"
)
def demo(lab: Lab) -> None:
    """The demo's steps (scripts/demo.py), then what the docs show after them."""
    version = lab.run("dbt-klaviyo --version")
    # dbt-core's and the adapters' versions are the test lane's (constraints/).
    lab.show("version", re.sub(r"(dbt-(?!klaviyo)\w+): [\d.]+", r"\1: 1.x.y", version.shown()))
    refused = lab.run("dbt-klaviyo validate")
    lab.show("validate-no-list", refused.shown(status=True))
    no_list = lab.run("dbt-klaviyo sync -s vip_audience")
    lab.show("no-list", lines_with(no_list.stderr, "Error:"))
    events = lab.run("dbt-klaviyo plan -s order_events")
    lab.show("backfill-warning", events.shown(elide(events.stdout, "  add ")))

    first = lab.run(f"{SYNC} --select customers")
    lab.show("reading-line", lines_with(first.stderr, "reading main.customers"))
    lab.dbt("run", "--vars", "{demo_step: 1}")
    plan = lab.run("dbt-klaviyo plan -s customers")
    lab.show("plan-step-5", plan.shown(plan.stdout))
    json_log = lab.run("dbt-klaviyo --log-format json plan -s customers")
    lab.show("json-log", json_log.shown("\n".join([*json_log.stderr.split("\n")[:2], "..."])))
    second = lab.run(f"{SYNC} --select customers")
    lab.show("demo-step-6", second.shown())
    lab.run(f"{SYNC} --select customers")

    lab.emulator.create_list("VIPs", list_id="VipLst")
    others = lab.run(f"{SYNC} --select vip_audience loyalty_updates order_events")
    erasures = lab.run(f"{SYNC} --select erasure_requests")
    lab.show(
        "other-objects",
        others.shown(others.stdout, status=True) + "\n" + erasures.shown(erasures.stdout),
    )
    lab.show("rate-limit-wait", lines_with(others.stderr, "loyalty_updates: sent in"))

    lab.show("status", lab.run("dbt-klaviyo status --runs 2  # after the demo").shown())
    lab.show("rejects", lab.run("dbt-klaviyo rejects loyalty_updates").shown())
    lab.show("status-typo", lab.run("dbt-klaviyo status custmers").shown())
    again = lab.run("dbt-klaviyo sync -s loyalty_updates")
    within = lab.run(
        "dbt-klaviyo sync -s loyalty_updates --fail-on-rejects 0.05  # 1 of 100 rows: within 5%"
    )
    lab.show(
        "fail-on-rejects",
        again.shown(again.stdout, status=True) + "\n" + within.shown("...", status=True),
    )
    lab.show("report", lab.run("dbt-klaviyo report").shown())

    # Two profiles join the VIP list in Klaviyo, outside the sync.
    ids = [
        klaviyo_api(
            lab.emulator,
            "POST",
            "/api/profile-import",
            {"data": {"type": "profile", "attributes": {"email": email}}},
        )["data"]["id"]
        for email in ("stray1@example.com", "stray2@example.com")
    ]
    body = {"data": [{"type": "profile", "id": i} for i in ids]}
    klaviyo_api(lab.emulator, "POST", "/api/lists/VipLst/relationships/profiles", body)
    plan = lab.run("dbt-klaviyo plan -s vip_audience --reconcile")
    done = lab.run("dbt-klaviyo sync -s vip_audience --reconcile")
    lab.show("reconcile", plan.shown(plan.stdout) + "\n\n" + done.shown(done.stdout))

    lab.sql("INSERT INTO main.erasure_requests VALUES ('C77777')")
    erased = lab.run("dbt-klaviyo sync -s erasure_requests")
    lab.show("nothing-to-delete", lines_with(erased.stderr, "nothing to delete"))

    lab.sql("DELETE FROM main.vip_audience WHERE customer_id > 'C00100'")
    braked = lab.run("dbt-klaviyo sync -s vip_audience customers")
    lab.show("safety-brake", braked.shown(braked.stdout, status=True))


@scenario("phone-local phone-klaviyo conflict wait-too-long two-problems whole-request")
def rejects(lab: Lab) -> None:
    """Rows Klaviyo refuses, and a sync it makes wait or refuses as a whole."""
    c42 = lab.rows("SELECT email, phone FROM main.customers WHERE customer_id = 'C00042'")[0]
    for attributes in (
        {"external_id": "C00042", "phone_number": c42["phone"]},
        {"email": c42["email"]},
    ):
        body = {"data": {"type": "profile", "attributes": attributes}}
        klaviyo_api(lab.emulator, "POST", "/api/profile-import", body)
    for key, phone in (("C00003", "4155550123"), ("C00007", "+1 555"), ("C00011", "+15555550111")):
        lab.sql(f"UPDATE main.customers SET phone = '{phone}' WHERE customer_id = '{key}'")
    first = lab.run("dbt-klaviyo sync -s customers")
    lab.show("phone-local", lines_with(first.stdout, "'C00003' phone", "'C00007' phone"))
    lab.show("phone-klaviyo", lines_with(first.stdout, "is not a valid phone number."))
    lab.show("conflict", lines_with(first.stdout, "'C00042'"))

    lab.sql("UPDATE main.customers SET first_name = 'Ada' WHERE customer_id = 'C00001'")
    lab.emulator.inject(
        kind="raw",
        status=429,
        operation="create_or_update_profile",
        headers={"Retry-After": "86400"},
    )
    waited = lab.run("dbt-klaviyo sync -s customers")
    lab.show("wait-too-long", lines_with(waited.stdout, "failed customers"))
    lab.show(
        "two-problems",
        lines_with(first.stdout, "'C00007' phone")
        + "\n"
        + lines_with(waited.stdout, "failed customers C00001"),
    )

    lab.sql("UPDATE main.customers SET first_name = 'Bo' WHERE customer_id IN ('C00002', 'C00004')")
    lab.emulator.inject(status=400, count=100, operation="create_or_update_profile")
    refused = lab.run("dbt-klaviyo sync -s customers")
    lab.show("whole-request", lines_with(refused.stdout, "failed customers", "in a row"))


@scenario(
    "no-state dbt-cache bad-key unreachable key-space redirect select-nothing state-errors "
    "package-mismatch"
)
def errors(lab: Lab) -> None:
    """What stops a sync before it sends anything, and what warns."""
    with pytest.MonkeyPatch.context() as patch:
        # The project's copy was just written: the clock tick that makes a file changed
        # within it not trusted (resolved.py) would send the second run to dbt at times.
        patch.setattr(resolved, "TICK_NS", 0)
        patch.setattr(resolved, "COARSE_TICK_NS", 0)
        fresh = lab.run("dbt-klaviyo sync -s erasure_requests order_events")
        again = lab.run("dbt-klaviyo sync -s erasure_requests order_events --log-level debug")
    lab.show("no-state", lines_with(fresh.stderr, "no sync state at"))
    lab.show("dbt-cache", lines_with(again.stderr, "as resolved before ("))
    wrong_key = lab.run("dbt-klaviyo sync", env={"KLAVIYO_PRIVATE_API_KEY": "pk_not_this_one"})
    lab.show("bad-key", lines_with(wrong_key.stderr, "Error:"))
    nowhere = lab.run("dbt-klaviyo sync", env={"KLAVIYO_BASE_URL": "http://127.0.0.1:9"})
    lab.show("unreachable", lines_with(nowhere.stderr, "Error:"))
    spaced = lab.run("dbt-klaviyo sync", env={"KLAVIYO_PRIVATE_API_KEY": "pk_one two"})
    lab.show("key-space", lines_with(spaced.stderr, "Error:"))
    lab.emulator.inject(kind="raw", status=301, headers={"Location": "https://www.klaviyo.com"})
    moved = lab.run("dbt-klaviyo sync")
    lab.show("redirect", lines_with(moved.stderr, "Error:"))
    nothing = lab.run("dbt-klaviyo sync --select tag:nightly")
    lab.show("select-nothing", lines_with(nothing.stderr, "Error:"))

    (lab.project / "damaged.duckdb").write_bytes(b"not a database " * 1000)
    damaged = lab.run("dbt-klaviyo sync --state damaged.duckdb")
    state = lab.project / ".klaviyo_sync" / "state.duckdb"
    state.parent.mkdir(exist_ok=True)
    hold = "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True); input()"
    with subprocess.Popen(
        [sys.executable, "-c", hold, str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout and holder.stdout.readline() == "held\n"
        locked = lab.run("dbt-klaviyo sync")
        holder.communicate("\n")
    lab.show(
        "state-errors",
        lines_with(damaged.stderr, "Error:") + "\n" + lines_with(locked.stderr, "Error:"),
    )

    # The dbt package of another version than the tool's, installed from git.
    older = "0.0.3"
    install_package_version(lab.project, older)
    entry = {"git": PACKAGE_GIT, "revision": f"v{older}"}
    (lab.project / "packages.yml").write_text(yaml.safe_dump({"packages": [entry]}))
    mismatch = lab.run("dbt-klaviyo sync")
    lab.show("package-mismatch", mismatch.shown(lines_with(mismatch.stderr, "Error:")))


@scenario("consent annotation-errors check-failed")
def models(lab: Lab) -> None:
    """Models of the demo project's copy beside its own: a consent mirror (Klaviyo's list
    consent, kept apart from membership), one whose key has NULLs (the build-time check),
    and annotations gone wrong in two demo models. One `dbt run` builds the new models."""
    people: list[tuple[str, ...]] = list(PEOPLE)
    write_model(lab.project, "email_consent", people, EMAIL_CONSENT, CONSENT_COLUMNS)
    (lab.project / "models" / "new_customers.sql").write_text(
        "select * from (values ('C1', 'a@example.com'), (NULL, 'b@example.com'),"
        " (NULL, 'c@example.com')) as t(customer_id, email)\n"
    )
    (lab.project / "models" / "new_customers.yml").write_text(
        "version: 2\nmodels:\n  - name: new_customers\n    config:\n"
        '      post_hook: "{{ klaviyo_sync.check() }}"\n'
        "      meta: {klaviyo: {object: profile, behavior: upsert}}\n"
        "    columns:\n"
        "      - {name: customer_id, config: {meta: {klaviyo: {sync_key: external_id}}}}\n"
        "      - {name: email, config: {meta: {klaviyo: {field: email}}}}\n"
    )
    schema = lab.project / "models" / "schema.yml"
    text = schema.read_text().replace("          list_id: VipLst\n", "", 1)
    schema.write_text(text.replace("field: properties.sku", "field: sku", 1))
    built = run_dbt(lab.project, "run", "--select", "email_consent", "new_customers")
    assert built.returncode == 1, built.stdout + built.stderr
    # dbt indents the hook's message under its own line naming the failure.
    failure = lines_with(lab.normalise(built.stdout), "klaviyo_sync.check()", "  - ")
    lab.show("check-failed", textwrap.dedent(failure))

    broken = lab.run("dbt-klaviyo sync")
    lab.show("annotation-errors", lines_with(broken.stderr, "Error:", "model '"))

    lab.emulator.create_list("Newsletter", list_id="NwsLtr")
    assert lab.run("dbt-klaviyo sync --select email_consent").code == 0
    lab.sql(
        """DELETE FROM main.email_consent WHERE email IN ('bob@example.com', 'cat@example.com');
           UPDATE main.email_consent SET consent = false WHERE email = 'dan@example.com';
           INSERT INTO main.email_consent VALUES ('fay@example.com', NULL, true, NULL)"""
    )
    plan = lab.run("dbt-klaviyo sync --select email_consent --dry-run")
    done = lab.run("dbt-klaviyo sync --select email_consent")
    planned = plan.stdout.split("\n")
    below = next(i for i, line in enumerate(planned) if line.startswith("└")) + 1
    sent = [
        lines_with(done.stderr, "email_consent: 5 rows", "left alone"),
        "...",
        lines_with(done.stdout, "│ email_consent"),
    ]
    lab.show(
        "consent",
        plan.shown("\n".join(["...", *planned[below:]])) + "\n\n" + done.shown("\n".join(sent)),
    )


@scenario("followed-job interrupted")
def crash(lab: Lab) -> None:
    """A sync killed while its bulk job ran, then the run after it; a sync stopped by
    Ctrl-C (SIGINT), in real processes."""
    with make_emulator(job_seconds=3) as slow:
        jobs_polled = "get_bulk_import_profiles_job"
        kill_when(
            lab.project, slow, lambda e: e.stats()["requests_by_operation"].get(jobs_polled, 0) >= 1
        )
        after = Lab(lab.project, slow).run("dbt-klaviyo sync -s customers")
    # How often the job is polled before it finishes varies: the run's last line is left out.
    wanted = ("followed bulk job", "customers: 1200 rows", "customers: sent in")
    lab.show("followed-job", after.shown("...\n" + lines_with(after.stderr, *wanted)))

    lab.sql(
        """INSERT INTO main.order_events
           SELECT 'X' || i, 'buyer' || i || '@example.com', NULL, TIMESTAMP '2024-06-01',
                  1.0, 'USD', 'SKU-X', 1 FROM range(5500) t(i)"""
    )
    # Klaviyo answers each request after 5 s. The first goes alone (its answer tells the
    # account's limits); then the signal goes once the sync's 4 sending threads each have
    # a request in flight, and no sixth can start before an answer: it lands with exactly
    # those 4 unanswered, however fast or loaded the machine (waiting for fewer instead let
    # a varying number go), and they are answered before the run stops.
    lab.emulator.inject(kind="delay", seconds=5, operation="bulk_create_events", count=100)
    command = "dbt-klaviyo sync -s order_events"
    with subprocess.Popen(
        [str(Path(sys.executable).parent / "dbt-klaviyo"), *command.split()[1:]],
        cwd=lab.project,
        env=clean_env(
            KLAVIYO_PRIVATE_API_KEY=PRIVATE_KEY,
            KLAVIYO_PUBLIC_API_KEY=PUBLIC_KEY,
            KLAVIYO_BASE_URL=lab.emulator.url,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        calls = lab.emulator.stats
        wait_for(
            lambda: calls()["requests_by_operation"].get("bulk_create_events", 0) >= 5, process
        )
        process.send_signal(signal.SIGINT)
        printed, _ = process.communicate(timeout=120)
    # Whether the unit queued behind the 4 in flight was handed to a thread before the
    # signal landed varies: its records are failed either way (the table's count is the
    # same), named one by one or counted with the rest. Those lines are left out.
    stopped = elide(lab.normalise(unwrap(printed)), "  failed order_events ").split("\n")
    first = next(i for i, line in enumerate(stopped) if "stopping:" in line)
    shown = ["...", *stopped[first:]]
    lab.show(
        "interrupted",
        Run(f"{command}        # then Ctrl-C", process.returncode, "", "", "\n".join(shown)).shown(
            status=True
        ),
    )


@scenario("postgres", postgres=True)
def postgres(lab: Lab) -> None:
    """A sync of the demo project built on PostgreSQL, after one row changed."""
    assert lab.run("dbt-klaviyo sync --target postgres -s customers").code == 0
    lab.sql("UPDATE main.customers SET first_name = 'Ada' WHERE customer_id = 'C00001'")
    lab.show("postgres", lab.run("dbt-klaviyo sync --target postgres -s customers").shown())


@scenario("init")
def init(lab: Lab) -> None:
    """`dbt-klaviyo init` in a new dbt-duckdb project, as `dbt init` leaves one."""
    shop = lab.project.parent / "shop"
    (shop / "models").mkdir(parents=True)
    (shop / "dbt_project.yml").write_text(
        'name: shop\nversion: "1.0.0"\nprofile: shop\nmodel-paths: ["models"]\n'
    )
    (shop / "models" / "customers.sql").write_text("select 1 as customer_id\n")
    lab.show("init", lab.run("dbt-klaviyo init --no-deps", cwd=shop).shown())


# -- running them --------------------------------------------------------------------------


def run_scenario(name: str, project: Path) -> dict[str, str]:
    """The blocks scenario `name` makes, run in `project` (a private copy of the built demo
    project, on PostgreSQL for a scenario that says so) beside a fresh emulator."""
    with make_emulator(job_seconds=0.2) as emulator:
        lab = Lab(project, emulator)
        SCENARIOS[name].run(lab)
    assert set(lab.outputs) == SCENARIOS[name].shows, f"{name} shows {set(lab.outputs)}"
    return lab.outputs


def unaccounted() -> list[str]:
    """Each ```text block with no marker, or whose marker no scenario makes."""
    made = {name for each in SCENARIOS.values() for name in each.shows}
    return [
        f"{block.where}: a ```text block with no marker: add `<!-- output: NAME -->` and a "
        "scenario that shows NAME, or `<!-- not run: WHY -->`"
        if not block.marked
        else f"{block.where}: no scenario shows `{block.name}`"
        for block in all_blocks()
        if not block.marked or (block.name is not None and block.name not in made)
    ]
