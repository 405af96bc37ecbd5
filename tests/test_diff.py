"""The diff in DuckDB and the state commit, without dbt or HTTP."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from dbt_klaviyo_sync.changeset import OUTCOME_SCHEMA, sync_key
from dbt_klaviyo_sync.spec import FieldMap, SyncSpec
from dbt_klaviyo_sync.warehouse.duckdb import diff
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
    rows = state.con.execute(f"SELECT __key, __change FROM {diff.CHANGES}").fetchall()
    return {key: change for key, change in rows}


def accept_all(state: State, outcome: str = "accepted") -> None:
    """Commit every pending add/update as Klaviyo's answer would."""
    rows = []
    for batch in diff.batches(state.con, ("add", "update")):
        for row in batch.to_pylist():
            rows.append(
                {
                    "key": row["__key"],
                    "outcome": outcome,
                    "fingerprint": row["__fingerprint"],
                    "accepted_values": "{}",
                    "in_snapshot": row["__in_snapshot"],
                    "code": "x",
                    "reason": "because",
                }
            )
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
