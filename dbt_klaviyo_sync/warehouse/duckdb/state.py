"""The sync state: a DuckDB file of its own, versioned, committed one batch at a time.

It lives apart from the dbt database because dbt-duckdb locks that file while dbt runs, and
outside `target/` so that `dbt clean` does not make us re-send everything. One DuckDB
connection holds both: the state file attached read-write as `klaviyo_sync_state`, and the
warehouse files attached read-only under the catalog names dbt gave them, so the diff is a
single SQL join. All SQL that writes state lives in this module.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from dbt_klaviyo_sync.changeset import JournaledUnit, RunCounts, SyncIdentity
from dbt_klaviyo_sync.errors import StateError
from dbt_klaviyo_sync.spec import SyncSpec

CATALOG = "klaviyo_sync_state"

# DuckDB would take up to 80% of the machine's memory. A sync keeps to a budget and spills
# to disk beyond it: the diff's join gets the most; while changed rows stream out to be
# sent, DuckDB needs little, and the requests in flight need the room.
#: The whole process's peak aimed at during the diff, unless DBT_KLAVIYO_MEMORY_LIMIT sets
#: DuckDB's share itself: DuckDB gets what Python does not hold already (dbt, when a run
#: had to load it, is 150-200 MB), less a margin for the sending that starts as it ends.
PROCESS_MEMORY_MB = 1000
PYTHON_MARGIN_MB = 128
LEAST_DIFF_MEMORY_MB = 512
#: DuckDB's budget while sending: it buffers the journal's and the snapshot's new rows until
#: they reach the file (see `WAL_CHECKPOINT`). 256 MB syncs 1M profiles as fast as 384 MB
#: did, with 120 MB less at the peak.
SEND_MEMORY_LIMIT = "256MB"
#: DuckDB's threads while sending. Its work then is a few statements of a job's rows at a
#: time, and a first sync's rows read and fingerprinted as they go (on the shaping thread,
#: beside the sending): a second DuckDB thread split that work at a cost, 1-2 CPU-s more
#: in a first sync of 1M profiles on one core, for nothing the sending waits on.
SEND_THREADS = 1
#: How much write-ahead log DuckDB keeps before it checkpoints it into the state file (its
#: default is 16 MB). A sync's journal rows are written and deleted again within seconds,
#: a few MB per bulk job: checkpointing every few jobs wrote them into the file only to
#: remove them, and recompressed the snapshot's last row group each time (a third of the
#: state's CPU in a first full sync). A sync that Klaviyo's rate limit holds checkpoints
#: while it waits (`State.idle`), so that only what one minute of the limit's jobs write
#: (about 1 GB: 150 jobs of 10,000 profiles) comes between two checkpoints, and none
#: stalls the sending. The cost is up to this much disk beside the state, and its replay
#: when the state is next opened after a crash.
WAL_CHECKPOINT = "2GB"
#: While the sync waits for Klaviyo's rate limit, the state is checkpointed once its
#: write-ahead log holds this much.
IDLE_CHECKPOINT_BYTES = 64 * 2**20
SCHEMA_VERSION = 7
#: How fingerprints are computed now (see `diff.fingerprint_sql`); stored per sync.
FINGERPRINT_VERSION = "md5-v1"

# Migration N brings a state file from version N-1 to N. Append; never edit a shipped step.
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE syncs (
            sync_id VARCHAR NOT NULL, model VARCHAR NOT NULL, unique_id VARCHAR NOT NULL,
            object VARCHAR NOT NULL, behavior VARCHAR NOT NULL, list_id VARCHAR,
            target VARCHAR NOT NULL, base_url VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp)""",
        # One row per record ever sent. `fingerprint` and `accepted_values` are what Klaviyo
        # last accepted; `rejected_fingerprint` is the version Klaviyo (or our checks)
        # refused, which is not sent again until the row changes.
        """CREATE TABLE snapshot (
            sync_id VARCHAR NOT NULL, key VARCHAR NOT NULL, fingerprint VARCHAR,
            accepted_values JSON, klaviyo_id VARCHAR, rejected_fingerprint VARCHAR,
            updated_at TIMESTAMPTZ NOT NULL)""",
        """CREATE TABLE runs (
            run_id VARCHAR NOT NULL, sync_id VARCHAR NOT NULL, model VARCHAR NOT NULL,
            started_at TIMESTAMPTZ NOT NULL, finished_at TIMESTAMPTZ,
            dry_run BOOLEAN NOT NULL, full_refresh BOOLEAN NOT NULL,
            added BIGINT, updated BIGINT, removed BIGINT, unchanged BIGINT,
            rejected BIGINT, failed BIGINT, requests BIGINT, status VARCHAR NOT NULL)""",
        """CREATE TABLE rejects (
            run_id VARCHAR NOT NULL, sync_id VARCHAR NOT NULL, model VARCHAR NOT NULL,
            key VARCHAR, column_name VARCHAR, field VARCHAR, code VARCHAR NOT NULL,
            reason VARCHAR NOT NULL, fingerprint VARCHAR, rejected_at TIMESTAMPTZ NOT NULL)""",
    ],
    # Why a run ended in error, so the run history says more than "error".
    2: ["ALTER TABLE runs ADD COLUMN error VARCHAR"],
    # Fingerprints become DuckDB's 64-bit hash instead of an md5 string (five times faster
    # to compute). Old ones cannot be converted: an accepted row keeps a placeholder, so
    # events and deletions stay done and an upserted row is sent once more.
    3: [
        """ALTER TABLE snapshot ALTER fingerprint SET DATA TYPE UBIGINT
           USING (CASE WHEN fingerprint IS NOT NULL THEN 0 END)""",
        "ALTER TABLE snapshot ALTER rejected_fingerprint SET DATA TYPE UBIGINT USING (NULL)",
        "ALTER TABLE rejects ALTER fingerprint SET DATA TYPE UBIGINT USING (NULL)",
        # JSON text as written; the JSON type would parse every value again on insert.
        "ALTER TABLE snapshot ALTER accepted_values SET DATA TYPE VARCHAR",
    ],
    4: [
        # The Klaviyo account a key belongs to is part of a sync's identity; the fingerprint
        # version says how `fingerprint` was computed (NULL: DuckDB's unstable hash()).
        "ALTER TABLE syncs ADD COLUMN account_id VARCHAR",
        "ALTER TABLE syncs ADD COLUMN fingerprint_version VARCHAR",
        # A refusal that may pass without the row changing (profile not found, an identifier
        # conflict a merge in Klaviyo resolves) is tried again on every run.
        "ALTER TABLE snapshot ADD COLUMN retry_rejected BOOLEAN",
        "ALTER TABLE rejects ADD COLUMN retried BOOLEAN",
        # What was sent and not yet answered: a unit of records per request or bulk job. An
        # event's exact body, so that one Klaviyo may already hold goes again unchanged;
        # a bulk job's id, so that a re-run polls it instead of sending its rows again.
        """CREATE TABLE journal (
            sync_id VARCHAR NOT NULL, unit VARCHAR NOT NULL, position INTEGER NOT NULL,
            key VARCHAR NOT NULL, fingerprint UBIGINT, in_snapshot BOOLEAN NOT NULL,
            klaviyo_id VARCHAR, accepted_values VARCHAR, body VARCHAR,
            journaled_at TIMESTAMPTZ NOT NULL)""",
        """CREATE TABLE jobs (
            sync_id VARCHAR NOT NULL, unit VARCHAR NOT NULL, job_id VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL)""",
        # Refusals recorded before this version that may pass by themselves are tried again.
        """UPDATE snapshot SET retry_rejected = true
           WHERE rejected_fingerprint IS NOT NULL AND (sync_id, key) IN (
               SELECT (sync_id, key) FROM rejects
               WHERE code IN ('not_found', 'duplicate_profile'))""",
    ],
    # How long a run's requests waited for Klaviyo's rate limits (NULL: not recorded).
    5: ["ALTER TABLE runs ADD COLUMN rate_limit_seconds DOUBLE"],
    # A memo of the accepted fingerprint: DuckDB's hash() of the same values, which the diff
    # compares first, so that it computes the MD5 only of rows that changed (see
    # `diff.memo_sql`). NULL until a diff or an acceptance computes it.
    6: [
        "ALTER TABLE snapshot ADD COLUMN memo UBIGINT",
        "ALTER TABLE journal ADD COLUMN memo UBIGINT",
    ],
    # Accepted values (and a journaled event's body) are stored with ZSTD. With DuckDB's
    # automatic choice, DICT_FSST, compressing them was most of a first sync's commit: 2.0-2.4
    # CPU-s per 1M profiles, against 0.7-0.8 s with ZSTD, which also stores them in less than
    # half the space. A column's compression cannot be altered, so both tables are rebuilt
    # (once: 10 s at 10M rows); a file whose format cannot hold ZSTD skips this step (see
    # `_ONLY_IF`).
    7: [
        """CREATE TABLE snapshot_v7 (
            sync_id VARCHAR NOT NULL, key VARCHAR NOT NULL, fingerprint UBIGINT,
            accepted_values VARCHAR USING COMPRESSION zstd, klaviyo_id VARCHAR,
            rejected_fingerprint UBIGINT, updated_at TIMESTAMPTZ NOT NULL,
            retry_rejected BOOLEAN, memo UBIGINT)""",
        "INSERT INTO snapshot_v7 SELECT * FROM snapshot",
        "DROP TABLE snapshot",
        "ALTER TABLE snapshot_v7 RENAME TO snapshot",
        """CREATE TABLE journal_v7 (
            sync_id VARCHAR NOT NULL, unit VARCHAR NOT NULL, position INTEGER NOT NULL,
            key VARCHAR NOT NULL, fingerprint UBIGINT, in_snapshot BOOLEAN NOT NULL,
            klaviyo_id VARCHAR, accepted_values VARCHAR USING COMPRESSION zstd,
            body VARCHAR USING COMPRESSION zstd, journaled_at TIMESTAMPTZ NOT NULL,
            memo UBIGINT)""",
        "INSERT INTO journal_v7 SELECT * FROM journal",
        "DROP TABLE journal",
        "ALTER TABLE journal_v7 RENAME TO journal",
    ],
}


