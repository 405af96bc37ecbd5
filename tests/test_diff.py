"""The diff in DuckDB and the state commit, without dbt or HTTP."""

from __future__ import annotations

import zlib
from dataclasses import replace
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from dbt_klaviyo_sync.changeset import OUTCOME_SCHEMA, sync_key
from dbt_klaviyo_sync.spec import FieldMap, SyncSpec
from dbt_klaviyo_sync.warehouse.duckdb import diff, open_duckdb
from dbt_klaviyo_sync.warehouse.duckdb.state import State, open_state

SPEC = SyncSpec(
    model="customers",
    unique_id="model.x.customers",
    relation='"wh"."main"."customers"',
    object="profile",
    behavior="upsert",
    key_column="id",
    key_field="external_id",
    fields=(
        FieldMap("id", "external_id"),
        FieldMap("email", "email"),
        FieldMap("city", "location.city"),
    ),
)
SID = "sync-1"


@pytest.fixture
def warehouse(tmp_path: Path) -> Path:
    path = tmp_path / "wh.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        """CREATE TABLE customers AS SELECT 'C' || i AS id, 'u' || i || '@x.com' AS email,
           'City' || (i % 3) AS city, i AS unmapped FROM range(10) t(i)"""
    )
    con.close()
    return path


def model(warehouse: Path, sql: str) -> None:
    con = duckdb.connect(str(warehouse))
    con.execute(sql)
    con.close()


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.duckdb"


def changes(state: State) -> dict[str, str]:
    diff.compute(state.con, SPEC, SID)
    rows = state.con.execute(
        f"SELECT __key, __change FROM {diff.CHANGES} WHERE __change <> 'memo'"
    ).fetchall()
    return {key: change for key, change in rows}


def answered(row: dict[str, object], outcome: str, code: str = "x") -> dict[str, object]:
    """A runner's outcome row for a change row: its fingerprint and memo go back."""
    return {
        "key": row["__key"],
        "outcome": outcome,
        "fingerprint": row["__fingerprint"],
        "memo": row["__memo"],
        "accepted_values": "{}",
        "in_snapshot": row["__in_snapshot"],
        "code": code,
        "reason": "because",
        "retry": code == "not_found",
    }


def accept_all(state: State, outcome: str = "accepted") -> None:
    """Commit every pending add/update as Klaviyo's answer would."""
    rows = [
        answered(row, outcome)
        for batch in diff.batches(state.con, ("add", "update"))
        for row in batch.to_pylist()
    ]
    state.commit(SID, "run-1", SPEC.model, pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA))


def test_first_diff_adds_every_row_and_an_accepted_snapshot_is_quiet(
    state_path: Path, warehouse: Path
) -> None:
    with open_state(state_path, {"wh": warehouse}) as state:
        first = changes(state)
        assert len(first) == 10 and set(first.values()) == {"add"}
        accept_all(state)
        assert changes(state) == {}


def test_only_changed_added_and_removed_keys_come_back(state_path: Path, warehouse: Path) -> None:
    with open_state(state_path, {"wh": warehouse}) as state:
        changes(state)
        accept_all(state)
    model(
        warehouse,
        """UPDATE customers SET city = 'Paris' WHERE id = 'C1';
                        UPDATE customers SET unmapped = unmapped + 100;
                        DELETE FROM customers WHERE id = 'C2';
                        INSERT INTO customers VALUES ('C99', 'new@x.com', 'Rome', 0)""",
    )
    with open_state(state_path, {"wh": warehouse}) as state:
        assert changes(state) == {"C1": "update", "C2": "remove", "C99": "add"}
        counts = diff.compute(state.con, SPEC, SID)
        assert (counts.add, counts.update, counts.remove, counts.model_rows) == (1, 1, 1, 10)


def test_a_rejected_row_is_not_resent_until_it_changes(state_path: Path, warehouse: Path) -> None:
    with open_state(state_path, {"wh": warehouse}) as state:
        changes(state)
        accept_all(state, outcome="rejected")
        assert changes(state) == {}
        rejects = state.con.execute("SELECT count(*) FROM klaviyo_sync_state.rejects").fetchall()
        assert rejects == [(10,)]
    model(warehouse, "UPDATE customers SET email = 'fixed@x.com' WHERE id = 'C3'")
    with open_state(state_path, {"wh": warehouse}) as state:
        assert changes(state) == {"C3": "add"}


