"""The naive baseline: `naive_diff.py PROJECT SNAPSHOT`, or `naive_diff.py --save PROJECT
SNAPSHOT` to keep the model's values as that snapshot.

What a first attempt would do: pull the model's mapped columns into a Python dict, then
compare last run's values (kept locally, in a DuckDB file of their own) with it key by key.
On PostgreSQL the model comes through dbt's adapter's connection, from a server-side cursor
a chunk at a time (the bytes it took are counted); on DuckDB from the file. The snapshot
is streamed against the dict, so only the model is held whole: a kinder baseline, with
half the memory of two dicts.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import project
import pyarrow as pa

CHUNK_ROWS = 100_000
MODEL_SQL = f"select {', '.join(project.COLUMNS)} from main.customers"


def chunks(connection: Any, sql: str, server_side: bool) -> Iterator[list[tuple[Any, ...]]]:
    """A query's rows, a chunk at a time."""
    cursor = connection.cursor(name="naive_rows") if server_side else connection.cursor()
    try:
        cursor.execute(sql)
        while rows := cursor.fetchmany(CHUNK_ROWS):
            yield rows
    finally:
        cursor.close()


@contextmanager
def warehouse(directory: Path) -> Iterator[Any]:
    """A connection to the model's warehouse."""
    if project.is_postgres(directory):
        with project.dbt_adapter(directory) as (adapter, _):
            yield project.connection_of(adapter)
        return
    with duckdb.connect(str(directory / "warehouse.duckdb"), read_only=True) as connection:
        yield connection


def save(directory: Path, snapshot: Path) -> None:
    with warehouse(directory) as connection, duckdb.connect(str(snapshot)) as out:
        for at, rows in enumerate(chunks(connection, MODEL_SQL, project.is_postgres(directory))):
            columns = zip(project.COLUMNS, map(list, zip(*rows, strict=True)), strict=True)
            chunk = pa.table(dict(columns))  # noqa: F841  (DuckDB reads it by name)
            verb = "insert into snapshot" if at else "create table snapshot as"
            out.execute(f"{verb} select * from chunk")


def diff(directory: Path, snapshot: Path) -> None:
    postgres = project.is_postgres(directory)
    with warehouse(directory) as connection:
        started = time.monotonic()
        before = project.received_bytes(connection) if postgres else 0
        model = {row[0]: row for rows in chunks(connection, MODEL_SQL, postgres) for row in rows}
        received = project.received_bytes(connection) - before if postgres else None
    keys: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
    with duckdb.connect(str(snapshot), read_only=True) as local:
        for rows in chunks(local, "select * from snapshot", server_side=False):
            for row in rows:
                now = model.pop(row[0], None)
                if now is None:
                    keys["removed"].append(row[0])
                elif now != row:
                    keys["changed"].append(row[0])
    keys["added"] = list(model)
    project.report(keys, time.monotonic() - started, received)


if __name__ == "__main__":
    if sys.argv[1] == "--save":
        save(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        diff(Path(sys.argv[1]), Path(sys.argv[2]))
