"""The state and the diff under the trust issue's findings, without dbt or HTTP: stable
fingerprints, keys as Klaviyo matches them, refusals that stay visible or come back,
a journal of what is in flight, older states carried over, and honest errors."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from dbt_klaviyo_sync.changeset import JOURNAL_SCHEMA, OUTCOME_SCHEMA, RunCounts, SyncIdentity
from dbt_klaviyo_sync.errors import StateError
from dbt_klaviyo_sync.runner import _conform
from dbt_klaviyo_sync.spec import FieldMap, SyncSpec
from dbt_klaviyo_sync.warehouse.duckdb import DuckDBWarehouse, diff, open_duckdb
from dbt_klaviyo_sync.warehouse.duckdb import state as state_module
from dbt_klaviyo_sync.warehouse.duckdb.state import CATALOG, State, open_state
from tests.test_diff import SID, SPEC, accept_all, changes, model, state_path, warehouse

__all__ = ["state_path", "warehouse"]  # fixtures shared with test_diff

EMAIL_SPEC = dataclasses.replace(
    SPEC,
    key_column="email",
    key_field="email",
    fields=(FieldMap("email", "email"), FieldMap("id", "external_id")),
)


def commit(state: State, rows: list[dict[str, object]], sid: str = SID) -> None:
    full = [{"in_snapshot": False, **row} for row in rows]
    state.commit(sid, "run", "customers", pa.Table.from_pylist(full, schema=OUTCOME_SCHEMA))


def pending(state: State) -> dict[str, int]:
    """The fingerprint of each row about to be sent."""
    rows = state.con.execute(f"SELECT __key, __fingerprint FROM {diff.CHANGES}").fetchall()
    return dict(rows)


# -- B8: a documented, stable fingerprint --------------------------------------------------


def test_fingerprints_are_md5_of_a_canonical_text_with_golden_values() -> None:
    """If a DuckDB upgrade changed how values are written as text, every row would be sent
    again: these golden values catch it in CI before a user does. The canonical texts are
    spelled out here, independently of the SQL: U+001F between values, U+001E for NULL."""
    con = duckdb.connect()
    con.execute(
        """CREATE TABLE t AS SELECT * FROM (VALUES
            (1, 'a', NULL::VARCHAR, 1.5::DOUBLE, DATE '2024-02-29',
             TIMESTAMP '2024-01-02 03:04:05.123456', 12.50::DECIMAL(10,2), true, [1, 2],
             {'k': 'v'}),
            (2, '', 'x', -0.1::DOUBLE, NULL, NULL, NULL, false, [], NULL))
           AS v(i, s, n, d, dt, ts, dec, b, l, st)"""
    )
    columns = [(str(r[0]), str(r[1])) for r in con.execute("DESCRIBE t").fetchall()]
    sql = diff.fingerprint_sql(columns)
    found = con.execute(f"SELECT {sql} FROM t ORDER BY i", {"signature": "sig"}).fetchall()
    texts = [
        "sig\x1f1\x1fa\x1f\x1e\x1f1.5\x1f2024-02-29\x1f2024-01-02 03:04:05.123456\x1f12.50"
        '\x1ftrue\x1f[1,2]\x1f{"k":"v"}',
        "sig\x1f2\x1f\x1fx\x1f-0.1\x1f\x1e\x1f\x1e\x1f\x1e\x1ffalse\x1f[]\x1f\x1e",
    ]
    digests = [int(hashlib.md5(t.encode()).hexdigest()[:16], 16) for t in texts]
    assert digests == [10808806772376796509, 1797785556013234472]
    assert [f for (f,) in found] == digests


def test_fingerprints_tell_null_from_empty_and_column_order_apart() -> None:
    con = duckdb.connect()
    sql = diff.fingerprint_sql([("a", "VARCHAR"), ("b", "VARCHAR")])
    pairs = [("NULL", "'x'"), ("''", "'x'"), ("'x'", "NULL"), ("'x'", "''")]
    found = {
        con.execute(
            f"SELECT {sql} FROM (SELECT {a} AS a, {b} AS b)", {"signature": "s"}
        ).fetchone()[0]  # type: ignore[index]
        for a, b in pairs
    }
    assert len(found) == 4


# -- B5: keys as Klaviyo matches them ------------------------------------------------------


def test_case_variants_of_an_email_are_one_key_and_a_duplicate(
    state_path: Path, warehouse: Path
) -> None:
    model(warehouse, "UPDATE customers SET email = upper(email) WHERE id = 'C1'")
    with open_state(state_path, {"wh": warehouse}) as state:
        found = _changes(state, EMAIL_SPEC)
        assert "u1@x.com" in found and "U1@X.COM" not in found
        rows = state.con.execute(f"SELECT f0 FROM {diff.CHANGES} WHERE __key = 'u1@x.com'")
        assert rows.fetchall() == [("u1@x.com",)]  # the key is sent as Klaviyo keeps it
    model(warehouse, "INSERT INTO customers VALUES ('C77', ' u2@X.com ', 'X', 0)")
    with open_state(state_path, {"wh": warehouse}) as state:
        assert _changes(state, EMAIL_SPEC)["u2@x.com"] == "duplicate_key"


def test_phone_keys_lose_the_separators_people_write_in_them(
    state_path: Path, warehouse: Path
) -> None:
    spec = dataclasses.replace(
        SPEC,
        key_column="phone",
        key_field="phone_number",
        fields=(FieldMap("phone", "phone_number"),),
    )
    model(
        warehouse,
        "ALTER TABLE customers ADD COLUMN phone VARCHAR;"
        "UPDATE customers SET phone = '+1 (415) 555-01' || lpad(i::VARCHAR, 2, '0') "
        "FROM (SELECT id AS k, row_number() OVER () AS i FROM customers) WHERE id = k",
    )
    with open_state(state_path, {"wh": warehouse}) as state:
        assert "+141555501" + "01" in _changes(state, spec)


def _changes(state: State, spec: SyncSpec, sid: str = SID) -> dict[str, str]:
    diff.compute(state.con, spec, sid)
    found = f"SELECT __key, __change FROM {diff.CHANGES} WHERE __change <> 'memo'"
    return dict(state.con.execute(found).fetchall())


# -- B2: refusals stay visible; some come back every run -----------------------------------


def test_a_refusal_that_may_pass_is_tried_every_run_others_wait_for_a_change(
    state_path: Path, warehouse: Path
) -> None:
    with open_state(state_path, {"wh": warehouse}) as state:
        diff.compute(state.con, SPEC, SID)
        prints = pending(state)
        commit(
            state,
            [
                {
                    "key": "C1",
                    "outcome": "rejected",
                    "fingerprint": prints["C1"],
                    "code": "not_found",
                    "reason": "no profile",
                    "retry": True,
                },
                {
                    "key": "C2",
                    "outcome": "rejected",
                    "fingerprint": prints["C2"],
                    "code": "invalid",
                    "reason": "bad email",
                    "retry": False,
                },
            ],
        )
        assert changes(state)["C1"] == "add"
        assert "C2" not in changes(state)  # waits for its row to change
        assert diff.standing_rejects(state.con, SID) == 1  # C2 is counted still


def test_a_row_back_at_its_accepted_version_drops_the_refusal(
    state_path: Path, warehouse: Path
) -> None:
    with open_state(state_path, {"wh": warehouse}) as state:
        changes(state)
        accept_all(state)
    model(warehouse, "UPDATE customers SET email = 'bad' WHERE id = 'C3'")
    with open_state(state_path, {"wh": warehouse}) as state:
        diff.compute(state.con, SPEC, SID)
        commit(
            state,
            [
                {
                    "key": "C3",
                    "outcome": "rejected",
                    "in_snapshot": True,
                    "fingerprint": pending(state)["C3"],
                    "code": "invalid",
                    "reason": "bad",
                }
            ],
        )
        assert changes(state) == {}
        assert diff.standing_rejects(state.con, SID) == 1
    model(warehouse, "UPDATE customers SET email = 'u3@x.com' WHERE id = 'C3'")
    with open_state(state_path, {"wh": warehouse}) as state:
        assert changes(state) == {"C3": "settle"}
        commit(state, [{"key": "C3", "outcome": "settled", "in_snapshot": True}])
        assert changes(state) == {}
        assert diff.standing_rejects(state.con, SID) == 0


# -- B10: migrations only add columns; every INSERT names its own -------------------------


def test_commits_survive_a_future_migration_that_adds_columns(
    state_path: Path, warehouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = state_module.SCHEMA_VERSION + 1
    future = {
        **state_module._MIGRATIONS,
        version: [
            f"ALTER TABLE {table} ADD COLUMN someday VARCHAR"
            for table in ("syncs", "snapshot", "runs", "rejects", "journal", "jobs")
        ],
    }
    monkeypatch.setattr(state_module, "_MIGRATIONS", future)
    monkeypatch.setattr(state_module, "SCHEMA_VERSION", version)
    with open_state(state_path, {"wh": warehouse}) as state:
        identity = SyncIdentity.of(SPEC, "dev", "http://k", "ACCT01")
        state.register(identity, SPEC)
        run = state.start_run(identity.sid, "customers", full_refresh=False)
        diff.compute(state.con, SPEC, identity.sid)
        prints = pending(state)
        state.journal(identity.sid, "u1", _journal([("C1", prints["C1"])]))
        state.job_recorder(identity.sid)("u1", "job-1")
        commit(
            state,
            _c1_accepted_c2_refused(prints),
            sid=identity.sid,
        )
        state.finish_run(run, RunCounts(added=1), "ok")
        waiting = {f"C{i}" for i in range(10)} - {"C1", "C2"}  # C1 accepted, C2 refused
        assert set(_changes(state, SPEC, identity.sid)) == waiting


_TABLE_SQL = f"""SELECT sql FROM duckdb_tables()
    WHERE database_name = '{CATALOG}' AND table_name = $1"""


def test_a_state_of_an_older_version_keeps_every_row_as_values_move_to_zstd(
    state_path: Path, warehouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 7 rebuilds the snapshot and the journal to store values with ZSTD (DuckDB
    cannot alter a column's compression): every row and column comes through, in flight
    ones too, and new commits are written with ZSTD."""
    read = {t: f"SELECT * FROM {CATALOG}.{t} ORDER BY ALL" for t in ("snapshot", "journal")}
    with monkeypatch.context() as older:
        older.setattr(state_module, "SCHEMA_VERSION", 6)
        with open_state(state_path, {"wh": warehouse}) as state:
            diff.compute(state.con, SPEC, SID)
            prints = pending(state)
            commit(state, _c1_accepted_c2_refused(prints))
            state.journal(SID, "u1", _journal([("C3", prints["C3"])]))
            before = {t: state.con.execute(sql).fetchall() for t, sql in read.items()}
            assert "ZSTD" not in state.con.execute(_TABLE_SQL, ["snapshot"]).fetchall()[0][0]
    assert len(before["snapshot"]) == 2 and len(before["journal"]) == 1
    with open_duckdb(state_path, {"wh": warehouse}) as wh:
        assert {t: wh.con.execute(sql).fetchall() for t, sql in read.items()} == before
        for table in ("snapshot", "journal"):
            assert (
                "accepted_values VARCHAR USING COMPRESSION ZSTD"
                in (wh.con.execute(_TABLE_SQL, [table]).fetchall()[0][0])
            )
        wh.budget_for("send")
        wh.commit(SID, "run", "customers", _accepted(0, DuckDBWarehouse.commit_records))
        assert ("ZSTD",) in wh.con.execute(_COMPRESSION).fetchall()  # beside the old 2 rows