def test_uncommitted_rows_are_sent_again(state_path: Path, warehouse: Path) -> None:
    with open_state(state_path, {"wh": warehouse}) as state:
        changes(state)  # nothing committed: as if every request failed or the run died
    with open_state(state_path, {"wh": warehouse}) as state:
        assert len(changes(state)) == 10


def test_null_and_duplicate_keys_are_flagged_every_run(state_path: Path, warehouse: Path) -> None:
    model(
        warehouse,
        "INSERT INTO customers VALUES (NULL, 'n@x.com', 'X', 0), ('C1', 'dup@x.com', 'Y', 0)",
    )
    with open_state(state_path, {"wh": warehouse}) as state:
        found = changes(state)
        assert found["C1"] == "duplicate_key" and found[None] == "null_key"
        counts = diff.compute(state.con, SPEC, SID)
        assert counts.invalid == 3  # both copies of C1, and the NULL


def test_forget_removed_drops_rows_so_they_are_sent_if_they_return(
    state_path: Path, warehouse: Path
) -> None:
    with open_state(state_path, {"wh": warehouse}) as state:
        changes(state)
        accept_all(state)
    model(
        warehouse,
        "CREATE TABLE gone AS SELECT * FROM customers WHERE id = 'C4';"
        "DELETE FROM customers WHERE id = 'C4'",
    )
    with open_state(state_path, {"wh": warehouse}) as state:
        assert changes(state) == {"C4": "remove"}
        diff.forget_removed(state.con, SID)
    model(warehouse, "INSERT INTO customers SELECT * FROM gone")
    with open_state(state_path, {"wh": warehouse}) as state:
        assert changes(state) == {"C4": "add"}


def test_full_refresh_forgets_fingerprints_but_keeps_klaviyo_ids(
    state_path: Path, warehouse: Path
) -> None:
    with open_state(state_path, {"wh": warehouse}) as state:
        changes(state)
        accept_all(state)
        state.forget(SID, keep_accepted=False)
        assert set(changes(state).values()) == {"add"}


def test_a_missing_column_names_model_and_column(state_path: Path, warehouse: Path) -> None:
    spec = SyncSpec(
        **{**SPEC.__dict__, "fields": (*SPEC.fields, FieldMap("phone", "phone_number"))}
    )
    with open_state(state_path, {"wh": warehouse}) as state, pytest.raises(Exception) as caught:
        diff.check_columns(state.con, spec)
    assert "model 'customers', column 'phone'" in str(caught.value)


def test_a_second_writer_is_refused_with_a_clear_message(state_path: Path, warehouse: Path) -> None:
    import subprocess
    import sys

    with open_state(state_path, {"wh": warehouse}):
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, pathlib\n"
                "from dbt_klaviyo_sync.warehouse.duckdb.state import open_state\n"
                "with open_state(pathlib.Path(sys.argv[1]), {}): pass",
                str(state_path),
            ],
            capture_output=True,
            text=True,
        )
    assert probe.returncode != 0
    assert "in use by another dbt-klaviyo sync" in probe.stderr


@pytest.mark.parametrize(
    ("key_field", "written"),
    [
        ("email", " Ann.Lee@Example.COM\t"),
        ("phone_number", " +1 (415) 555-01.00 "),
        ("external_id", " C-01 "),
    ],
)
def test_klaviyo_keys_are_normalised_as_the_diff_writes_model_keys(
    key_field: str, written: str
) -> None:
    """A reconcile matches list members with model rows by `sync_key`: it must write a key
    exactly as the diff's SQL does, or every member would look like a stray."""
    [(in_sql,)] = duckdb.sql(f"SELECT {diff.key_sql('$1', key_field)}", params=[written]).fetchall()
    assert sync_key(key_field, written) == in_sql


