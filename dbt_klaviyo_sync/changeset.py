"""What crosses the seam between a warehouse and the rest of the sync, defined once.

A warehouse streams the rows to act on as Arrow record batches with the columns named here
(`KEY`, `CHANGE`, ... and the mapped values `f0`, `f1`, ...), in the types listed under
"Values"; `payloads` turns them into `Record`s and `Reject`s; the answers go back to the
warehouse as outcome tables (`OUTCOME_SCHEMA`), and what is sent before it is answered as
journal rows (`JOURNAL_SCHEMA`). Neither side reads the other's private tables or columns.

Values: a mapped column arrives as any Arrow type that holds it exactly; a text field
(identifiers included) always as a value whose text is what is sent; a JSON document to
parse (a JSON column, a number beyond what Arrow holds) as a struct with the one field
`JSON_TEXT` holding the document's text.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from dbt_klaviyo_sync.spec import SyncSpec

# -- the change batches ------------------------------------------------------------------

#: What to do with the row: add | update | remove | null_key | duplicate_key | settle
#: (back at the version Klaviyo accepted) | forget (an event or deletion that left the
#: model before Klaviyo took it).
CHANGE = "__change"
KEY = "__key"  # the sync key, as Klaviyo matches it
FINGERPRINT = "__fingerprint"  # of the mapped values, as the warehouse computes it
IN_SNAPSHOT = "__in_snapshot"  # Klaviyo accepted or refused a version of the row before
KLAVIYO_ID = "__klaviyo_id"  # the profile id, when an answer named it
SENT = "__sent"  # the exact body of an event a run sent without seeing the answer
#: Optional: a cheaper hash of the same values that the warehouse keeps beside the accepted
#: fingerprint, to skip computing the fingerprint of rows that did not change (DuckDB's
#: `hash()`, see `warehouse.duckdb.diff`). Carried back to the warehouse with the
#: fingerprint it was computed with; NULL, or absent, where the warehouse keeps none.
MEMO = "__memo"

#: The struct field that marks a value as JSON text to parse (see the module's docstring).
JSON_TEXT = "klaviyo_sync:json"
#: Fields where Klaviyo takes a number.
NUMBER_FIELDS = frozenset({"value", "location.latitude", "location.longitude"})
#: Fields that say yes or no: a consent, a suppression.
BOOLEAN_FIELDS = frozenset({"consent", "suppressed"})
#: Fields that hold a time.
TIME_FIELDS = frozenset({"time", "consented_at"})


_PHONE_MARKS = re.compile(r"[\s().-]")


def sync_key(key_field: str, text: str) -> str:
    """A sync key as the warehouses write `KEY` (`key_sql`, the sync_key macro): emails
    without case or surrounding blanks, phone numbers without the marks people write in
    them, other keys as they are. For matching what Klaviyo holds with the model's keys."""
    if key_field == "email":
        return text.strip(" ").lower()  # SQL's trim() takes spaces only
    if key_field == "phone_number":
        return _PHONE_MARKS.sub("", text)
    return text


def field_column(index: int) -> str:
    """The name of a mapped field's column in a change batch: f0 is the sync key."""
    return f"f{index}"


def field_kind(field: str) -> str:
    """What Klaviyo takes in a field: json (custom properties), number, time, boolean or
    text."""
    if field.startswith("properties."):
        return "json"
    if field in BOOLEAN_FIELDS:
        return "boolean"
    return "number" if field in NUMBER_FIELDS else "time" if field in TIME_FIELDS else "text"


@dataclass(frozen=True)
class ChangeCounts:
    add: int
    update: int
    remove: int
    invalid: int
    model_rows: int
    held: int = 0  # rows waiting for a bulk job of an earlier run

    @property
    def to_send(self) -> int:
        return self.add + self.update


@dataclass(frozen=True)
class KeyProblems:
    """A model's rows that the next sync rejects for their key alone, over the whole model:
    NULL keys, and keys (normalised as the sync matches them) on more than one row."""

    nulls: int
    duplicated: int
    examples: tuple[str, ...]  # a few of the duplicated keys

    def messages(self) -> list[str]:
        """What to tell the user, one line per problem."""
        found = []
        if self.nulls:
            rows = "row" if self.nulls == 1 else "rows"
            found.append(
                f"{self.nulls:,} {rows} with a NULL sync key, which the sync rejects: give "
                "every row a key, or leave such rows out of the model"
            )
        if self.duplicated:
            keys = "sync key" if self.duplicated == 1 else "sync keys"
            found.append(
                f"{self.duplicated:,} {keys} on more than one row ({', '.join(self.examples)}"
                f"{', ...' if self.duplicated > len(self.examples) else ''}), whose rows the "
                "sync rejects: make the key unique (dbt's `unique` test catches it at build)"
            )
        return found


# -- records and rejects -----------------------------------------------------------------


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which made
# building a record 1.6 µs where it is 0.6, at a million records a first sync; and a
# journaled record drops its values in place (`Prepared.forget_values`).
@dataclass(slots=True)  # tens of thousands are in flight at a time
class Record:
    """One row, converted and ready to be shaped into a request. Only
    `Prepared.forget_values` changes one, once its values are in the journal."""

    key: str
    fingerprint: int
    change: str
    in_snapshot: bool
    klaviyo_id: str | None
    values: dict[str, Any]  # Klaviyo field -> value; None where the model has NULL
    #: The JSON of every value, as the state keeps what Klaviyo accepted, when the row was
    #: shaped a column at a time (`payloads.shaped_rows`); `values` then holds only
    #: the fields sending reads (`SEND_TIME_FIELDS`). Dropped once the journal has it
    #: (`Prepared.forget_values`).
    values_json: str | None = None
    memo: int | None = None  # `MEMO`, computed with the fingerprint

    def json(self) -> str:
        """The JSON of the record's values, as the state keeps what Klaviyo accepted."""
        return self.values_json or orjson.dumps(self.values).decode()


