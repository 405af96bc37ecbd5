"""How the CLI shows things in a terminal: the summary table, the plan of a dry run, the run
history, rejects and validation checks. Machine-readable output is `RunSummary.to_dict`."""

from __future__ import annotations

import sys
from dataclasses import fields
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dbt_klaviyo_sync.api import Check
from dbt_klaviyo_sync.changeset import REJECT_COLUMNS, RUN_COLUMNS, RunCounts
from dbt_klaviyo_sync.summary import ModelResult, RunSummary, in_words

#: Fields of a sample record shown in a plan (a new record has them all; --output json
#: gives every one).
SHOWN_FIELDS = 5


def console() -> Console:
    # Off a terminal (CI logs, pipes) rich would squeeze tables into 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def summary(out: Console, run: RunSummary) -> None:
    """The table CONTRACT.md promises, then rejects, failures and, for a dry run, the plan.
    The run's own error is not here: the CLI prints it once, on standard error."""
    title = "Dry run: nothing was sent" if run.dry_run else "Klaviyo sync"
    table = Table(title=title, title_justify="left")
    columns = [f.name for f in fields(RunCounts)]
    table.add_column("model")
    for column in columns:
        table.add_column(column, justify="right")
    for m in run.models:
        table.add_row(m.model, *(f"{getattr(m.counts, c):,}" for c in columns))
    if run.account:  # which account the keys write to, so nobody syncs into the wrong one
        out.print(f"Klaviyo account: {escape(run.account)}")
    if run.models:
        out.print(table)
    for m in run.models:
        if run.dry_run:
            _plan(out, m)
        elif any((m.counts.added, m.counts.updated, m.counts.removed)):
            said = in_words(m.object, m.behavior, m.counts, done=True)
            out.print(f"{escape(m.model)} ({m.object} {m.behavior}): {said}")
        _problems(out, m, would=run.dry_run)
    if run.interrupted:
        out.print(
            "[yellow]Interrupted:[/yellow] stopped on request. Every answer received was "
            "recorded; what was not sent goes on the next run."
        )


def _plan(out: Console, m: ModelResult) -> None:
    """What the sync would do to the model's records, in its behaviour's words, with a few
    records field by field."""
    words = in_words(m.object, m.behavior, m.counts, done=False)
    out.print(f"[bold]{escape(m.model)}[/bold] ({m.object} {m.behavior}): {words}")
    for sample in m.samples:
        shown = list(sample.fields.items())[:SHOWN_FIELDS]
        changes = "; ".join(f"{name}: {_value(old)} -> {_value(new)}" for name, (old, new) in shown)
        if len(sample.fields) > SHOWN_FIELDS:
            changes += f"; and {len(sample.fields) - SHOWN_FIELDS} more fields"
        out.print(f"  {sample.change:<6} {escape(sample.key)}  {escape(changes)}")


def _cell(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def _value(value: Any) -> str:
    text = "NULL" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problems(out: Console, m: ModelResult, would: bool) -> None:
    verb = "would reject" if would else "rejected"
    for reject in m.rejects:
        where = f" {reject.column}" if reject.column else ""
        key = "(a row with a NULL key)" if reject.key is None else repr(reject.key)
        out.print(
            f"  {verb} {escape(m.model)} {escape(key)}{escape(where)}: {escape(reject.reason)}"
        )
    if m.counts.rejected > len(m.rejects):
        more = m.counts.rejected - len(m.rejects)
        out.print(f"  ... and {more:,} more: dbt-klaviyo rejects {escape(m.model)}")
    for failure in m.failures:
        again = "" if "next run" in failure else " (sent again next run)"
        out.print(f"  failed {escape(m.model)} {escape(failure)}{again}")
    for key in m.planned:
        out.print(f"  would delete {escape(m.model)} {key!r}")
    for note in m.notes:
        out.print(f"  [yellow]{escape(m.model)}: {escape(note)}[/yellow]")
    if m.error:
        out.print(f"  [red]{escape(m.model)}: {escape(m.error)}[/red]")


#: Shorter headers for the run history's table, to keep it within a terminal's width.
_RUN_HEADERS = {"rate_limit_seconds": "waited"}


def runs(out: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title="Last syncs", title_justify="left")
    for column in RUN_COLUMNS:
        table.add_column(
            _RUN_HEADERS.get(column, column),
            justify="right" if column not in ("model", "status") else "left",
        )
    for row in rows:
        cells = [f"{row[c]:,}" if isinstance(row[c], int) else _cell(row[c]) for c in RUN_COLUMNS]
        table.add_row(*(escape(c) for c in cells))
    out.print(table)


def rejects(out: Console, model: str, rows: list[tuple[Any, ...]], total: int) -> None:
    table = Table(title=f"Rejected records of {model}", title_justify="left")
    for column in REJECT_COLUMNS[1:]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(escape(_cell(v)) for v in row[1:]))
    out.print(table)
    if total > len(rows):
        out.print(f"{total - len(rows):,} more; export them all with --csv FILE")


def checks(out: Console, found: list[Check]) -> None:
    for check in found:
        mark = "[green]ok[/green]  " if check.ok else "[red]FAIL[/red]"
        out.print(f"{mark} {escape(check.what)}")
        for problem in check.problems:
            out.print(f"      {escape(problem)}")
