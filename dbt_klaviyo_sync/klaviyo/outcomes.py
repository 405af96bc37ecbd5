"""What every sender shares: units of prepared records, Klaviyo's answers, and how to tell
an answer about a record from an answer about the whole request.

A record is rejected only when Klaviyo's answer points at it. A refusal of the request as
a whole (no pointer to a record, a missing list, a gateway's 4xx) says nothing about the
records in it: they are failed, sent again next run, and the refusal is reported, so that
repeated ones stop the model with Klaviyo's reason instead of marking good rows rejected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, overload

import pyarrow as pa
import pyarrow.compute as pc

from dbt_klaviyo_sync.changeset import JOURNAL_SCHEMA, SEND_TIME_FIELDS, Record, Reject
from dbt_klaviyo_sync.errors import TransientApiError
from dbt_klaviyo_sync.klaviyo.client import ApiError, KlaviyoClient, KlaviyoRejected, dig
from dbt_klaviyo_sync.payloads import shaped_records

#: Klaviyo refusing this many requests in a row as a whole (for no record) stops the model:
#: something about the requests themselves is wrong, and sending the rest would not help.
MAX_REFUSALS_IN_A_ROW = 3


@dataclass(frozen=True)
class Prepared:
    """A record and its serialized request part (empty when the request needs none)."""

    record: Record
    body: bytes = b""

    def journal_body(self) -> str | None:
        """What must be sent again exactly if the answer is lost (None: the record may be
        shaped afresh from its row)."""
        return None

    def forget_values(self, *, keep_json: bool = False) -> None:
        """Once its unit is in the journal, which holds its values for the commit, the
        record keeps only what sending reads (`SEND_TIME_FIELDS`, and its NULLs). Units in
        flight are most of a sync's memory, and values over half of that. The values are
        dropped in place, as copying the item and its record cost three times as much, and
        the generators that built the unit still hold its items: they are this item's own
        (`payloads` makes a dict per record) and nothing reads them once journaled. A record
        shaped in Arrow holds only those fields already, and drops its values' JSON unless
        `keep_json` (`Warehouse.values_until_commit`): kept, they took 60 MB more at the
        peak of a PostgreSQL sync of 200,000 profiles."""
        if self.record.values_json:
            if not keep_json:
                self.record.values_json = None
            return
        values = self.record.values
        for name in [n for n, v in values.items() if v is not None and n not in SEND_TIME_FIELDS]:
            del values[name]


class Block(Sequence[Prepared]):
    """Profiles shaped a column at a time (`payloads.shaped_rows`), sent as one bulk job
    without a Python object per row: journaled, joined into the job's body and committed
    from their Arrow columns. Only an answer about some of them (an import error, a job
    refused or lost) makes their `Prepared` items, once, from the table."""

    def __init__(self, rows: pa.Table) -> None:
        self.rows = rows
        self._items: list[Prepared] | None = None

    def __len__(self) -> int:
        return int(self.rows.num_rows)

    @overload
    def __getitem__(self, index: int) -> Prepared: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Prepared]: ...

    def __getitem__(self, index: int | slice) -> Prepared | Sequence[Prepared]:
        return self.items()[index]

    def __iter__(self) -> Iterator[Prepared]:
        return iter(self.items())

    def items(self) -> list[Prepared]:
        """The rows as `Prepared` items, made once when first asked for."""
        if self._items is None:
            records, bodies = shaped_records(self.rows)
            self._items = list(map(Prepared, records, bodies))
        return self._items

    @property
    def records(self) -> BlockRecords:
        return BlockRecords(self)

    def joined(self, other: Block) -> Block:
        return Block(pa.concat_tables([self.rows, other.rows]))

    def split(self, at: int) -> tuple[Block, Block]:
        """The first `at` rows, and the others."""
        return Block(self.rows.slice(0, at)), Block(self.rows.slice(at))

    def body_sizes(self) -> pa.Array:
        return pc.binary_length(self.rows.column("body"))

    def bodies(self, head: bytes = b"", tail: bytes = b"") -> bytes:
        """The profiles' JSON, comma-separated, between `head` and `tail`: a job's body,
        copied once out of Arrow (as text, it was decoded and encoded again: a third of
        what sending a job cost the client)."""
        bodies = self.rows.column("body").cast(pa.binary()).combine_chunks()
        joined = pa.ListArray.from_arrays(pa.array([0, len(bodies)], pa.int32()), bodies)
        return b"".join((head, pc.binary_join(joined, b",")[0].as_buffer(), tail))

    def journal_rows(self, *, values: bool) -> pa.Table:
        """The rows as the journal keeps them (`JOURNAL_SCHEMA`), with their values' JSON
        or without. Without, a run that follows the job after a crash records the rows as
        accepted (their fingerprints) and their values as unknown: nothing is sent again,
        and only a plan's old values of those rows are missing until they next change."""
        t = self.rows
        unknown = pa.nulls(t.num_rows, pa.string())
        columns = {
            "position": pa.array(range(t.num_rows), pa.int32()),
            **{c: t.column(c) for c in ("key", "fingerprint", "memo", "in_snapshot", "klaviyo_id")},
            "accepted_values": t.column("values_json") if values else unknown,
            "body": unknown,
        }
        return pa.table(columns).cast(JOURNAL_SCHEMA)

    def forget_values(self, *, keep_json: bool) -> None:
        """As `Prepared.forget_values`: the values' JSON goes once the journal has it,
        unless `keep_json`."""
        if not keep_json:
            values = self.rows.schema.get_field_index("values_json")
            nulls = pa.nulls(self.rows.num_rows, pa.string())
            self.rows = self.rows.set_column(values, "values_json", nulls)
            for item in self._items or ():
                item.forget_values()

    def accepted_rows(self) -> pa.Table:
        """The rows as accepted outcomes: key, fingerprint, memo, the values' JSON (NULL
        once forgotten: the journal has it), Klaviyo id and whether they were known."""
        t = self.rows
        return pa.table(
            {
                "key": t.column("key"),
                "outcome": pa.repeat("accepted", t.num_rows),
                **{c: t.column(c) for c in ("fingerprint", "memo")},
                "accepted_values": t.column("values_json"),
                **{c: t.column(c) for c in ("klaviyo_id", "in_snapshot")},
            }
        )

    def updates(self) -> int:
        """How many of the rows Klaviyo held before (`update`, not `add`)."""
        return int(pc.sum(pc.equal(self.rows.column("change"), "update")).as_py() or 0)


