"""The warehouse of any target dbt reaches through its adapter (PostgreSQL is tested): the
models and the sync state both live in the user's warehouse, the state in a schema of its
own (`klaviyo_sync` by default, the var `klaviyo_sync_schema`), and the diff runs there, so
that only the changed rows travel.

Every statement comes from the dbt package's dispatched macros (macros/warehouse/), rendered
through dbt's adapter: an engine that needs other SQL for a job overrides that job's macro.
This module runs them on the adapter's connection (a DB-API connection), commits after each
write (a dry run commits nothing and rolls everything back), and turns the change rows into
Arrow batches. One sync at a time per sync id: the sync holds a lock in the warehouse (on
PostgreSQL an advisory lock, elsewhere a lease row: the package's sync_lock), given back when
the warehouse closes.

psycopg2 gets its fast paths (execute_values, a WITH HOLD server-side cursor); any other
DB-API driver gets executemany and fetchmany on an ordinary cursor.
"""

from __future__ import annotations

import csv
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dbt_klaviyo_sync.changeset import (
    FINGERPRINT,
    JOURNAL_SCHEMA,
    JSON_TEXT,
    KEY,
    REJECT_COLUMNS,
    RUN_COLUMNS,
    SENT,
    ChangeCounts,
    JournaledUnit,
    KeyProblems,
    RunCounts,
    SyncIdentity,
    field_column,
    field_kind,
)
from dbt_klaviyo_sync.errors import NeverSynced, StateError
from dbt_klaviyo_sync.spec import SyncSpec
from dbt_klaviyo_sync.warehouse import ReasonGroup, reason_groups, reason_groups_sql
from dbt_klaviyo_sync.warehouse.checks import mapped_columns, not_built, unreadable

#: The state's schema version in the warehouse (the meta table). Later versions migrate.
SCHEMA_VERSION = 2
#: The `state_sql` job that brings the state from version N-1 to N. Append; never edit.
_MIGRATIONS = {2: "add_rate_limit_seconds"}
#: How many change rows travel from the warehouse to Python at a time: a batch is shaped
#: while units of 10,000 profiles are in flight, so a small one keeps the peak down.
READ_BATCH_ROWS = 2_000
#: Types whose values are JSON documents, sent parsed where Klaviyo takes JSON or a number.
_JSON_TYPES = frozenset({"json", "jsonb", "variant", "object", "super"})
_TWO_64 = 2**64


def _kept(table: pa.Table) -> pa.Table:
    """A journal or outcome table without its `memo`: the diff in the warehouse computes
    every fingerprint itself (its SQL has no hash that stays the same across engines and
    releases), so it keeps no memo of them."""
    return table.drop_columns(["memo"]) if "memo" in table.column_names else table


def _driver_rows(table: pa.Table) -> list[tuple[Any, ...]]:
    """A table's rows as the driver takes them, converted a column at a time (a Python
    step per value costs more than the insert): fingerprints as the warehouse's signed
    64-bit integers, their bits unchanged."""
    columns = [
        pc.cast(column, pa.int64(), safe=False) if name == "fingerprint" else column
        for name, column in zip(table.column_names, table.columns, strict=True)
    ]
    return list(zip(*(column.to_pylist() for column in columns), strict=True))


def _unsigned(fingerprint: int | None) -> int | None:
    """A fingerprint as `changeset` carries it: unsigned 64 bits."""
    return None if fingerprint is None else fingerprint % _TWO_64