def test_a_state_file_whose_format_predates_zstd_is_migrated_without_it(
    state_path: Path, warehouse: Path
) -> None:
    """A file keeps the storage format it was made in (DuckDB 1.x made the oldest one by
    default), and that format cannot hold ZSTD: the rebuild is skipped there and the state
    works as before, instead of failing to open."""
    state_path.parent.mkdir(parents=True)
    with duckdb.connect() as con:
        con.execute(f"ATTACH '{state_path}' AS old (STORAGE_VERSION 'v1.0.0')")
    with open_duckdb(state_path, {"wh": warehouse}) as wh:
        assert wh.schema_version() == state_module.SCHEMA_VERSION
        assert "ZSTD" not in wh.con.execute(_TABLE_SQL, ["snapshot"]).fetchall()[0][0]
        wh.budget_for("send")
        wh.commit(SID, "run", "customers", _accepted(0, DuckDBWarehouse.commit_records))
        assert wh.accepted_count(SID) == DuckDBWarehouse.commit_records
        assert wh.con.execute(_COMPRESSION).fetchall() != [("ZSTD",)]


def _c1_accepted_c2_refused(prints: dict[str, int]) -> list[dict[str, object]]:
    """Outcomes: C1 accepted (its values unknown), C2 refused."""
    refused = {"key": "C2", "outcome": "rejected", "fingerprint": prints["C2"]}
    return [
        {"key": "C1", "outcome": "accepted", "fingerprint": prints["C1"]},
        {**refused, "code": "x", "reason": "y"},
    ]