class BlockRecords(Sequence[Record]):
    """A block's records, made only when one is read: a job answered without import
    errors accepts the block whole (`Outcome.accepting`)."""

    def __init__(self, block: Block) -> None:
        self.block = block

    def __len__(self) -> int:
        return len(self.block)

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Record]: ...

    def __getitem__(self, index: int | slice) -> Record | Sequence[Record]:
        if isinstance(index, slice):
            return [item.record for item in self.block.items()[index]]
        return self.block.items()[index].record

    def __iter__(self) -> Iterator[Record]:
        return (item.record for item in self.block.items())


def _no_job(job_id: str) -> None:
    """A unit sent without a journal has no bulk job to record."""


@dataclass
class Unit:
    """Records sent together, in one request or one bulk job, and committed together.
    `job_created` records a bulk job's id the moment Klaviyo names it, so that a re-run
    follows the job instead of sending its records again."""

    id: str
    items: Sequence[Prepared]  # a list, or a `Block`
    job_created: Callable[[str], None] = _no_job

    @property
    def records(self) -> list[Record]:
        return list(records_of(self.items))


def records_of(items: Sequence[Prepared]) -> Sequence[Record]:
    """The items' records; a block's only when one is read."""
    return items.records if isinstance(items, Block) else [item.record for item in items]