def test_a_first_sync_streams_the_rows_a_materialised_diff_would_hold(
    state_path: Path, warehouse: Path
) -> None:
    """A sync with nothing recorded reads its changes from a view over the model; they are
    the rows, values, fingerprints and counts the materialised diff gives (forced here by a
    held unit that holds nothing), NULL and duplicated keys (after normalising) included."""
    spec = replace(
        SPEC,
        key_column="email",
        key_field="email",
        fields=(
            FieldMap("email", "email"),
            FieldMap("id", "external_id"),
            FieldMap("city", "location.city"),
            FieldMap("spent", "properties.spent"),
            FieldMap("joined", "properties.joined"),
            FieldMap("seen", "properties.seen"),
            FieldMap("tags", "properties.tags"),
        ),
    )
    model(
        warehouse,
        """CREATE OR REPLACE TABLE customers AS SELECT 'C' || i AS id,
           CASE WHEN i % 17 = 0 THEN NULL WHEN i % 11 = 0 THEN ' U' || (i % 5) || '@X.com'
                ELSE 'u' || (i % 50) || '@x.com' END AS email,
           CASE WHEN i % 3 = 0 THEN NULL ELSE 'City' || (i % 3) END AS city,
           CAST(i / 7 AS DECIMAL(9, 2)) AS spent, DATE '2024-01-01' + CAST(i AS INTEGER) AS joined,
           TIMESTAMPTZ '2024-01-01 00:00:00+00' + INTERVAL (i) MINUTE AS seen,
           ['a', 'b' || i] AS tags, i AS unmapped FROM range(80) t(i)""",
    )

    def held(state: State) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
        described = state.con.execute(f"DESCRIBE {diff.CHANGES}").fetchall()
        rows = state.con.execute(f"SELECT * FROM {diff.CHANGES} ORDER BY ALL").fetchall()
        return [row[:2] for row in described], rows

    with open_state(state_path, {"wh": warehouse}) as state:
        streamed = diff.compute(state.con, spec, SID)
        view = held(state)
        assert diff.standing_rejects(state.con, SID) == 0
        assert list(diff.batches(state.con, ("settle", "forget", "remove"))) == []
        materialised = diff.compute(state.con, spec, SID, held=["no-such-unit"])
        table = held(state)
    assert streamed == materialised
    assert (streamed.add, streamed.invalid, streamed.model_rows) == (24, 56, 80)
    assert view == table
    kinds = {row[0] for row in view[1]}
    assert kinds == {"add", "null_key", "duplicate_key"}


# -- the memo: DuckDB's hash() beside the MD5 fingerprint ---------------------------------

SNAPSHOT = f"{diff.CATALOG}.snapshot"


def _kept_changes(state: State) -> list[tuple[object, ...]]:
    """The changes a sync acts on, every column but the memo itself."""
    return state.con.execute(
        f"SELECT * EXCLUDE (__memo) FROM {diff.CHANGES} WHERE __change <> 'memo' ORDER BY ALL"
    ).fetchall()


def _without_memos(state: State, spec: SyncSpec) -> tuple[object, list[tuple[object, ...]]]:
    """The diff as MD5 alone computes it: every stored memo put aside (so every key is
    compared in full), then put back."""
    state.con.execute(f"CREATE OR REPLACE TEMP TABLE kept AS SELECT key, memo FROM {SNAPSHOT}")
    state.con.execute(f"UPDATE {SNAPSHOT} SET memo = NULL")
    found = diff.compute(state.con, spec, SID), _kept_changes(state)
    state.con.execute(
        f"UPDATE {SNAPSHOT} AS s SET memo = k.memo FROM kept AS k WHERE s.key = k.key"
    )
    return found


def _answer(state: State, round_: int) -> None:
    """Klaviyo's answers to the pending rows, as a runner commits them (memo and all):
    most accepted, some refused (a few of them for good), some failed (no answer); rows
    back at the accepted version settled; rows that left the model forgotten."""
    rows = []
    for batch in diff.batches(state.con, ("add", "update", "settle")):
        for row in batch.to_pylist():
            luck = zlib.crc32(f"{row['__key']} {round_}".encode()) % 10
            outcome = "settled" if row["__change"] == "settle" else "accepted"
            if outcome == "accepted" and luck >= 7:
                outcome = "rejected" if luck < 9 else "failed"
            if outcome != "failed":
                rows.append(answered(row, outcome, "not_found" if luck == 7 else "invalid"))
    state.commit(SID, "run", SPEC.model, pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA))
    diff.forget_removed(state.con, SID)