def _journal(rows: list[tuple[str, int]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "position": i,
                "key": key,
                "fingerprint": fp,
                "in_snapshot": False,
                "accepted_values": "{}",
            }
            for i, (key, fp) in enumerate(rows)
        ],
        schema=JOURNAL_SCHEMA,
    )


# -- D5/B7: the journal ---------------------------------------------------------------------


def test_the_journal_keeps_unanswered_units_with_their_job_until_answered(
    state_path: Path, warehouse: Path
) -> None:
    with open_state(state_path, {"wh": warehouse}) as state:
        diff.compute(state.con, SPEC, SID)
        prints = pending(state)
        state.journal(SID, "u1", _journal([("C1", prints["C1"]), ("C2", prints["C2"])]))
        state.journal(SID, "u2", _journal([("C3", prints["C3"])]))
        state.job_recorder(SID)("u1", "job-1")
    with open_state(state_path, {"wh": warehouse}) as state:  # the next run
        units = {u.unit: u for u in state.journaled_units(SID)}
        assert units["u1"].job_id == "job-1" and units["u2"].job_id is None
        assert [r["key"] for r in units["u1"].records] == ["C1", "C2"]
        commit(state, [{"key": "C1", "outcome": "accepted", "fingerprint": prints["C1"]}])
        assert [r["key"] for r in state.journaled_units(SID)[0].records] == ["C2"]
        state.drop_journal(SID, ["u1", "u2"])
        assert state.journaled_units(SID) == []
        assert state.con.execute(f"SELECT count(*) FROM {CATALOG}.jobs").fetchall() == [(0,)]