def each(items: Iterable[Prepared | Block]) -> Iterator[Prepared]:
    """The items one by one, a block's rows as `Prepared` items."""
    for item in items:
        if isinstance(item, Block):
            yield from item
        else:
            yield item


@dataclass
class Outcome:
    """Klaviyo's answer for a group of records."""

    accepted: list[tuple[Record, str | None]] = field(default_factory=list)  # with Klaviyo id
    rejected: list[Reject] = field(default_factory=list)
    failed: list[tuple[Record, str]] = field(default_factory=list)  # with the passing reason
    removed: list[Record] = field(default_factory=list)  # no longer in Klaviyo's list
    # Klaviyo already is as the record wants (a profile to delete that no profile holds):
    # done like an accepted record, but nothing was changed
    already: list[Record] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)  # requests refused as a whole
    blocks: list[Block] = field(default_factory=list)  # accepted whole, without Klaviyo ids

    def merge(self, other: Outcome) -> Outcome:
        self.accepted += other.accepted
        self.blocks += other.blocks
        self.already += other.already
        self.rejected += other.rejected
        self.failed += other.failed
        self.removed += other.removed
        self.refusals += other.refusals
        return self

    @property
    def answered(self) -> bool:
        """Whether Klaviyo said anything about a record (so requests are getting through)."""
        return bool(self.accepted or self.blocks or self.rejected or self.removed or self.already)

    @property
    def accepted_count(self) -> int:
        return len(self.accepted) + sum(map(len, self.blocks))

    @property
    def to_commit(self) -> int:
        """How many records a commit of it writes down: accepted, refused, removed or
        found already done (failed ones wait for the next run)."""
        return self.accepted_count + len(self.rejected) + len(self.removed) + len(self.already)

    def hold_back(self, rows: int) -> Outcome:
        """Take the last `rows` rows of its blocks out, as an outcome of their own to be
        committed later; nothing when its blocks hold fewer."""
        held: list[Block] = []
        if sum(map(len, self.blocks)) < rows:
            return Outcome()
        while rows:
            last = self.blocks.pop()
            if len(last) > rows:
                last, tail = last.split(len(last) - rows)
                self.blocks.append(last)
                last = tail
            held.insert(0, last)
            rows -= len(last)
        return Outcome(blocks=held)

    @classmethod
    def accepting(cls, records: Sequence[Record], ids: dict[str, str]) -> Outcome:
        """Every record accepted, with its Klaviyo id if known; a block's, whole."""
        if isinstance(records, BlockRecords) and not ids:
            return cls(blocks=[records.block])
        return cls(accepted=[(r, ids.get(r.key)) for r in records])

    @classmethod
    def refused(cls, records: Iterable[Record], refusal: KlaviyoRejected) -> Outcome:
        """A request Klaviyo refused as a whole: its records failed, for the next run."""
        reason = f"Klaviyo refused the whole request, not this record: {refusal}"
        return cls(failed=[(r, reason) for r in records], refusals=[str(refusal)])

    @classmethod
    def unanswered(
        cls, records: Iterable[Record], exc: KlaviyoRejected | TransientApiError, what: str
    ) -> Outcome:
        """A request the records needed came to nothing: refused as a whole (`refused`), or
        no answer; either way they are failed, for the next run, saying `what` failed."""
        if isinstance(exc, KlaviyoRejected):
            return cls.refused(records, exc)
        return cls(failed=[(r, f"{what}: {exc}") for r in records])


class Sender(Protocol):
    """One sync behaviour's way of turning records into requests."""

    @property
    def journaled(self) -> bool:
        """Whether its units are written to the journal before they are sent: those that
        must go again exactly as they went (events), or become bulk jobs to follow up."""

    def prepare(self, records: list[Record]) -> tuple[list[Prepared], list[Reject]]:
        """Shape each record for its request; refuse, with the reason, what Klaviyo would."""

    def units(self, prepared: Iterable[Prepared]) -> Iterator[Sequence[Prepared]]:
        """Group records into what one worker sends and one commit records."""

    def send(self, unit: Unit) -> Outcome:
        """Send a unit; every record ends accepted, rejected, failed or removed."""