class AdapterWarehouse:
    """The `Warehouse` of a target reached through dbt's adapter."""

    commit_records = 10_000  # a commit is a keyed merge: its cost follows its rows
    values_until_commit = False  # the client's memory comes first (300 MB at 10M rows)
    shaped_ahead = 0  # the server, not the client's CPU, bounds a first sync

    def __init__(self, adapter: Any, *, dry_run: bool) -> None:
        self._adapter = adapter
        self._dry_run = dry_run
        self._lock = threading.RLock()  # one connection, shared with the sending threads
        self._db = adapter.connections.get_thread_connection().handle
        self._json_columns: list[int] = []  # the changes' f-columns that hold JSON text
        self._holder = uuid.uuid4().hex  # whose the sync locks taken here are
        self._locks: list[list[str]] = []  # the statements that release them
        self._diffed = ""  # the sync id of the last diff, whose change rows `changes` reads
        self.schema = str(self._macro("state_schema"))
        self.fingerprints = str(self._macro("fingerprint_version"))
        self._set_up()

    # -- rendering and running SQL ---------------------------------------------------

    def _macro(self, macro: str, /, **kwargs: Any) -> Any:
        return self._adapter.execute_macro(macro, project="klaviyo_sync", kwargs=kwargs)

    def _sql(self, name: str, **values: Any) -> str:
        return str(self._macro("state_sql", name=name, schema=self.schema, a=values))

    def _run(self, *statements: str, commit: bool = True) -> None:
        with self._lock:
            try:
                with self._db.cursor() as cursor:
                    for statement in statements:
                        cursor.execute(statement)
            except Exception as exc:
                self._db.rollback()
                raise self._failed(exc) from exc
            if commit and not self._dry_run:
                self._db.commit()

    def _commit(self) -> None:
        if not self._dry_run:
            with self._lock:
                self._db.commit()

    def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                with self._db.cursor() as cursor:
                    cursor.execute(sql)
                    return list(cursor.fetchall())
            except Exception as exc:
                self._db.rollback()
                raise self._failed(exc) from exc

    def _value(self, sql: str) -> Any:
        rows = self._rows(sql)
        return rows[0][0] if rows else None

    def _psycopg2(self) -> bool:
        return type(self._db).__module__.startswith("psycopg2")

    def _insert(self, table: str, columns: list[str], rows: list[tuple[Any, ...]]) -> None:
        """Many rows into a table: in one statement with psycopg2 (execute_values), with the
        driver's executemany otherwise (Snowflake's makes one multi-row insert of it)."""
        if not rows:
            return
        sql = f"insert into {table} ({', '.join(columns)}) values "
        with self._db.cursor() as cursor:
            if self._psycopg2():
                from psycopg2.extras import execute_values

                execute_values(cursor, sql + "%s", rows, None, 1000)
            else:
                cursor.executemany(sql + _marks(self._db, len(rows[0])), rows)

    def _failed(self, error: Exception) -> StateError:
        return StateError(
            f"the {self._adapter.type()} warehouse refused a statement of the sync, on the "
            f"models or on the sync state in schema {self.schema} ({type(error).__name__}: "
            f"{str(error).strip()}). Nothing of this step was recorded; what was not recorded "
            "is sent again next run."
        )

    def _set_up(self) -> None:
        """Create the state's schema and tables when they are not there (a dry run's are
        rolled back with the rest of it)."""
        self._run(*self._macro("state_tables", schema=self.schema))
        version = self._value(self._sql("schema_version"))
        if version is None:
            self._run(*self._sql("set_schema_version", version=str(SCHEMA_VERSION)).split("; "))
        elif int(version) > SCHEMA_VERSION:
            raise StateError(
                f"the sync state in schema {self.schema} has version {version}, newer than "
                f"this dbt-klaviyo-sync understands ({SCHEMA_VERSION}); upgrade it."
            )
        else:
            for step in range(int(version) + 1, SCHEMA_VERSION + 1):
                self._run(
                    self._sql(_MIGRATIONS[step]),
                    *self._sql("set_schema_version", version=str(step)).split("; "),
                )

    def close(self) -> None:
        """A dry run keeps nothing; a real run has committed as it went. The sync locks
        taken are given back."""
        with self._lock:
            self._db.rollback()
        for release in self._locks:
            self._run(*release)
        self._locks.clear()

    # -- the models ------------------------------------------------------------------

    def _columns(self, spec: SyncSpec) -> dict[str, tuple[str, str]]:
        unreadable(spec)
        relation = self._adapter.Relation.create(
            database=spec.database, schema=spec.schema, identifier=spec.identifier
        )
        with self._lock:
            found = self._adapter.get_columns_in_relation(relation)
        if not found:
            raise not_built(spec)
        return {c.name.lower(): (c.name, str(c.dtype)) for c in found}

    def readable(self, spec: SyncSpec) -> None:
        self._columns(spec)

    def describe(self, spec: SyncSpec) -> None:
        mapped_columns(spec, self._columns(spec))

    def key_problems(self, spec: SyncSpec) -> KeyProblems:
        key_column = mapped_columns(spec, self._columns(spec))[0][0]
        statements = self._macro(
            "key_problems",
            relation=spec.relation,
            key_text=self._macro("as_text", expression=self._adapter.quote(key_column)),
            key_field=spec.key_field,
        )
        [(nulls, duplicated)] = self._rows(statements["counts"])
        examples = tuple(str(key) for (key,) in self._rows(statements["examples"]))
        return KeyProblems(int(nulls), int(duplicated), examples)

    # -- which sync ------------------------------------------------------------------

    def has_syncs(self) -> bool:
        return bool(self._value(self._sql("has_syncs")))

    def accounts(self, spec: SyncSpec, target: str, base_url: str) -> dict[str, str | None]:
        rows = self._rows(
            self._sql(
                "accounts",
                unique_id=spec.unique_id,
                object=spec.object,
                behavior=spec.behavior,
                list_id=spec.list_id or "",
                target=target,
                base_url=base_url.rstrip("/"),
            )
        )
        return {str(sid): account for sid, account in rows}

    def resolved(self, sync: SyncIdentity, spec: SyncSpec) -> str:
        if sync.account_id is not None:
            return sync.sid
        known = self.accounts(spec, sync.target, sync.base_url)
        return next(iter(known)) if len(known) == 1 else sync.sid

    def register(self, sync: SyncIdentity, spec: SyncSpec) -> None:
        """Record the sync, and take its lock: one run at a time per sync id."""
        lock = self._macro("sync_lock", schema=self.schema, sid=sync.sid, holder=self._holder)
        *take, held = lock["take"]
        self._run(*take)
        if not self._value(held):
            raise StateError(
                f"model '{spec.model}' is being synced by another dbt-klaviyo run (it holds "
                f"the sync's lock in the warehouse); wait for it to finish. Two syncs of one "
                "model never run at once."
            )
        self._locks.append(lock["release"])
        self._run(
            self._sql(
                "register",
                sid=sync.sid,
                model=spec.model,
                unique_id=spec.unique_id,
                object=spec.object,
                behavior=spec.behavior,
                list_id=spec.list_id,
                target=sync.target,
                base_url=sync.base_url,
                account_id=sync.account_id,
                fingerprint_version=self.fingerprints,
            )
        )

    def rebase(self, spec: SyncSpec, sid: str) -> int | None:
        """Nothing to carry over yet: this is the first version to keep state here."""
        return None

    def forget(self, sid: str, *, keep_accepted: bool) -> None:
        self._run(self._sql("forget", sid=sid, keep_accepted=keep_accepted))

    # -- a run's record --------------------------------------------------------------

    def start_run(self, sid: str, model: str, *, full_refresh: bool) -> str:
        import uuid

        run_id = uuid.uuid4().hex
        self._run(
            self._sql("start_run", run_id=run_id, sid=sid, model=model, full_refresh=full_refresh)
        )
        return run_id

    def finish_run(
        self,
        run_id: str,
        counts: RunCounts,
        status: str,
        error: str | None = None,
        *,
        rate_limit_seconds: float = 0.0,
    ) -> None:
        self._run(
            self._sql(
                "finish_run",
                run_id=run_id,
                status=status,
                error=error,
                rate_limit_seconds=round(rate_limit_seconds, 3),
                **{name: getattr(counts, name) for name in vars(counts)},
            )
        )

    # -- the journal -----------------------------------------------------------------

    def journal(self, sid: str, unit: str, rows: pa.Table) -> None:
        import datetime as dt

        now = dt.datetime.now(dt.UTC)
        kept = _kept(rows.select(JOURNAL_SCHEMA.names))
        values = [(sid, unit, *row, now) for row in _driver_rows(kept)]
        columns = ["sync_id", "unit", *kept.column_names, "journaled_at"]
        with self._lock:
            try:
                self._insert(f"{self.schema}.journal", columns, values)
            except Exception as exc:
                self._db.rollback()
                raise self._failed(exc) from exc
            if not self._dry_run:
                self._db.commit()

    def job_recorder(self, sid: str) -> JobRecorder:
        return JobRecorder(self, sid)

    def record_job(self, sid: str, unit: str, job_id: str) -> None:
        self._run(self._sql("record_job", sid=sid, unit=unit, job_id=job_id))

    def journaled_units(self, sid: str) -> list[JournaledUnit]:
        units: dict[str, JournaledUnit] = {}
        for (
            unit,
            job_id,
            position,
            key,
            fingerprint,
            in_snapshot,
            klaviyo_id,
            values,
            age,
        ) in self._rows(self._sql("journaled", sid=sid)):
            found = units.setdefault(unit, JournaledUnit(unit, job_id, [], float(age)))
            found.records.append(
                {
                    "position": position,
                    "key": key,
                    "fingerprint": _unsigned(fingerprint),
                    "in_snapshot": in_snapshot,
                    "klaviyo_id": klaviyo_id,
                    "accepted_values": values,
                }
            )
        return list(units.values())

    def drop_journal(self, sid: str, units: list[str]) -> None:
        if units:
            self._run(*self._sql("drop_journal", sid=sid, units=units).split("; "))

    # -- the diff --------------------------------------------------------------------

    def diff(self, spec: SyncSpec, sid: str, held: list[str]) -> ChangeCounts:
        columns = mapped_columns(spec, self._columns(spec))
        quote = self._adapter.quote
        values, texts, self._json_columns = [], [], []
        for index, ((name, dtype), mapping) in enumerate(
            zip(columns[1:], spec.fields[1:], strict=True), start=1
        ):
            as_json = dtype.lower() in _JSON_TYPES and field_kind(mapping.field) != "text"
            text = self._macro("as_text", expression=quote(name))
            values.append(text if as_json or field_kind(mapping.field) == "text" else quote(name))
            texts.append(self._macro("as_text", expression=f"f{index}"))
            if as_json:
                self._json_columns.append(index)
        statements = self._macro(
            "change_set",
            schema=self.schema,
            relation=spec.relation,
            key_text=self._macro("as_text", expression=quote(columns[0][0])),
            key_field=spec.key_field,
            values=values,
            texts=texts,
            signature=spec.signature,
            sid=sid,
            once=spec.once,
            events=spec.object == "event",
        )
        self._run(statements["drop"], statements["create"], *statements["analyze"], commit=False)
        held_rows = 0
        if held:
            held_rows = int(self._value(self._sql("held", sid=sid, units=held)) or 0)
            self._run(self._sql("hold", sid=sid, units=held), commit=False)
        counts = dict(self._rows(statements["counts"]))
        if counts.get("add") or counts.get("update"):
            self._run(statements["duplicates"], commit=False)
            counts = dict(self._rows(statements["counts"]))
        self._commit()  # the temporary table stays for the session
        self._diffed = sid
        return ChangeCounts(
            add=int(counts.get("add", 0)),
            update=int(counts.get("update", 0)),
            remove=int(counts.get("remove", 0)),
            invalid=int(counts.get("invalid", 0)),
            model_rows=int(self._value(statements["rows"]) or 0),
            held=held_rows,
        )

    def model_keys(self, spec: SyncSpec) -> set[str]:
        columns = mapped_columns(spec, self._columns(spec))
        text = self._macro("as_text", expression=self._adapter.quote(columns[0][0]))
        key = self._macro("sync_key", text=text, key_field=spec.key_field)
        rows = self._rows(
            f"select distinct k from (select {key} as k from {spec.relation}) as m "
            "where k is not null"
        )
        return {str(k) for (k,) in rows}

    def changes(self, kinds: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
        """The change rows, a batch at a time: with psycopg2 from a server-side cursor that
        outlives the commits made while they are sent (WITH HOLD); other drivers keep a
        query's result apart from the statements run after it (Snowflake's in result
        chunks), so an ordinary cursor does."""
        with self._lock:
            if self._psycopg2():
                cursor = self._db.cursor(name="klaviyo_changes_rows", withhold=True)
            else:
                cursor = self._db.cursor()
            cursor.execute(self._sql("changes", sid=self._diffed, kinds=list(kinds)))
        try:
            while True:
                with self._lock:
                    rows = cursor.fetchmany(READ_BATCH_ROWS)
                    # Snowflake names unquoted columns in capitals; ours are all lower case
                    names = [d[0].lower() for d in cursor.description or []]
                if not rows:
                    return
                batch = self._batch(names, rows)
                del rows  # the driver's tuples, as big as the batch: not kept while it is used
                yield batch
        finally:
            with self._lock:
                cursor.close()

    def _batch(self, names: list[str], rows: list[tuple[Any, ...]]) -> pa.RecordBatch:
        """The rows as the change batch of changeset.py. The columns the warehouse does not
        send are made here: f0 is the key itself, and __sent is empty but for events."""
        arrays = []
        for at, name in enumerate(names):
            values = [row[at] for row in rows]
            if name == FINGERPRINT:
                arrays.append(pa.array([_unsigned(v) for v in values], pa.uint64()))
            elif name.startswith("f") and int(name[1:]) in self._json_columns:
                texts = pa.array(values, pa.string())
                arrays.append(
                    pa.StructArray.from_arrays([texts], [JSON_TEXT], mask=pc.is_null(texts))
                )
            else:
                arrays.append(pa.array([_plain(v) for v in values]))
        arrays.append(arrays[names.index(KEY)])
        names = [*names, field_column(0)]
        if SENT not in names:
            arrays.append(pa.nulls(len(rows), pa.string()))
            names.append(SENT)
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def standing_rejects(self, sid: str) -> int:
        return int(self._value(self._sql("standing_rejects", sid=sid)) or 0)

    def accepted_count(self, sid: str) -> int:
        return int(self._value(self._sql("accepted_count", sid=sid)) or 0)

    def accepted_values(self, sid: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        import orjson

        if not keys:
            return {}
        rows = self._rows(self._sql("accepted_values", sid=sid, keys=keys))
        return {key: orjson.loads(values) if values else {} for key, values in rows}

    # -- the answers -----------------------------------------------------------------

    def commit(self, sid: str, run_id: str, model: str, outcomes: pa.Table) -> None:
        if outcomes.num_rows == 0:
            return
        statements = self._macro(
            "commit_outcomes", schema=self.schema, sid=sid, run_id=run_id, model=model
        )
        outcomes = _kept(outcomes)
        names = outcomes.column_names
        rows = _driver_rows(outcomes)
        with self._lock:
            try:
                with self._db.cursor() as cursor:
                    cursor.execute(statements["table"])
                    cursor.execute(statements["clear"])
                self._insert(statements["name"], names, rows)
                with self._db.cursor() as cursor:
                    for statement in statements["steps"]:
                        cursor.execute(statement)
            except Exception as exc:
                self._db.rollback()
                raise self._failed(exc) from exc
            if not self._dry_run:
                self._db.commit()

    def forget_removed(self, sid: str) -> None:
        self._run(self._sql("forget_removed", sid=sid))

    def idle(self) -> None:
        """Nothing to do: the server checkpoints on its own, outside the sync's commits."""

    # -- the history -----------------------------------------------------------------

    def last_runs(self, model: str | None, runs: int) -> list[dict[str, Any]]:
        if model is not None:
            self._require_synced(model)
        rows = self._rows(self._sql("last_runs", model=model, runs=runs))
        # Seconds come back as decimals, which JSON and the charts take as floats.
        plain = [[float(v) if isinstance(v, Decimal) else v for v in row] for row in rows]
        return [dict(zip(RUN_COLUMNS, row, strict=True)) for row in plain]

    def rejects(self, model: str, every: bool = False) -> AdapterRejects:
        self._require_synced(model)
        return AdapterRejects(self, self._sql("rejects", model=model, every=every))

    def _require_synced(self, model: str) -> None:
        if not self._value(self._sql("known_model", model=model)):
            synced = [name for (name,) in self._rows(self._sql("synced_models"))]
            raise NeverSynced(model, synced)


def _marks(connection: Any, count: int) -> str:
    """A row's parameter marks in the DB-API paramstyle of the connection's driver (qmark,
    numeric, or format and pyformat's %s)."""
    module, style = type(connection).__module__, "format"
    while module and not isinstance(getattr(sys.modules.get(module), "paramstyle", None), str):
        module = module.rpartition(".")[0]
    if module:
        style = sys.modules[module].paramstyle
    marks = {
        "qmark": ["?"] * count,
        "numeric": [f":{at}" for at in range(1, count + 1)],
    }.get(style, ["%s"] * count)
    return f"({', '.join(marks)})"


def _plain(value: Any) -> Any:
    """A value the driver gave, as Arrow takes it (bytes for a memoryview)."""
    return bytes(value) if isinstance(value, memoryview) else value


class JobRecorder:
    """Records bulk job ids from the sending threads, through the shared connection."""

    def __init__(self, warehouse: AdapterWarehouse, sid: str) -> None:
        self._warehouse = warehouse
        self._sid = sid

    def __call__(self, unit: str, job_id: str) -> None:
        self._warehouse.record_job(self._sid, unit, job_id)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class AdapterRejects:
    """A model's rejects, as a query to count, page through or export."""

    warehouse: AdapterWarehouse
    sql: str

    def count(self) -> int:
        return int(self.warehouse._value(f"select count(*) from ({self.sql}) as r") or 0)

    def first(self, limit: int) -> list[tuple[Any, ...]]:
        return self.warehouse._rows(f"select * from ({self.sql}) as r limit {int(limit)}")

    def by_reason(self, examples: int) -> list[ReasonGroup]:
        return reason_groups(self.warehouse._rows(reason_groups_sql(self.sql, examples)))

    def export_csv(self, path: Path) -> None:
        with path.open("w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)
            writer.writerow(REJECT_COLUMNS)
            writer.writerows(self.first(10**12))