def test_rows_of_a_followed_job_are_accepted_with_their_values_unknown(
    state_path: Path, warehouse: Path
) -> None:
    """A bulk job's rows are journaled without their values where they go with the answer
    (`values_until_commit`); a run after a crash that follows the job records them from the
    journal alone. They count as accepted (a plan shows no old values for them, and a
    list's reconcile adds them back if they go missing); a refused row does not."""
    with open_state(state_path, {"wh": warehouse}) as state:
        diff.compute(state.con, SPEC, SID)
        prints = pending(state)
        journaled = _journal([(k, prints[k]) for k in ("C1", "C2", "C3")])
        values = journaled.schema.get_field_index("accepted_values")
        unknown = pa.nulls(journaled.num_rows, pa.string())
        state.journal(SID, "u1", journaled.set_column(values, "accepted_values", unknown))
        commit(
            state,
            [
                *_c1_accepted_c2_refused(prints),
                {
                    "key": "C3",
                    "outcome": "accepted",
                    "fingerprint": prints["C3"],
                    "accepted_values": '{"email": "c3@example.com"}',
                },
            ],
        )
        assert state.accepted_values(SID, ["C1", "C2", "C3"]) == {
            "C1": {},
            "C3": {"email": "c3@example.com"},
        }
        assert state.accepted_count(SID) == 2