#: Each round's change to the model (or to the spec, `None`: a field mapped elsewhere,
#: which changes the signature and no value).
_ROUNDS = [
    "UPDATE customers SET city = 'Paris' WHERE i % 7 = 1",
    "UPDATE customers SET city = 'City' || (i % 3) WHERE i % 7 = 1",  # back, as accepted
    "DELETE FROM customers WHERE i % 11 = 2",
    """INSERT INTO customers SELECT 'C' || i, 'u' || i || '@x.com', 'New', i, i, i
       FROM range(60, 70) t(i)""",
    "UPDATE customers SET email = NULL WHERE i % 13 = 3",
    "INSERT INTO customers SELECT * REPLACE ('Copy' AS city) FROM customers WHERE i % 17 = 4",
    "UPDATE customers SET unmapped = unmapped + 1",  # nothing mapped changes
    None,
    "UPDATE customers SET spent = spent + 1 WHERE i % 5 = 0",
    "DELETE FROM customers WHERE city = 'Copy'",
]


def test_the_memo_never_changes_what_the_diff_finds(state_path: Path, warehouse: Path) -> None:
    """Round after round of changes, refusals, failures, duplicates, NULL keys, rows that
    leave and come back and a remapped field, the diff that trusts the stored memos
    finds exactly the rows, values, fingerprints and counts that comparing every row's MD5
    finds; and it compares in full only the keys that need it."""
    model(
        warehouse,
        """CREATE OR REPLACE TABLE customers AS SELECT 'C' || i AS id,
           'u' || i || '@x.com' AS email, 'City' || (i % 3) AS city,
           CAST(i / 7 AS DECIMAL(9, 2)) AS spent, i AS unmapped, i FROM range(60) t(i)""",
    )
    spec = replace(SPEC, fields=(*SPEC.fields, FieldMap("spent", "properties.spent")))
    remapped = replace(
        spec, fields=(*spec.fields[:2], FieldMap("city", "properties.city"), spec.fields[3])
    )
    compared: list[int] = []
    with open_state(state_path, {"wh": warehouse}) as state:
        diff.compute(state.con, spec, SID)
        _answer(state, 0)
    for round_, change in enumerate(_ROUNDS, start=1):
        if change is None:
            spec = remapped
        else:
            model(warehouse, change)
        with open_state(state_path, {"wh": warehouse}) as state:
            trusted = diff.compute(state.con, spec, SID), _kept_changes(state)
            [(suspects,)] = state.con.execute(f"SELECT count(*) FROM {diff.SUSPECTS}").fetchall()
            compared.append(suspects)
            assert trusted == _without_memos(state, spec), change
            diff.compute(state.con, spec, SID)
            diff.refresh_memos(state.con, SID)
            _answer(state, round_)
    # Every key was compared in full once the field moved (the signature is in the memo's
    # salt); otherwise only new, changed and refused ones.
    remapped_round = compared.pop(_ROUNDS.index(None))
    assert remapped_round >= 60 and max(compared) < 40


def test_rows_without_a_memo_get_theirs_from_the_next_diff_that_writes(
    state_path: Path, warehouse: Path
) -> None:
    """Rows accepted before memos existed (or under another DuckDB) are compared in full
    once: a diff that may write stores their memos, and the next compares none of them. A
    dry run's diff (the state read-only) stores nothing."""
    with open_state(state_path, {"wh": warehouse}) as state:
        diff.compute(state.con, SPEC, SID)
        accept_all(state)
        state.con.execute(f"UPDATE {SNAPSHOT} SET memo = NULL")

    def diffed(read_only: bool) -> tuple[int, int, int]:
        with open_duckdb(state_path, {"wh": warehouse}, read_only=read_only) as wh:
            counts = wh.diff(SPEC, SID, [])
            [(suspects,)] = wh.con.execute(f"SELECT count(*) FROM {diff.SUSPECTS}").fetchall()
            [(memos,)] = wh.con.execute(f"SELECT count(memo) FROM {SNAPSHOT}").fetchall()
        return counts.to_send, suspects, memos

    assert diffed(read_only=True) == (0, 10, 0)
    assert diffed(read_only=False) == (0, 10, 10)
    assert diffed(read_only=False) == (0, 0, 10)
