"""The sync state: a DuckDB file of its own, versioned, committed one batch at a time.

It lives apart from the dbt database because dbt-duckdb locks that file while dbt runs, and
outside `target/` so that `dbt clean` does not make us re-send everything. One DuckDB
connection holds both: the state file attached read-write as `klaviyo_sync_state`, and the
warehouse files attached read-only under the catalog names dbt gave them, so the diff is a
single SQL join. All SQL that writes state lives in this module.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import duckdb
import orjson
import pyarrow as pa

from dbt_klaviyo_sync.errors import StateError
from dbt_klaviyo_sync.spec import SyncSpec

CATALOG = "klaviyo_sync_state"

# DuckDB would take up to 80% of the machine's memory. A sync keeps to a budget and spills
# to disk beyond it: the diff's join gets the most; while changed rows stream out to be
# sent, DuckDB needs little, and the requests in flight need the room.
DIFF_MEMORY_LIMIT = os.environ.get("DBT_KLAVIYO_MEMORY_LIMIT", "1GB")
SEND_MEMORY_LIMIT = "384MB"
SCHEMA_VERSION = 3

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
}

#: The columns of a batch's outcome table, as `commit_batch` expects them.
OUTCOME_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        # accepted | rejected | removed (left the model, and Klaviyo was told) | invalid (a
        # reject with no record to remember it by, such as a NULL or duplicated sync key:
        # reported on every run until the data is fixed)
        ("outcome", pa.string()),
        ("fingerprint", pa.uint64()),
        ("accepted_values", pa.string()),  # JSON text of the values sent, when accepted
        ("klaviyo_id", pa.string()),
        ("in_snapshot", pa.bool_()),
        ("column_name", pa.string()),
        ("field", pa.string()),
        ("code", pa.string()),
        ("reason", pa.string()),
    ]
)


# How `commit_batch` records a batch's outcomes (the registered table `batch_outcomes`).
_INSERT_NEW = f"""INSERT INTO {CATALOG}.snapshot
    SELECT $1, key,
        CASE WHEN outcome = 'accepted' THEN fingerprint END,
        CASE WHEN outcome = 'accepted' THEN accepted_values END,
        klaviyo_id,
        CASE WHEN outcome = 'rejected' THEN fingerprint END,
        current_timestamp
    FROM batch_outcomes
    WHERE NOT in_snapshot AND outcome IN ('accepted', 'rejected')"""
# Rows already in the snapshot that Klaviyo accepted again are replaced: deleted, with the
# rows that left a list, in one scan of the snapshot (DuckDB's UPDATE ... FROM scans more
# slowly), then inserted whole from the batch, which carries the known Klaviyo id.
_DELETE_REPLACED = f"""DELETE FROM {CATALOG}.snapshot WHERE sync_id = $1 AND key IN
    (SELECT key FROM batch_outcomes
     WHERE (in_snapshot AND outcome = 'accepted') OR outcome = 'removed')"""
_INSERT_REPLACED = f"""INSERT INTO {CATALOG}.snapshot
    SELECT $1, key, fingerprint, accepted_values, klaviyo_id, NULL, current_timestamp
    FROM batch_outcomes WHERE in_snapshot AND outcome = 'accepted'"""
# A known row Klaviyo now refuses keeps what it last accepted, and remembers the refusal.
_MARK_REJECTED = f"""UPDATE {CATALOG}.snapshot AS s
    SET rejected_fingerprint = b.fingerprint, updated_at = current_timestamp
    FROM batch_outcomes AS b
    WHERE s.sync_id = $1 AND s.key = b.key AND b.in_snapshot AND b.outcome = 'rejected'"""
_LOG_REJECTS = f"""INSERT INTO {CATALOG}.rejects
    SELECT $1, $2, $3, key, column_name, field, code, reason, fingerprint, current_timestamp
    FROM batch_outcomes WHERE outcome IN ('rejected', 'invalid')"""


def sync_id(spec: SyncSpec, target: str, base_url: str) -> str:
    """Identify a sync by what it writes where: a different target, Klaviyo account URL,
    object, behaviour or list is a different sync with a state of its own."""
    parts = [base_url.rstrip("/"), target, spec.unique_id, spec.object, spec.behavior]
    return hashlib.sha256("\x1f".join([*parts, spec.list_id or ""]).encode()).hexdigest()[:20]


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


class State:
    """The state tables, reached through the shared connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        # Writes go through a second connection to the same database, so that a diff
        # result can be streamed on `con` while batches are committed.
        self._writer = con.cursor()

    def _migrate(self) -> None:
        w = self._writer
        w.execute(f"CREATE TABLE IF NOT EXISTS {CATALOG}.meta (key VARCHAR, value VARCHAR)")
        rows = w.execute(
            f"SELECT value FROM {CATALOG}.meta WHERE key = 'schema_version'"
        ).fetchall()
        version = int(rows[0][0]) if rows else 0
        if version > SCHEMA_VERSION:
            raise StateError(
                f"the state file has schema version {version}, newer than this "
                f"dbt-klaviyo-sync understands ({SCHEMA_VERSION}); upgrade dbt-klaviyo-sync."
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            w.execute("BEGIN TRANSACTION")
            w.execute(f"USE {CATALOG}")
            for ddl in _MIGRATIONS[step]:
                w.execute(ddl)
            w.execute(f"DELETE FROM {CATALOG}.meta WHERE key = 'schema_version'")
            w.execute(f"INSERT INTO {CATALOG}.meta VALUES ('schema_version', '{step}')")
            w.execute("COMMIT")

    def register(self, sid: str, spec: SyncSpec, target: str, base_url: str) -> None:
        """Remember what a sync id stands for, so people can read the state with SQL."""
        self._writer.execute(
            f"""INSERT INTO {CATALOG}.syncs
                (sync_id, model, unique_id, object, behavior, list_id, target, base_url)
                SELECT $1, $2, $3, $4, $5, $6, $7, $8
                WHERE NOT EXISTS (SELECT 1 FROM {CATALOG}.syncs WHERE sync_id = $1)""",
            [
                sid,
                spec.model,
                spec.unique_id,
                spec.object,
                spec.behavior,
                spec.list_id,
                target,
                base_url.rstrip("/"),
            ],
        )

    def forget(self, sid: str, *, keep_accepted: bool) -> None:
        """`--full-refresh`: every row counts as never sent, and rejected rows are tried
        again; known Klaviyo ids are kept. With `keep_accepted` (deletions, events) what
        Klaviyo accepted stays done: only the rejects are tried again."""
        self._writer.execute(
            f"""UPDATE {CATALOG}.snapshot
                SET fingerprint = CASE WHEN $2 THEN fingerprint END,
                    accepted_values = CASE WHEN $2 THEN accepted_values END,
                    rejected_fingerprint = NULL
                WHERE sync_id = $1""",
            [sid, keep_accepted],
        )

    def start_run(self, sid: str, model: str, *, dry_run: bool, full_refresh: bool) -> str:
        run_id = uuid.uuid4().hex
        self._writer.execute(
            f"""INSERT INTO {CATALOG}.runs (run_id, sync_id, model, started_at, dry_run,
                full_refresh, status) VALUES ($1, $2, $3, current_timestamp, $4, $5, 'running')""",
            [run_id, sid, model, dry_run, full_refresh],
        )
        return run_id

    def finish_run(
        self, run_id: str, counts: RunCounts, status: str, error: str | None = None
    ) -> None:
        self._writer.execute(
            f"""UPDATE {CATALOG}.runs SET finished_at = current_timestamp, added = $2,
                updated = $3, removed = $4, unchanged = $5, rejected = $6, failed = $7,
                requests = $8, status = $9, error = $10 WHERE run_id = $1""",
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
            ],
        )

    def commit_batch(self, sid: str, run_id: str, model: str, outcomes: pa.Table) -> None:
        """Record one batch's answers in a single transaction: accepted rows update the
        snapshot, rejected rows are logged and remembered so they are not re-sent until
        they change. Rows that failed are simply absent, so the next run sends them again.
        Statements that would change nothing are skipped: replacing and deleting rows scans
        the whole snapshot, which is millions of rows on a large model, so it is done once.
        An accepted row's `klaviyo_id` must be the known one when the answer gave none."""
        if outcomes.num_rows == 0:
            return
        kinds = Counter(
            zip(
                outcomes.column("outcome").to_pylist(),
                outcomes.column("in_snapshot").to_pylist(),
                strict=True,
            )
        )
        recorded = {"accepted", "rejected"}
        replaced = kinds[("accepted", True)] > 0
        statements = [
            (any(o in recorded and not known for o, known in kinds), _INSERT_NEW, [sid]),
            (replaced or kinds[("removed", True)] > 0, _DELETE_REPLACED, [sid]),
            (replaced, _INSERT_REPLACED, [sid]),
            (kinds[("rejected", True)] > 0, _MARK_REJECTED, [sid]),
            (
                any(o in ("rejected", "invalid") for o, _ in kinds),
                _LOG_REJECTS,
                [run_id, sid, model],
            ),
        ]
        w = self._writer
        w.register("batch_outcomes", outcomes)
        try:
            w.execute("BEGIN TRANSACTION")
            for needed, sql, parameters in statements:
                if needed:
                    w.execute(sql, parameters)
            w.execute("COMMIT")
        except BaseException:
            w.execute("ROLLBACK")
            raise
        finally:
            w.unregister("batch_outcomes")

    def memory_for(self, phase: Literal["diff", "send"]) -> None:
        """Give DuckDB the memory budget of the phase the sync is in."""
        limit = DIFF_MEMORY_LIMIT if phase == "diff" else SEND_MEMORY_LIMIT
        self.con.execute(f"SET memory_limit = '{_sql_str(limit)}'")

    def accepted_values(self, sid: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        """What Klaviyo last accepted for these keys, field by field."""
        if not keys:
            return {}
        rows = self.con.execute(
            f"""SELECT key, accepted_values FROM {CATALOG}.snapshot
                WHERE sync_id = $1 AND key IN (SELECT unnest($2::VARCHAR[]))
                AND accepted_values IS NOT NULL""",
            [sid, keys],
        ).fetchall()
        return {key: orjson.loads(values) for key, values in rows}

    def forget_removed(self, sid: str, changes_table: str) -> None:
        """Drop rows that left the model, so they are sent again if they come back.
        Runs on the main connection, which owns the temporary changes table."""
        self.con.execute(
            f"""DELETE FROM {CATALOG}.snapshot WHERE sync_id = $1 AND key IN
                (SELECT __key FROM {changes_table} WHERE __change = 'remove')""",
            [sid],
        )


def default_path(project_dir: Path) -> Path:
    """Next to the dbt project, outside `target/`, so `dbt clean` leaves it alone."""
    return project_dir / ".klaviyo_sync" / "state.duckdb"


@contextmanager
def open_state(
    path: Path | None, warehouse: Mapping[str, Path], *, read_only: bool = False
) -> Iterator[State]:
    """Open the state and the warehouse in one DuckDB connection.

    `path=None` gives an empty in-memory state (a dry run before the first sync). The state
    file is locked while open, so a second sync on the same state fails fast with a clear
    message instead of corrupting it.
    """
    con = duckdb.connect(
        config={"memory_limit": DIFF_MEMORY_LIMIT, "preserve_insertion_order": False}
    )
    read_only = read_only and path is not None
    try:
        if path is None:
            con.execute(f"ATTACH ':memory:' AS {CATALOG}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            con.execute(f"SET temp_directory = '{_sql_str(str(path.parent / 'tmp'))}'")
            mode = " (READ_ONLY)" if read_only else ""
            try:
                con.execute(f"ATTACH '{_sql_str(str(path))}' AS {CATALOG}{mode}")
            except duckdb.Error as exc:
                raise _unopenable(path, exc) from exc
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
        state = State(con)
        if not read_only:
            state._migrate()
        yield state
    finally:
        con.close()


def _unopenable(path: Path, error: duckdb.Error) -> StateError:
    if "lock" in str(error).lower():
        return StateError(
            f"the state file {path} is in use by another dbt-klaviyo sync ({error}); wait "
            "for it to finish. Two syncs on one state never run at once."
        )
    return StateError(
        f"the state file {path} cannot be read ({error}). Move it aside (keep it: it may "
        "be recoverable) and run again with --full-refresh, which sends every row again; "
        "Klaviyo drops events it already has by unique_id, but deletions already made are "
        "requested again."
    )


def _sql_str(text: str) -> str:
    return text.replace("'", "''")