def chunks(items: Iterable[Prepared], size: int) -> Iterator[list[Prepared]]:
    chunk: list[Prepared] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def grouped(
    items: Iterable[Prepared],
    group: Callable[[Prepared], Hashable],
    size: Callable[[Hashable], int],
) -> Iterator[list[Prepared]]:
    """Chunks of items of one group each (one kind of request), at most `size(group)`
    long: a chunk goes as soon as it is full, the partial ones at the end."""
    filling: dict[Hashable, list[Prepared]] = {}
    for item in items:
        key = group(item)
        chunk = filling.setdefault(key, [])
        chunk.append(item)
        if len(chunk) == size(key):
            yield filling.pop(key)
    yield from filling.values()


def wait_for_job(client: KlaviyoClient, operation: str, job_id: str, seconds: float) -> str | None:
    """Poll a bulk job with `operation` until it ends (its status then); None when
    `seconds` pass first."""
    deadline = time.monotonic() + seconds
    interval = 0.2
    while True:
        job = client.call(operation, path_params=(job_id,))
        status = str(dig(job, "data", "attributes", "status", operation=operation))
        if status in ("complete", "cancelled"):
            return status
        if time.monotonic() + interval > deadline:
            return None
        client.sleep(interval)
        interval = min(interval * 1.5, 5.0)


#: Where a single-record request's body holds the record's own data: an error pointing
#: there is about the record.
_RECORD_POINTERS = ("/data/attributes", "/data/id", "/data/meta")


def about_the_record(refusal: KlaviyoRejected) -> ApiError | None:
    """For a request that carries one record: the error that is about that record, if any
    (a pointer into its data, or an identifier conflict), else None: the request itself
    was refused (a bad revision, a missing list, a proxy's 4xx)."""
    for error in refusal.errors:
        if error.code == "duplicate_profile" or error.meta.get("duplicate_profile_id"):
            return error
        if (error.pointer or "").startswith(_RECORD_POINTERS):
            return error
    return None


def send_each(items: Sequence[Prepared], send_one: Callable[[Prepared], Outcome]) -> Outcome:
    """Send records one request each, until Klaviyo refuses MAX_REFUSALS_IN_A_ROW requests
    in a row as a whole: the records not tried then are failed, for the next run."""
    outcome = Outcome()
    in_a_row = 0
    for at, item in enumerate(items):
        if in_a_row >= MAX_REFUSALS_IN_A_ROW:
            reason = "not sent: Klaviyo refused the requests before it as a whole"
            return outcome.merge(Outcome(failed=[(p.record, reason) for p in items[at:]]))
        answer = send_one(item)
        in_a_row = 0 if answer.answered else in_a_row + len(answer.refusals)
        outcome.merge(answer)
    return outcome


def send_isolating(
    items: Sequence[Prepared],
    attempt: Callable[[Sequence[Prepared]], Outcome],
    locate: Callable[[Sequence[Prepared], ApiError], int | None],
    reject: Callable[[Record, ApiError], Reject],
) -> Outcome:
    """Send records with `attempt`, which raises KlaviyoRejected when Klaviyo refuses the
    whole request (so nothing in it was taken). Reject the records the errors point at and
    send the rest again; one bad row never sinks its neighbours. When the errors point at no
    record, the refusal is the request's: every record left is failed, and the refusal
    reported. A loop, not recursion: Klaviyo may name one bad record per answer."""
    outcome = Outcome()
    part = items
    while part:
        try:
            return outcome.merge(attempt(part))
        except KlaviyoRejected as refusal:
            named = {
                index: error
                for error in refusal.errors
                if (index := locate(part, error)) is not None and index < len(part)
            }
            if not named:
                return outcome.merge(Outcome.refused([p.record for p in part], refusal))
            outcome.rejected += [reject(part[i].record, e) for i, e in named.items()]
            part = [p for i, p in enumerate(part) if i not in named]
    return outcome
