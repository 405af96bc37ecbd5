"""The sync's own work, without the network: `pipeline.py --rows 1000000`.

A first full sync of the benchmark's customers model (benchmarks/project.py), through the
real runner, senders and DuckDB state, against a client that answers every request at
once from memory: every bulk job is created, complete and without import errors. What is
left is the client's CPU: the diff, shaping the rows into bulk jobs, journaling them and
committing the answers, up to the state's closing checkpoint. The process is held to
one core, and profiles/s is given per CPU-second, with and without the diff (which DuckDB
would run on every core it had). A first sync's diff is mostly done as its rows are read
(see `timed_changes`).

Of that, the shaping in Arrow (`payloads.shaped_rows`: the checks, the bodies and the
values' JSON) is timed on its own. Beside it, on the same rows and core, DuckDB's own
serialisation: each row as the JSON of its profile resource, built by `json_object`,
measured in the same run so the two compare.

The last line printed is JSON, for benchmarks/run.py. `--profile FILE` writes a cProfile
of the sync (for `python -m pstats FILE`).
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import jinja2
import project

from dbt_klaviyo_sync import cli, payloads
from dbt_klaviyo_sync.changeset import ChangeCounts, SyncIdentity
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient
from dbt_klaviyo_sync.manifest import ModelNode
from dbt_klaviyo_sync.runner import ModelSync, SyncOptions
from dbt_klaviyo_sync.spec import build_spec
from dbt_klaviyo_sync.warehouse.duckdb import DuckDBWarehouse, open_duckdb

BASE_URL = "http://127.0.0.1:9"  # never connected to


class AnsweringClient(KlaviyoClient):
    """Klaviyo as fast as it could be: each bulk job is created, complete and free of
    import errors the moment it is asked about. Only the calls a bulk upsert makes."""

    def __init__(self) -> None:
        super().__init__(BASE_URL, "pk_pipeline", None, allow_insecure=True)
        self._jobs = itertools.count()

    def call(self, operation_id: str, **_: Any) -> Any:
        self._requests += 1
        if operation_id == "bulk_import_profiles":
            return {"data": {"type": "profile-bulk-import-job", "id": f"job{next(self._jobs)}"}}
        if operation_id == "get_bulk_import_profiles_job":
            return {"data": {"attributes": {"status": "complete"}}}
        raise AssertionError(f"the pipeline benchmark does not answer {operation_id}")

    def pages(self, operation_id: str, **_: Any) -> Iterator[dict[str, Any]]:
        self._requests += 1
        return iter(())


def build_model(database: Path, rows: int) -> ModelNode:
    """The customers model of `rows` rows in a DuckDB file, as dbt would build it."""
    rendered = jinja2.Template(project.MODEL.format(last=rows - 1, grown=rows - 1)).render(
        config=lambda **_: "", var=lambda _, default: default
    )
    with duckdb.connect(str(database)) as con:
        con.execute(f"CREATE TABLE main.customers AS {rendered}")
    columns = {}
    for name, meta in project.COLUMNS.items():
        kind, value = meta.split(": ")
        columns[name] = {kind: value}
    return ModelNode(
        unique_id="model.bench.customers",
        name="customers",
        relation_name='"warehouse"."main"."customers"',
        database="warehouse",
        schema="main",
        materialized="table",
        original_file_path="models/customers.sql",
        meta={"object": "profile", "behavior": "upsert"},
        column_meta=columns,
    )


def duckdb_json_rate(database: Path) -> float:
    """Rows a second DuckDB turns into profile resources' JSON on one thread, CPU-timed."""
    place: dict[str, dict[str, str]] = {"attributes": {}, "location": {}, "properties": {}}
    for column, meta in project.COLUMNS.items():
        kind, field = meta.split(": ")
        if kind in ("field", "sync_key"):
            part, _, name = field.rpartition(".")
            place[part or "attributes"][name] = column
    pairs = {p: ", ".join(f"'{k}', {v}" for k, v in kept.items()) for p, kept in place.items()}
    body = (
        f"json_object('type', 'profile', 'attributes', json_object({pairs['attributes']}, "
        f"'location', json_object({pairs['location']}), "
        f"'properties', json_object({pairs['properties']})))"
    )
    with duckdb.connect(str(database), read_only=True) as con:
        con.execute("SET threads = 1")
        began = time.process_time()
        [(rows, _)] = con.execute(f"SELECT count(*), sum(length({body})) FROM customers").fetchall()
        return float(rows) / (time.process_time() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--profile", type=Path, help="write a cProfile of the sync here")
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})  # one core
    cli._release_large_buffers()  # the C allocator as the command sets it (Arrow's: run.py)
    with tempfile.TemporaryDirectory(prefix="klaviyo-pipeline-") as scratch:
        folder = Path(scratch)
        model = build_model(folder / "warehouse.duckdb", args.rows)
        spec = build_spec(model)
        options = SyncOptions(BASE_URL, "pk_pipeline", None, allow_insecure_http=True)
        diff_cpu = 0.0
        with open_duckdb(folder / "state.duckdb", {"warehouse": folder / "warehouse.duckdb"}) as wh:

            def timed_diff(spec: Any, sid: str, held: list[str]) -> ChangeCounts:
                nonlocal diff_cpu
                began = time.process_time()
                try:
                    return DuckDBWarehouse.diff(wh, spec, sid, held)
                finally:
                    diff_cpu += time.process_time() - began

            wh.diff = timed_diff  # type: ignore[method-assign]

            def timed_changes(kinds: tuple[str, ...]) -> Iterator[Any]:
                """The changed rows, read on the shaping thread: a first sync's diff is a
                view, its rows fingerprinted as they are read (DuckDB has one thread
                while sending, this one), so that CPU is the diff's too."""
                nonlocal diff_cpu
                rows = iter(DuckDBWarehouse.changes(wh, kinds))
                while True:
                    began = time.thread_time()
                    batch = next(rows, None)
                    diff_cpu += time.thread_time() - began
                    if batch is None:
                        return
                    yield batch

            wh.changes = timed_changes  # type: ignore[method-assign]
            shaping_cpu = 0.0
            shape = payloads.shaped_rows

            def timed_shaping(*shaped_args: Any) -> Any:
                nonlocal shaping_cpu
                began = time.thread_time()  # on the shaping thread: its own CPU
                try:
                    return shape(*shaped_args)
                finally:
                    shaping_cpu += time.thread_time() - began

            payloads.shaped_rows = timed_shaping
            client = AnsweringClient()
            identity = SyncIdentity.of(spec, project.TARGET, BASE_URL, "pipeline")
            sync = ModelSync(wh, client, spec, identity, options)
            profiler = cProfile.Profile() if args.profile else None
            cpu, wall = time.process_time(), time.monotonic()
            if profiler:
                profiler.enable()
            result = sync.run()
            recorded = wh.accepted_count(sync.sid)
        # Closed: the state's checkpoint wrote into the file what commits left in its
        # write-ahead log, the last of their work.
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        counts = result.counts
        if counts.added != args.rows or counts.failed or counts.rejected or recorded != args.rows:
            sys.exit(f"not every row was accepted and recorded: {counts}; {recorded:,} in state")
        rest = cpu - diff_cpu
        engine = duckdb_json_rate(folder / "warehouse.duckdb")
        print(
            f"{args.rows:,} profiles, first full sync without network, on one core: "
            f"{wall:.2f} s wall, {cpu:.2f} CPU-s ({diff_cpu:.2f} in the diff), "
            f"{client.requests_made:,} requests\n"
            f"pipeline (shaping + commit): {args.rows / rest:,.0f} profiles/s; "
            f"with the diff: {args.rows / cpu:,.0f} profiles/s\n"
            f"of which shaping in Arrow: {args.rows / shaping_cpu:,.0f} profiles/s\n"
            f"DuckDB's json_object, the same rows as profile resources: {engine:,.0f} rows/s"
        )
        figures = {"rows": args.rows, "pipeline": args.rows / rest, "with_diff": args.rows / cpu}
        print(json.dumps({**figures, "shaping": args.rows / shaping_cpu, "duckdb_json": engine}))


if __name__ == "__main__":
    main()
