"""What a run did, per model and in total: what the console table, `--output json` and the
Python API all report, and where the exit status comes from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dbt_klaviyo_sync.changeset import Reject, RunCounts


def quantity(count: int, noun: str) -> str:
    """'1 request', '2 requests': how output counts things."""
    return f"{count:,} {noun if count == 1 else noun + 's'}"


#: Each behaviour's words for the table's added, updated and removed: (column, as a plan
#: says it, as a run reports it). The log, the plan and the line under the table use them.
_WORDS: dict[tuple[str, str], tuple[tuple[str, str, str], ...]] = {
    ("profile", "upsert"): (
        ("added", "to create", "created"),
        ("updated", "to update", "updated"),
        ("removed", "left the model (kept in Klaviyo)", "left the model (kept in Klaviyo)"),
    ),
    ("profile", "update_only"): (("updated", "profiles to update", "profiles updated"),),
    ("profile", "delete"): (("removed", "profiles to delete", "profiles deleted"),),
    ("list", "mirror"): (
        ("added", "to add to the list", "added to the list"),
        ("updated", "members to update", "members updated"),
        ("removed", "to remove from the list", "removed from the list"),
    ),
    ("event", "send"): (("added", "events to send", "events sent"),),
    ("subscription", "mirror"): (
        ("added", "to subscribe", "subscribed"),
        ("updated", "to unsubscribe", "unsubscribed"),
        (
            "removed",
            "to unsubscribe as they left the model",
            "left the model (unsubscribed if in the list)",
        ),
    ),
    ("subscription", "subscribe"): (("added", "to subscribe", "subscribed"),),
    ("suppression", "mirror"): (
        ("added", "to suppress", "suppressed"),
        ("updated", "to unsuppress", "unsuppressed"),
        ("removed", "to unsuppress as they left the model", "left the model (unsuppressed)"),
    ),
}


def in_words(obj: str, behavior: str, counts: RunCounts, *, done: bool) -> str:
    """A model's counts in its behaviour's own words: '3 profiles deleted' where the table
    says removed 3, '2 to subscribe' in a plan."""
    words = _WORDS.get((obj, behavior), ())
    said = [f"{getattr(counts, column):,} {run if done else plan}" for column, plan, run in words]
    return ", ".join(said) or "nothing"


#: How many records of each kind a plan shows, and how many rejects a console run prints.
SAMPLE_SIZE = 5
PRINTED_REJECTS = 20

#: Exit statuses, as CONTRACT.md fixes them.
OK, RECORDS_FAILED, COULD_NOT_RUN = 0, 1, 2


@dataclass(frozen=True)
class Change:
    """A sample of a planned change: the fields that change, each as (old, new)."""

    key: str
    change: str  # add, update or remove
    fields: dict[str, tuple[Any, Any]]


def changed_fields(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields whose value differs from what Klaviyo last accepted (all set ones for a
    record never sent)."""
    before = old or {}
    return {
        name: (before.get(name), value)
        for name, value in new.items()
        if value != before.get(name) and not (old is None and value is None)
    }


@dataclass
class ModelResult:
    """What happened to one model; the CLI prints it, and exit statuses derive from it."""

    model: str
    object: str = ""
    behavior: str = ""
    counts: RunCounts = field(default_factory=RunCounts)
    rejects: list[Reject] = field(default_factory=list)  # a sample, for the console
    failures: list[str] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)  # dry run: every key it would delete
    samples: list[Change] = field(default_factory=list)  # dry run: some changes, field by field
    seconds: float = 0.0
    error: str | None = None  # why the model stopped, when it did
    rows: int = 0  # in the model
    interrupted: bool = False  # the run was asked to stop before this model was done
    notes: list[str] = field(default_factory=list)  # warnings the user must see in the summary

    def rejects_too_many(self, rate: float | None) -> bool:
        """Whether the rejects should fail the run: any at all, or more than `rate` of the
        model's rows. `rejected` counts every row that stands refused, from this run or an
        earlier one, so open rejects keep the status at 1 on every run until fixed."""
        if rate is None:
            return self.counts.rejected > 0
        return self.counts.rejected > rate * max(self.rows, 1)

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if self.interrupted:
            return "interrupted"
        if self.counts.failed:
            return "failed"
        return "rejects" if self.counts.rejected else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "object": self.object,
            "behavior": self.behavior,
            "status": self.status,
            **asdict(self.counts),
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "rejects": [
                {"key": r.key, "column": r.column, "code": r.code, "reason": r.reason}
                for r in self.rejects
            ],
            "failures": self.failures,
            "notes": self.notes,
            "planned_deletions": self.planned,
            "samples": [
                {
                    "key": s.key,
                    "change": s.change,
                    "fields": {k: {"old": o, "new": n} for k, (o, n) in s.fields.items()},
                }
                for s in self.samples
            ],
        }


@dataclass
class RunSummary:
    """A whole run. `exit_status` is the CLI's: 0 all synced, 1 records rejected (above the
    threshold) or failed, 2 could not run."""

    models: list[ModelResult] = field(default_factory=list)
    dry_run: bool = False
    seconds: float = 0.0
    error: str | None = None  # why the run could not run (exit 2)
    reject_rate: float | None = None  # --fail-on-rejects
    interrupted: bool = False  # SIGINT or SIGTERM stopped it
    account: str | None = None  # the Klaviyo account written to: its name and id

    @property
    def exit_status(self) -> int:
        if self.error or self.interrupted or any(m.error for m in self.models):
            return COULD_NOT_RUN
        if any(m.counts.failed or m.rejects_too_many(self.reject_rate) for m in self.models):
            return RECORDS_FAILED
        return OK

    @property
    def reason(self) -> str:
        """The exit status in words, for orchestrators and alerts."""
        if self.interrupted:
            return "interrupted (what was not sent goes next run)"
        if self.exit_status == COULD_NOT_RUN:
            return "could not run"
        if any(m.counts.failed for m in self.models):
            return "records failed (sent again next run)"
        if self.exit_status == RECORDS_FAILED:
            return "records rejected"
        return "dry run" if self.dry_run else "synced"

    def to_dict(self) -> dict[str, Any]:
        return {
            "exit_status": self.exit_status,
            "reason": self.reason,
            "interrupted": self.interrupted,
            "error": self.error,
            "dry_run": self.dry_run,
            "account": self.account,
            "seconds": round(self.seconds, 3),
            "requests": sum(m.counts.requests for m in self.models),
            "models": [m.to_dict() for m in self.models],
        }