#: The values a sender reads from a record while sending: identifiers, to look a profile up
#: by (and which values are NULL, for `nulls: clear`). The others only shape the body.
SEND_TIME_FIELDS = frozenset({"email", "phone_number", "external_id", "klaviyo_id"})


#: Klaviyo's refusals that are tried again on every run (see `Reject.retry`).
RETRIED_CODES = frozenset({"not_found", "duplicate_profile"})


@dataclass(frozen=True)
class Reject:
    """A row that will not be sent, and why. Stored in the rejects table."""

    key: str | None
    fingerprint: int | None
    in_snapshot: bool
    code: str
    reason: str
    column: str | None = None
    field: str | None = None

    @property
    def invalid_row(self) -> bool:
        """Rejects of the row's shape (NULL or duplicated key) are reported every run."""
        return self.code in ("null_key", "duplicate_key")

    @property
    def retry(self) -> bool:
        """A refusal that may pass while the row stays as it is: the profile may be
        created, or the profiles holding its identifiers merged, in Klaviyo. Such rows are
        sent again on every run, as Census and Hightouch do; the others (a malformed
        email, say) wait for the row to change."""
        return self.code in RETRIED_CODES


# -- what goes back to the warehouse -----------------------------------------------------

#: The columns of a batch's outcome table, as `Warehouse.commit` takes them.
OUTCOME_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        # accepted | rejected | removed (left the model, and Klaviyo was told) | invalid (a
        # reject with no record to remember it by, such as a NULL or duplicated sync key:
        # reported on every run until the data is fixed) | settled (back to the version
        # Klaviyo accepted: an earlier refusal no longer stands) | forgotten (left the model
        # before Klaviyo ever accepted it; nothing to tell Klaviyo; or a row a reconcile
        # found missing from its list, to be sent again)
        ("outcome", pa.string()),
        ("fingerprint", pa.uint64()),
        ("memo", pa.uint64()),  # `MEMO`, with the fingerprint of an accepted record
        # JSON text of the values sent, when accepted; NULL for a journaled record, whose
        # values the journal holds
        ("accepted_values", pa.string()),
        ("klaviyo_id", pa.string()),
        ("in_snapshot", pa.bool_()),
        ("column_name", pa.string()),
        ("field", pa.string()),
        ("code", pa.string()),
        ("reason", pa.string()),
        ("retry", pa.bool_()),  # a refusal that is tried again on every run
    ]
)

#: The columns of a unit's journal rows, as `Warehouse.journal` takes them.
JOURNAL_SCHEMA = pa.schema(
    [
        ("position", pa.int32()),
        ("key", pa.string()),
        ("fingerprint", pa.uint64()),
        ("memo", pa.uint64()),
        ("in_snapshot", pa.bool_()),
        ("klaviyo_id", pa.string()),
        ("accepted_values", pa.string()),
        ("body", pa.string()),
    ]
)


@dataclass(frozen=True)
class JournaledUnit:
    """Records an earlier run sent together and never saw answered, in sending order."""

    unit: str
    job_id: str | None  # the bulk job Klaviyo made of them, if it said so
    records: list[dict[str, Any]]  # the JOURNAL_SCHEMA columns, by position
    age: float  # seconds since they were sent


@dataclass
class RunCounts:
    """The numbers of one model's run, in the order the summary table shows them."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    rejected: int = 0
    failed: int = 0
    requests: int = 0


#: The columns of the run history (`Warehouse.last_runs`) and of a rejects listing.
RUN_COLUMNS = (
    "model",
    "started_at",
    "seconds",
    "status",
    "added",
    "updated",
    "removed",
    "unchanged",
    "rejected",
    "failed",
    "requests",
    "rate_limit_seconds",  # seconds its requests waited for Klaviyo's rate limits
    "error",
)
REJECT_COLUMNS = ("model", "key", "column_name", "field", "code", "reason", "rejected_at")


# -- which sync a run is -----------------------------------------------------------------


def sync_id(spec: SyncSpec, target: str, base_url: str, account_id: str | None) -> str:
    """Identify a sync by what it writes where: a different target, Klaviyo account (by the
    key's account id, and the URL), object, behaviour or list is a different sync with a
    state of its own. Without an account id this is the id earlier versions used."""
    parts = [base_url.rstrip("/"), target, spec.unique_id, spec.object, spec.behavior]
    parts += [spec.list_id or ""] + ([account_id] if account_id else [])
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class SyncIdentity:
    """Which sync a model's run is: its id, and what the id stands for."""

    sid: str
    legacy_sid: str  # the id before syncs knew their account, to adopt an older state
    target: str
    base_url: str
    account_id: str | None

    @classmethod
    def of(cls, spec: SyncSpec, target: str, base_url: str, account_id: str | None) -> SyncIdentity:
        return cls(
            sync_id(spec, target, base_url, account_id),
            sync_id(spec, target, base_url, None),
            target,
            base_url.rstrip("/"),
            account_id,
        )