def test_the_diff_has_every_core_and_the_sending_one_thread(
    state_path: Path, warehouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While sending, DuckDB's work is a few statements a job and a first sync's rows read
    as they go: a second thread only split it, at a cost. The diff keeps every core."""
    threads = "SELECT current_setting('threads')"
    during: list[int] = []
    compute = diff.compute

    def watched(con: duckdb.DuckDBPyConnection, *args: object) -> object:
        during.append(con.execute(threads).fetchall()[0][0])
        return compute(con, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(diff, "compute", watched)
    with open_duckdb(state_path, {"wh": warehouse}) as wh:
        [(default,)] = wh.con.execute(threads).fetchall()
        wh.diff(SPEC, SID, [])
        assert during == [default]
        assert wh.con.execute(threads).fetchall() == [(state_module.SEND_THREADS,)] == [(1,)]
        wh.diff(SPEC, SID, [])
        assert during == [default, default]


def test_a_commit_of_a_full_batch_writes_its_rows_into_the_file_not_the_log(
    state_path: Path, warehouse: Path
) -> None:
    """A commit of `commit_records` rows is one full DuckDB row group, which DuckDB writes
    straight into the state file, compressed, instead of into the write-ahead log first (and
    a checkpoint compressing it later): a third of the state's CPU in a first sync. Exactly
    one: a part-filled group beside it would cost checkpoints merging it."""
    rows = DuckDBWarehouse.commit_records
    groups = f"""SELECT row_group_id, sum(count) FROM pragma_storage_info(
        '{state_module.CATALOG}.snapshot')
        WHERE column_name = 'key' AND segment_type = 'VARCHAR' GROUP BY ALL"""
    with open_duckdb(state_path, {"wh": warehouse}) as wh:
        wh.budget_for("send")
        wh.commit(SID, "run", "customers", _accepted(0, rows))
        assert wh.accepted_count(SID) == rows
        logged = Path(f"{state_path}.wal").stat().st_size
        assert wh.con.execute(groups).fetchall() == [(0, rows)]
        # Values with ZSTD: with DuckDB's own choice, compressing them was most of the commit.
        assert wh.con.execute(_COMPRESSION).fetchall() == [("ZSTD",)]
    assert logged < rows * len(_VALUES) / 4


_COMPRESSION = f"""SELECT DISTINCT compression FROM pragma_storage_info('{CATALOG}.snapshot')
    WHERE column_name = 'accepted_values' AND segment_type = 'VARCHAR'"""


def test_a_run_checkpoints_its_writes_before_it_records_itself(
    state_path: Path, warehouse: Path
) -> None:
    """Commits of different sizes can leave part-filled row groups side by side, which
    DuckDB merges only at a checkpoint after the one that wrote them. The state is
    checkpointed as a run ends, before the run's own record, so that the closing checkpoint
    merges them: otherwise the next run's did, a no-op's 1.3 s more after a first sync of
    1M or 10M profiles. What is left in the log then is the run's record alone."""
    wal = Path(f"{state_path}.wal")
    with open_duckdb(state_path, {"wh": warehouse}) as wh:
        run = wh.start_run(SID, "customers", full_refresh=False)
        wh.commit(SID, run, "customers", _accepted(0, 20_000))
        assert wal.stat().st_size > 20_000 * len(_VALUES)
        wh.finish_run(run, RunCounts(added=20_000), "ok")
        assert wal.stat().st_size < 64 * 1024


_VALUES = '{"email":"someone.with.a.long.address@example.com","first_name":"Ada"}'


def _accepted(first: int, rows: int) -> pa.Table:
    """`rows` new rows accepted, keys from `first` on."""
    accepted = pa.table(
        {
            "key": pa.array([f"K{i:09d}" for i in range(first, first + rows)]),
            "outcome": pa.repeat("accepted", rows),
            "fingerprint": pa.array(range(rows), pa.uint64()),
            "accepted_values": pa.repeat(_VALUES, rows),
            "in_snapshot": pa.repeat(False, rows),
        }
    )
    return _conform(accepted, OUTCOME_SCHEMA)


def test_waiting_for_klaviyo_the_state_checkpoints_its_log_once_it_is_worth_it(
    state_path: Path, warehouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`idle` (the sync waits for the rate limit) checkpoints the write-ahead log into the
    state file once it holds `IDLE_CHECKPOINT_BYTES`, so that DuckDB's own checkpoint does
    not stall a commit and every sender recording its job's id. Below that it leaves the
    log; a dry run's state is never written."""
    wal = Path(f"{state_path}.wal")
    with open_state(state_path, {"wh": warehouse}) as state:
        diff.compute(state.con, SPEC, SID)
        prints = pending(state)
        state.journal(SID, "u1", _journal([("C1", prints["C1"]), ("C2", prints["C2"])]))
        logged = wal.stat().st_size
        monkeypatch.setattr(state_module, "IDLE_CHECKPOINT_BYTES", logged + 1)
        state.idle()
        assert wal.stat().st_size == logged
        monkeypatch.setattr(state_module, "IDLE_CHECKPOINT_BYTES", logged)
        state.idle()
        assert not wal.exists() or wal.stat().st_size == 0
        state.idle()  # nothing logged since: nothing to do
    # A run killed with its log unwritten; a dry run after it reads the log, writes nothing.
    killed = f"""import duckdb, os
con = duckdb.connect({str(state_path)!r})
con.execute("SET wal_autocheckpoint = '1GB'")
con.execute("UPDATE journal SET unit = 'u2'")
os._exit(0)"""
    subprocess.run([sys.executable, "-c", killed], check=True)
    logged = wal.stat().st_size
    with open_state(state_path, {"wh": warehouse}, read_only=True) as state:
        monkeypatch.setattr(state_module, "IDLE_CHECKPOINT_BYTES", 0)
        state.idle()
        assert [u.unit for u in state.journaled_units(SID)] == ["u2"]
    assert wal.stat().st_size == logged


def test_an_event_in_flight_carries_its_exact_body_into_the_next_diff(
    state_path: Path, warehouse: Path
) -> None:
    spec = dataclasses.replace(SPEC, object="event", behavior="send", key_field="unique_id")
    with open_state(state_path, {"wh": warehouse}) as state:
        rows = _journal([("C1", 1)]).to_pylist()
        rows[0]["body"] = '["{}","{\\"sent\\":1}"]'
        state.journal(SID, "u1", pa.Table.from_pylist(rows, schema=JOURNAL_SCHEMA))
        diff.compute(state.con, spec, SID)
        sent = dict(state.con.execute(f"SELECT __key, __sent FROM {diff.CHANGES}").fetchall())
        assert sent["C1"] == rows[0]["body"] and sent["C2"] is None


# -- B6: the account is part of a sync's identity -----------------------------------------


def test_a_state_from_before_accounts_is_adopted_by_the_keys_account(
    state_path: Path, warehouse: Path
) -> None:
    legacy = SyncIdentity.of(SPEC, "dev", "http://k", None)
    with open_state(state_path, {"wh": warehouse}) as state:
        state.register(legacy, SPEC)
        diff.compute(state.con, SPEC, legacy.sid)
        commit(state, [{"key": "C1", "outcome": "accepted", "fingerprint": 7}], sid=legacy.sid)
        mine = SyncIdentity.of(SPEC, "dev", "http://k", "ACCT01")
        assert state.resolved(mine, SPEC) == legacy.sid  # what a dry run reads
        state.register(mine, SPEC)
        assert state.con.execute(f"SELECT sync_id, account_id FROM {CATALOG}.syncs").fetchall() == [
            (mine.sid, "ACCT01")
        ]
        assert state.accepted_count(mine.sid) == 1
        unknown = SyncIdentity.of(SPEC, "dev", "http://k", None)  # a plan that did not ask
        assert state.resolved(unknown, SPEC) == mine.sid  # the one sync there is
        other = SyncIdentity.of(SPEC, "dev", "http://k", "OTHER2")
        state.register(other, SPEC)  # another account adopts nothing: it starts empty
        assert state.accepted_count(other.sid) == 0 and other.sid != mine.sid
        assert len(state.accounts(SPEC, "dev", "http://k")) == 2  # a plan must ask now


# -- B8 upgrade: a state fingerprinted by hash() is carried over without sending -----------


def test_an_older_sync_is_rebased_so_only_rows_that_changed_are_sent(
    state_path: Path, warehouse: Path
) -> None:
    with open_state(state_path, {"wh": warehouse}) as state:
        identity = SyncIdentity.of(EMAIL_SPEC, "dev", "http://k", "A")
        state.register(identity, EMAIL_SPEC)
        sid = identity.sid
        # As versions before md5-v1 left it: raw keys (one in capitals), hash() fingerprints.
        state.con.execute(
            f"""INSERT INTO {CATALOG}.snapshot (sync_id, key, fingerprint, updated_at)
                SELECT $1, CASE WHEN id = 'C1' THEN upper(email) ELSE email END,
                       hash($2, email, id), now()
                FROM wh.customers""",
            [sid, EMAIL_SPEC.signature],
        )
        state.con.execute(f"UPDATE {CATALOG}.syncs SET fingerprint_version = NULL")
    model(warehouse, "UPDATE customers SET id = 'C-changed' WHERE email = 'u4@x.com'")
    with open_state(state_path, {"wh": warehouse}) as state:
        assert state.needs_rebase(sid)
        with state.transaction() as writer:
            assert diff.rebase(writer, EMAIL_SPEC, sid) == 9
            state.rebased(sid)
        assert not state.needs_rebase(sid)
        assert _changes(state, EMAIL_SPEC, sid) == {"u4@x.com": "update"}


# -- D7 and D4: honest state errors, and an empty state file ------------------------------


@pytest.mark.parametrize(
    ("error", "says", "never"),
    [
        ('IO Error: Could not set lock on file "s": Conflicting lock is held', "in use", "damaged"),
        ("IO Error: Corrupt database file: block 12 checksum mismatch", "damaged", "in use"),
        ('IO Error: Could not write file "s": No space left on device', "disk", "--full-refresh"),
        ('IO Error: Cannot open file "s": Read-only file system', "write access", "--full-refresh"),
        ('IO Error: Cannot open file "s": Permission denied', "write access", "--full-refresh"),
    ],
)
def test_state_errors_name_the_real_cause_and_a_safe_remedy(
    error: str, says: str, never: str
) -> None:
    message = str(state_module._explain(Path("s"), duckdb.IOException(error), opening=True))
    assert says in message and never not in message


def test_a_damaged_state_file_is_not_said_to_be_in_use(state_path: Path, warehouse: Path) -> None:
    with open_state(state_path, {"wh": warehouse}) as state:
        changes(state)
        accept_all(state)
    data = bytearray(state_path.read_bytes())
    for at in range(8192, len(data), 997):
        data[at] ^= 0xFF
    state_path.write_bytes(bytes(data))
    with pytest.raises(StateError) as caught, open_state(state_path, {"wh": warehouse}) as state:
        changes(state)
    assert "in use" not in str(caught.value)
    assert str(state_path) in str(caught.value)


def test_an_empty_state_file_reads_as_no_state_and_is_not_created_early(
    state_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(StateError), open_state(state_path, {"wh": tmp_path / "missing.duckdb"}):
        pass
    assert not state_path.exists()  # a sync that cannot read its models leaves no state
    state_path.parent.mkdir(parents=True)
    duckdb.connect(str(state_path)).close()  # as an older version could leave it
    with open_state(state_path, {}, read_only=True) as state:
        assert not state.has_syncs()


def test_refusals_recorded_before_the_upgrade_that_may_pass_are_tried_again(
    state_path: Path, warehouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as older:
        older.setattr(state_module, "SCHEMA_VERSION", 3)
        with open_state(state_path, {"wh": warehouse}) as state:
            for key, code in (("C1", "not_found"), ("C2", "invalid")):
                state.con.execute(
                    f"""INSERT INTO {CATALOG}.snapshot (sync_id, key, rejected_fingerprint,
                        updated_at) VALUES ($1, $2, 1, now())""",
                    [SID, key],
                )
                state.con.execute(
                    f"""INSERT INTO {CATALOG}.rejects (run_id, sync_id, model, key, code, reason,
                        rejected_at) VALUES ('r', $1, 'customers', $2, $3, 'x', now())""",
                    [SID, key, code],
                )
    with open_state(state_path, {"wh": warehouse}) as state:
        retried = state.con.execute(
            f"SELECT key, retry_rejected FROM {CATALOG}.snapshot ORDER BY key"
        ).fetchall()
    assert retried == [("C1", True), ("C2", None)]


def test_the_diff_gets_what_the_process_leaves_of_its_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 10M rows the diff would take all DuckDB is given: it gets what is left of a 1 GB
    process beside what Python holds (dbt, when loaded), so the peak stays under 1 GB."""
    monkeypatch.delenv("DBT_KLAVIYO_MEMORY_LIMIT", raising=False)
    monkeypatch.setattr(state_module, "PROCESS_MEMORY_MB", 100_000)  # far from the floor
    before = int(state_module.diff_memory_limit().removesuffix("MB"))
    ballast = bytearray(200 * 2**20)
    ballast[:: 2**12] = b"\x01" * (len(ballast) // 2**12)  # every page resident
    after = int(state_module.diff_memory_limit().removesuffix("MB"))
    assert 180 <= before - after <= 230, (before, after)
    del ballast
    monkeypatch.setattr(state_module, "PROCESS_MEMORY_MB", 600)
    assert state_module.diff_memory_limit() == "512MB"  # never under the floor
    monkeypatch.setenv("DBT_KLAVIYO_MEMORY_LIMIT", "2GB")
    assert state_module.diff_memory_limit() == "2GB"  # the user's word, as it is