def _holds_zstd(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the state can store strings with ZSTD: DuckDB 1.3 or later (1.2 takes the
    request and stores the column uncompressed) and a file of storage version 1.2 or later
    (older formats refuse it, or store it uncompressed; a file keeps the format it was
    created in, the oldest one by default before DuckDB 2.0). In memory, always."""
    if tuple(int(part) for part in duckdb.__version__.split(".")[:2]) < (1, 3):
        return False
    [(tags,)] = con.execute(
        "SELECT tags FROM duckdb_databases() WHERE database_name = $1", [CATALOG]
    ).fetchall()
    storage = (tags or {}).get("storage_version")
    if storage is None:
        return True
    version = re.match(r"v(\d+)\.(\d+)", storage)
    return version is not None and (int(version[1]), int(version[2])) >= (1, 2)


#: Migrations taken only where the state can hold what they make; skipped, the state still
#: moves to their version.
_ONLY_IF: dict[int, Callable[[duckdb.DuckDBPyConnection], bool]] = {7: _holds_zstd}

_SNAPSHOT_COLUMNS = (
    "sync_id, key, fingerprint, memo, accepted_values, klaviyo_id, rejected_fingerprint, "
    "retry_rejected, updated_at"
)
# How `commit` records a batch's outcomes (the registered table `batch_outcomes`).
# Every INSERT names its columns: migrations only ever add columns.
# A batch's outcomes, with the values of a journaled record taken from the journal, where
# they were written (serialized once) before it was sent. Only when the batch lacks some:
# the journal keeps its deleted rows until a checkpoint, and scanning them for every batch
# made a first full sync's commits slower with every job.
_OUTCOMES = f"""(SELECT b.* REPLACE (coalesce(b.accepted_values, j.accepted_values)
                                     AS accepted_values)
    FROM batch_outcomes AS b LEFT JOIN (
        SELECT key, arg_max(accepted_values, journaled_at) AS accepted_values
        FROM {CATALOG}.journal WHERE sync_id = $1 GROUP BY key) AS j USING (key))"""


def _insert_new(outcomes: str) -> str:
    """Insert rows seen for the first time, from these outcomes."""
    return f"""INSERT INTO {CATALOG}.snapshot ({_SNAPSHOT_COLUMNS})
    SELECT $1, key,
        CASE WHEN outcome = 'accepted' THEN fingerprint END,
        CASE WHEN outcome = 'accepted' THEN memo END,
        CASE WHEN outcome = 'accepted' THEN accepted_values END,
        klaviyo_id,
        CASE WHEN outcome = 'rejected' THEN fingerprint END,
        CASE WHEN outcome = 'rejected' THEN retry END,
        current_timestamp
    FROM {outcomes}
    WHERE NOT in_snapshot AND outcome IN ('accepted', 'rejected')"""


# Rows already in the snapshot that Klaviyo accepted again are replaced: deleted, with the
# rows that left a list, in one scan of the snapshot (DuckDB's UPDATE ... FROM scans more
# slowly), then inserted whole from the batch, which carries the known Klaviyo id.
_DELETE_REPLACED = f"""DELETE FROM {CATALOG}.snapshot WHERE sync_id = $1 AND key IN
    (SELECT key FROM batch_outcomes
     WHERE (in_snapshot AND outcome = 'accepted') OR outcome IN ('removed', 'forgotten'))"""


def _insert_replaced(outcomes: str) -> str:
    """Insert again the rows `_DELETE_REPLACED` took out, from these outcomes."""
    return f"""INSERT INTO {CATALOG}.snapshot ({_SNAPSHOT_COLUMNS})
    SELECT $1, key, fingerprint, memo, accepted_values, klaviyo_id, NULL, NULL,
        current_timestamp
    FROM {outcomes} WHERE in_snapshot AND outcome = 'accepted'"""


# A known row Klaviyo now refuses keeps what it last accepted, and remembers the refusal;
# a row back at the accepted version forgets an earlier refusal.
_MARK_REJECTED = f"""UPDATE {CATALOG}.snapshot AS s
    SET rejected_fingerprint = CASE WHEN b.outcome = 'rejected' THEN b.fingerprint END,
        retry_rejected = CASE WHEN b.outcome = 'rejected' THEN b.retry END,
        updated_at = current_timestamp
    FROM batch_outcomes AS b
    WHERE s.sync_id = $1 AND s.key = b.key AND b.in_snapshot
      AND b.outcome IN ('rejected', 'settled')"""
_LOG_REJECTS = f"""INSERT INTO {CATALOG}.rejects (run_id, sync_id, model, key, column_name,
        field, code, reason, fingerprint, rejected_at, retried)
    SELECT $2, $1, $3, key, column_name, field, code, reason, fingerprint, current_timestamp,
        coalesce(retry, false)
    FROM batch_outcomes WHERE outcome IN ('rejected', 'invalid')"""
# Answered records leave the journal; failed ones stay until the next run looks at them.
_CLEAR_JOURNAL = f"""DELETE FROM {CATALOG}.journal WHERE sync_id = $1 AND key IN
    (SELECT key FROM batch_outcomes
     WHERE outcome IN ('accepted', 'rejected', 'removed', 'forgotten'))"""
_CLEAR_JOBS = f"""DELETE FROM {CATALOG}.jobs WHERE sync_id = $1 AND unit NOT IN
    (SELECT DISTINCT unit FROM {CATALOG}.journal WHERE sync_id = $1)"""


class JobRecorder:
    """Records bulk job ids from the sending threads, on a connection of its own."""

    def __init__(self, con: duckdb.DuckDBPyConnection, sid: str) -> None:
        self._con = con
        self._sid = sid
        self._lock = threading.Lock()

    def __call__(self, unit: str, job_id: str) -> None:
        with self._lock:
            self._con.execute(
                f"""INSERT INTO {CATALOG}.jobs (sync_id, unit, job_id, created_at)
                    VALUES ($1, $2, $3, current_timestamp)""",
                [self._sid, unit, job_id],
            )

    def close(self) -> None:
        self._con.close()


_Method = TypeVar("_Method", bound=Callable[..., Any])
S = TypeVar("S", bound="State")


def _writes(method: _Method) -> _Method:
    """A State method that writes: DuckDB's errors become a `StateError` with the cause."""

    @functools.wraps(method)
    def wrapper(self: State, *args: Any, **kwargs: Any) -> Any:
        with self.writing():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class State:
    """The state tables, reached through the shared connection."""

    def __init__(
        self, con: duckdb.DuckDBPyConnection, path: Path | None = None, read_only: bool = False
    ) -> None:
        self.con = con
        self.path = path
        self.read_only = read_only  # a dry run's: it keeps nothing of what it does
        # Writes go through a second connection to the same database, so that a diff
        # result can be streamed on `con` while batches are committed.
        self._writer = con.cursor()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """DuckDB errors while writing the state (a full disk, a read-only file) become a
        `StateError` that names the cause and the remedy."""
        try:
            yield
        except duckdb.Error as exc:
            raise _explain(self.path, exc, opening=False) from exc

    def schema_version(self) -> int:
        """The state's schema version; 0 for a file that holds no state yet."""
        found = self.con.execute(
            """SELECT count(*) FROM duckdb_tables()
               WHERE database_name = $1 AND table_name = 'meta'""",
            [CATALOG],
        ).fetchall()
        if not found[0][0]:
            return 0
        rows = self.con.execute(
            f"SELECT value FROM {CATALOG}.meta WHERE key = 'schema_version'"
        ).fetchall()
        return int(rows[0][0]) if rows else 0

    def _migrate(self) -> None:
        """Bring the state to this version's schema, one migration a transaction."""
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise StateError(
                f"the state file has schema version {version}, newer than this "
                f"dbt-klaviyo-sync understands ({SCHEMA_VERSION}); upgrade dbt-klaviyo-sync."
            )
        if version == SCHEMA_VERSION:
            return
        w = self._writer
        w.execute(f"CREATE TABLE IF NOT EXISTS {CATALOG}.meta (key VARCHAR, value VARCHAR)")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            w.execute("BEGIN TRANSACTION")
            w.execute(f"USE {CATALOG}")
            only_if = _ONLY_IF.get(step)
            if only_if is None or only_if(w):
                for ddl in _MIGRATIONS[step]:
                    w.execute(ddl)
            w.execute(f"DELETE FROM {CATALOG}.meta WHERE key = 'schema_version'")
            w.execute(
                f"INSERT INTO {CATALOG}.meta (key, value) VALUES ('schema_version', '{step}')"
            )
            w.execute("COMMIT")

    @_writes
    def register(self, sync: SyncIdentity, spec: SyncSpec) -> None:
        """Remember what a sync id stands for, so people can read the state with SQL.

        A state written before syncs knew their Klaviyo account has this sync under the id
        without one: it is adopted, in one transaction, by the account of the key in use now
        (the state was that account's, unless the key changed at the same time as the
        upgrade)."""
        with self.transaction() as w:
            known = w.execute(
                f"SELECT 1 FROM {CATALOG}.syncs WHERE sync_id = $1", [sync.sid]
            ).fetchall()
            legacy = w.execute(
                f"""SELECT 1 FROM {CATALOG}.syncs WHERE sync_id = $1 AND account_id IS NULL""",
                [sync.legacy_sid],
            ).fetchall()
            if not known and legacy and sync.legacy_sid != sync.sid:
                for table in ("syncs", "snapshot", "runs", "rejects", "journal", "jobs"):
                    w.execute(
                        f"UPDATE {CATALOG}.{table} SET sync_id = $1 WHERE sync_id = $2",
                        [sync.sid, sync.legacy_sid],
                    )
                w.execute(
                    f"UPDATE {CATALOG}.syncs SET account_id = $2 WHERE sync_id = $1",
                    [sync.sid, sync.account_id],
                )
            w.execute(
                f"""INSERT INTO {CATALOG}.syncs (sync_id, model, unique_id, object, behavior,
                    list_id, target, base_url, account_id, fingerprint_version)
                    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10
                    WHERE NOT EXISTS (SELECT 1 FROM {CATALOG}.syncs WHERE sync_id = $1)""",
                [
                    sync.sid,
                    spec.model,
                    spec.unique_id,
                    spec.object,
                    spec.behavior,
                    spec.list_id,
                    sync.target,
                    sync.base_url,
                    sync.account_id,
                    FINGERPRINT_VERSION,
                ],
            )

    def needs_rebase(self, sid: str) -> bool:
        """Whether the sync's stored keys and fingerprints predate FINGERPRINT_VERSION."""
        found = self.con.execute(
            f"SELECT fingerprint_version FROM {CATALOG}.syncs WHERE sync_id = $1", [sid]
        ).fetchall()
        return bool(found) and found[0][0] != FINGERPRINT_VERSION

    @_writes
    def rebased(self, sid: str) -> None:
        """The sync's keys and fingerprints are now of FINGERPRINT_VERSION."""
        self._writer.execute(
            f"UPDATE {CATALOG}.syncs SET fingerprint_version = $2 WHERE sync_id = $1",
            [sid, FINGERPRINT_VERSION],
        )

    def accounts(self, spec: SyncSpec, target: str, base_url: str) -> dict[str, str | None]:
        """The syncs recorded for this model's object, behaviour and list, target and URL,
        whatever the account: their ids, with the account of each."""
        rows = self.con.execute(
            f"""SELECT sync_id, account_id FROM {CATALOG}.syncs
                WHERE unique_id = $1 AND object = $2 AND behavior = $3
                  AND coalesce(list_id, '') = $4 AND target = $5 AND base_url = $6""",
            [
                spec.unique_id,
                spec.object,
                spec.behavior,
                spec.list_id or "",
                target,
                base_url.rstrip("/"),
            ],
        ).fetchall()
        return {str(sid): account for sid, account in rows}

    def resolved(self, sync: SyncIdentity, spec: SyncSpec) -> str:
        """The id a dry run reads, which registers nothing: the sync's own, or the id
        without an account that a real run would adopt (see `register`). Without an
        account (a plan that did not ask Klaviyo), the one sync recorded for the model, if
        there is one."""
        known = self.accounts(spec, sync.target, sync.base_url)
        if sync.account_id is None:
            return next(iter(known)) if len(known) == 1 else sync.sid
        if sync.sid in known:
            return sync.sid
        return sync.legacy_sid if known.get(sync.legacy_sid, "") is None else sync.sid

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The write connection, in a transaction that commits only if the block ends well."""
        w = self._writer
        with self.writing():
            w.execute("BEGIN TRANSACTION")
            try:
                yield w
            except BaseException:
                w.execute("ROLLBACK")
                raise
            w.execute("COMMIT")

    def in_memory(self) -> None:
        """Go on with a copy of the state in memory: a dry run may then change it freely."""
        if self.path is not None:
            _into_memory(self.con)
            self.path, self.read_only = None, False

    def accepted_count(self, sid: str) -> int:
        """How many of the sync's rows Klaviyo has accepted (what the last sync left)."""
        [(count,)] = self.con.execute(
            f"""SELECT count(*) FROM {CATALOG}.snapshot
                WHERE sync_id = $1 AND fingerprint IS NOT NULL""",
            [sid],
        ).fetchall()
        return int(count)

    def has_syncs(self) -> bool:
        """Whether any sync was ever recorded here (an empty file is a fresh state)."""
        [(count,)] = self.con.execute(f"SELECT count(*) FROM {CATALOG}.syncs").fetchall()
        return bool(count)

    @_writes
    def forget(self, sid: str, *, keep_accepted: bool) -> None:
        """`--full-refresh`: every row counts as never sent, and rejected rows are tried
        again; known Klaviyo ids are kept. With `keep_accepted` (deletions, events) what
        Klaviyo accepted stays done: only the rejects are tried again."""
        self._writer.execute(
            f"""UPDATE {CATALOG}.snapshot
                SET fingerprint = CASE WHEN $2 THEN fingerprint END,
                    memo = CASE WHEN $2 THEN memo END,
                    accepted_values = CASE WHEN $2 THEN accepted_values END,
                    rejected_fingerprint = NULL, retry_rejected = NULL
                WHERE sync_id = $1""",
            [sid, keep_accepted],
        )

    @_writes
    def start_run(self, sid: str, model: str, *, full_refresh: bool) -> str:
        run_id = uuid.uuid4().hex
        self._writer.execute(
            f"""INSERT INTO {CATALOG}.runs (run_id, sync_id, model, started_at, dry_run,
                full_refresh, status)
                VALUES ($1, $2, $3, current_timestamp, false, $4, 'running')""",
            [run_id, sid, model, full_refresh],
        )
        return run_id

    @_writes
    def finish_run(
        self,
        run_id: str,
        counts: RunCounts,
        status: str,
        error: str | None = None,
        *,
        rate_limit_seconds: float = 0.0,
    ) -> None:
        """Record how the run ended. The state is checkpointed first: DuckDB merges the
        part-filled row groups that commits of different sizes can leave side by side only
        at a checkpoint after the one that wrote them, so the closing one, after this
        record, does it; otherwise the next run paid for it (a no-op after a first sync of
        1M profiles took 2.0 s against 0.7, before its commits came in whole row groups)."""
        if self.path is not None:
            self._writer.execute(f"CHECKPOINT {CATALOG}")
        self._writer.execute(
            f"""UPDATE {CATALOG}.runs SET finished_at = current_timestamp, added = $2,
                updated = $3, removed = $4, unchanged = $5, rejected = $6, failed = $7,
                requests = $8, status = $9, error = $10, rate_limit_seconds = $11
                WHERE run_id = $1""",
            [
                run_id,
                counts.added,
                counts.updated,
                counts.removed,
                counts.unchanged,
                counts.rejected,
                counts.failed,
                counts.requests,
                status,
                error,
                rate_limit_seconds,
            ],
        )

    @_writes
    def journal(self, sid: str, unit: str, rows: pa.Table) -> None:
        """Write down a unit's records (`JOURNAL_SCHEMA`) before they are sent."""
        w = self._writer
        w.register("journal_rows", rows)
        try:
            w.execute(
                f"""INSERT INTO {CATALOG}.journal (sync_id, unit, position, key, fingerprint,
                    memo, in_snapshot, klaviyo_id, accepted_values, body, journaled_at)
                    SELECT $1, $2, position, key, fingerprint, memo, in_snapshot, klaviyo_id,
                        accepted_values, body, current_timestamp
                    FROM journal_rows""",
                [sid, unit],
            )
        finally:
            w.unregister("journal_rows")

    def job_recorder(self, sid: str) -> JobRecorder:
        """A callable that records a unit's bulk job id as soon as Klaviyo names it, from
        whichever sending thread created the job."""
        return JobRecorder(self.con.cursor(), sid)

    def journaled_units(self, sid: str) -> list[JournaledUnit]:
        """What an earlier run sent and never saw answered, unit by unit, oldest first."""
        rows = self.con.execute(
            f"""SELECT j.unit, any_value(b.job_id), min(j.journaled_at) AS since,
                    epoch(current_timestamp - min(j.journaled_at)),
                    list(struct_pack(position := j.position, key := j.key,
                         fingerprint := j.fingerprint, memo := j.memo,
                         in_snapshot := j.in_snapshot,
                         klaviyo_id := j.klaviyo_id, accepted_values := j.accepted_values)
                         ORDER BY j.position)
                FROM {CATALOG}.journal AS j
                LEFT JOIN {CATALOG}.jobs AS b ON b.sync_id = j.sync_id AND b.unit = j.unit
                WHERE j.sync_id = $1 GROUP BY j.unit ORDER BY since""",
            [sid],
        ).fetchall()
        return [JournaledUnit(unit, job_id, records, age) for unit, job_id, _, age, records in rows]

    @_writes
    def drop_journal(self, sid: str, units: list[str]) -> None:
        """Forget journaled units whose records may simply be sent again."""
        if units:
            self._writer.execute(
                f"""DELETE FROM {CATALOG}.journal WHERE sync_id = $1 AND unit IN
                    (SELECT unnest($2::VARCHAR[]))""",
                [sid, units],
            )
            self._writer.execute(_CLEAR_JOBS, [sid])

    @_writes
    def commit(self, sid: str, run_id: str, model: str, outcomes: pa.Table) -> None:
        """Record one batch's answers in a single transaction: accepted rows update the
        snapshot, rejected rows are logged and remembered so they are not re-sent until
        they change (unless the refusal may pass by itself). Failed rows are simply absent,
        so the next run sends them again; answered rows leave the journal. Statements that
        would change nothing are skipped: replacing and deleting rows scans the whole
        snapshot, which is millions of rows on a large model, so it is done once.
        An accepted row's `klaviyo_id` must be the known one when the answer gave none."""
        if outcomes.num_rows == 0:
            return
        counted = outcomes.group_by(["outcome", "in_snapshot"]).aggregate([([], "count_all")])
        kinds = Counter(
            {(row["outcome"], row["in_snapshot"]): row["count_all"] for row in counted.to_pylist()}
        )
        recorded = {"accepted", "rejected"}
        replaced = kinds[("accepted", True)] > 0
        answered = any(o in ("accepted", "rejected", "removed", "forgotten") for o, _ in kinds)
        accepted = pc.equal(outcomes["outcome"], "accepted")
        lacking = pc.any(pc.and_(accepted, pc.is_null(outcomes["accepted_values"]))).as_py()
        source = _OUTCOMES if lacking else "batch_outcomes"
        statements = [
            (any(o in recorded and not known for o, known in kinds), _insert_new(source), [sid]),
            (
                replaced or kinds[("removed", True)] > 0 or kinds[("forgotten", True)] > 0,
                _DELETE_REPLACED,
                [sid],
            ),
            (replaced, _insert_replaced(source), [sid]),
            (kinds[("rejected", True)] + kinds[("settled", True)] > 0, _MARK_REJECTED, [sid]),
            (
                any(o in ("rejected", "invalid") for o, _ in kinds),
                _LOG_REJECTS,
                [sid, run_id, model],
            ),
            (answered, _CLEAR_JOURNAL, [sid]),
            (answered, _CLEAR_JOBS, [sid]),
        ]
        self._writer.register("batch_outcomes", outcomes)
        try:
            with self.transaction() as w:
                for needed, sql, parameters in statements:
                    if needed:
                        w.execute(sql, parameters)
        finally:
            self._writer.unregister("batch_outcomes")

    @_writes
    def idle(self) -> None:
        """Checkpoint while the sync waits for Klaviyo anyway. DuckDB's own checkpoint
        comes inside whichever commit fills the write-ahead log, and holds every thread
        that writes the state, the senders recording their jobs' ids with them: 2-3.5 s
        every 150-200 jobs of a 10M first sync, each one time lost against the limit."""
        if self.path is None:
            return
        try:
            logged = os.stat(f"{self.path}.wal").st_size
        except FileNotFoundError:
            return
        if logged >= IDLE_CHECKPOINT_BYTES:
            self._writer.execute(f"CHECKPOINT {CATALOG}")

    def budget_for(self, phase: Literal["diff", "send"]) -> None:
        """Give DuckDB the memory and threads of the phase the sync is in: the diff gets
        every core; the sending one thread (`SEND_THREADS`)."""
        limit = diff_memory_limit() if phase == "diff" else SEND_MEMORY_LIMIT
        self.con.execute(f"SET memory_limit = '{_sql_str(limit)}'")
        self.con.execute("RESET threads" if phase == "diff" else f"SET threads = {SEND_THREADS}")

    def accepted_values(self, sid: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        """As `Warehouse.accepted_values`."""
        if not keys:
            return {}
        rows = self.con.execute(
            f"""SELECT key, accepted_values FROM {CATALOG}.snapshot
                WHERE sync_id = $1 AND key IN (SELECT unnest($2::VARCHAR[]))
                AND fingerprint IS NOT NULL""",
            [sid, keys],
        ).fetchall()
        return {key: orjson.loads(values) if values else {} for key, values in rows}


def diff_memory_limit() -> str:
    """DuckDB's budget for the diff: DBT_KLAVIYO_MEMORY_LIMIT when set, else what is left
    of `PROCESS_MEMORY_MB` beside what this process holds now (never under 512 MB). Where
    the process's size cannot be read (no /proc), as if dbt were loaded."""
    if limit := os.environ.get("DBT_KLAVIYO_MEMORY_LIMIT"):
        return limit
    try:
        with open("/proc/self/statm") as statm:
            held = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
    except (OSError, ValueError, IndexError):
        held = 300
    left = PROCESS_MEMORY_MB - held - PYTHON_MARGIN_MB
    return f"{max(LEAST_DIFF_MEMORY_MB, left)}MB"


def default_path(project_dir: Path) -> Path:
    """Next to the dbt project, outside `target/`, so `dbt clean` leaves it alone."""
    return project_dir / ".klaviyo_sync" / "state.duckdb"


@contextmanager
def open_state(
    path: Path | None,
    warehouse: Mapping[str, Path],
    *,
    read_only: bool = False,
    kind: type[S] = State,  # type: ignore[assignment]
) -> Iterator[S]:
    """Open the state and the warehouse in one DuckDB connection.

    `path=None` gives an empty in-memory state (a dry run before the first sync). The
    warehouse is attached first, so that a sync that cannot read its models leaves no empty
    state file behind. The state file is locked while open, so a second sync on the same
    state fails fast with a clear message instead of corrupting it. Read-only, a file that
    holds no state yet reads as an empty state.
    """
    con = duckdb.connect(
        config={"memory_limit": diff_memory_limit(), "preserve_insertion_order": False}
    )
    try:
        for catalog, file in warehouse.items():
            if not file.is_file():
                raise StateError(
                    f"the dbt database {file} does not exist; run `dbt run` (or `dbt build`) "
                    "first. Relative paths in profiles.yml are resolved from the current "
                    "directory, as dbt does."
                )
            try:
                con.execute(f"ATTACH '{_sql_str(str(file))}' AS \"{catalog}\" (READ_ONLY)")
            except duckdb.IOException as exc:
                raise StateError(
                    f"cannot open the dbt database {file}: {exc}. dbt locks it while it "
                    "runs; wait for dbt to finish, then sync."
                ) from exc
        if path is None:
            con.execute(f"ATTACH ':memory:' AS {CATALOG}")
        else:
            if not read_only:
                path.parent.mkdir(parents=True, exist_ok=True)
                con.execute(f"SET temp_directory = '{_sql_str(str(path.parent / 'tmp'))}'")
                con.execute(f"SET wal_autocheckpoint = '{WAL_CHECKPOINT}'")
            mode = " (READ_ONLY)" if read_only else ""
            try:
                con.execute(f"ATTACH '{_sql_str(str(path))}' AS {CATALOG}{mode}")
            except duckdb.Error as exc:
                raise _explain(path, exc, opening=True) from exc
        state = kind(con, path, read_only and path is not None)
        with state.writing():
            if read_only and path is not None and state.schema_version() < SCHEMA_VERSION:
                state.in_memory()  # to read an older (or empty) state as this version's
            state._migrate()
        yield state
    finally:
        con.close()


def _into_memory(con: duckdb.DuckDBPyConnection) -> None:
    """Replace the read-only state catalog by an in-memory copy that can be migrated."""
    con.execute("ATTACH ':memory:' AS klaviyo_sync_copy")
    con.execute(f"COPY FROM DATABASE {CATALOG} TO klaviyo_sync_copy")
    con.execute("USE klaviyo_sync_copy")
    con.execute(f"DETACH {CATALOG}")
    con.execute(f"ATTACH ':memory:' AS {CATALOG}")
    con.execute(f"COPY FROM DATABASE klaviyo_sync_copy TO {CATALOG}")
    con.execute(f"USE {CATALOG}")
    con.execute("DETACH klaviyo_sync_copy")


def _explain(path: Path | None, error: duckdb.Error, *, opening: bool) -> StateError:
    """A DuckDB error on the state file, as its real cause and the safe remedy."""
    text = str(error)
    where = f"the state file {path}" if path else "the sync state"
    if "Could not set lock on file" in text:
        return StateError(
            f"{where} is in use by another dbt-klaviyo sync ({error}); wait for it to finish. "
            "Two syncs on one state never run at once."
        )
    if "No space left on device" in text:
        return StateError(
            f"the disk holding {where} is full ({error}). Free some space and run again: "
            "answers not yet recorded are sent again, which is safe."
        )
    if "Read-only file system" in text or "Permission denied" in text:
        return StateError(
            f"{where} cannot be written ({error}). Give this user write access to it and its "
            "folder, or point --state (DBT_KLAVIYO_STATE) at a writable place; nothing is lost."
        )
    if not opening:
        return StateError(
            f"{where} could not be written ({error}); answers not yet recorded are sent again "
            "next run, which is safe."
        )
    return StateError(
        f"{where} cannot be read ({error}): it is damaged. Move it aside (keep it: it may be "
        "recoverable) and run again with --full-refresh, which sends every row again; "
        "Klaviyo drops events it already has by unique_id, but deletions already made are "
        "requested again."
    )


def _sql_str(text: str) -> str:
    return text.replace("'", "''")
