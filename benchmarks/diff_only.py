"""Our diff alone, on the benchmark project: `diff_only.py PROJECT STATE BASE_URL`.

Runs in a process of its own so that its peak memory is its own. The diff, then the rows
a sync reads streamed to Python, then those of the rows that left the model (to compare
with the baseline's; a sync of an upsert only counts them). Nothing is written: on DuckDB
it reads the state file STATE (opened read-only), on PostgreSQL the state schema of the
warehouse through dbt's adapter, as a dry run does (STATE is not used), counting the
bytes that left the warehouse for the diff and the rows a sync reads. BASE_URL is the
emulator's, part of the sync's identity.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import project

from dbt_klaviyo_sync.changeset import CHANGE, KEY
from dbt_klaviyo_sync.manifest import ModelNode, read_models
from dbt_klaviyo_sync.spec import build_spec
from dbt_klaviyo_sync.warehouse import Warehouse


@contextmanager
def opened(directory: Path, state: Path) -> Iterator[tuple[Warehouse, ModelNode, Any]]:
    """The warehouse as a dry run opens it, the model, and the connection whose bytes are
    counted (none on DuckDB, which runs in this process)."""
    if not project.is_postgres(directory):
        from dbt_klaviyo_sync.warehouse.duckdb import open_duckdb

        [model] = read_models(directory / "target" / "manifest.json")
        databases = {"warehouse": directory / "warehouse.duckdb"}
        with open_duckdb(state, databases, read_only=True) as duck:
            yield duck, model, None
        return
    from dbt_klaviyo_sync.warehouse.adapter import AdapterWarehouse

    with project.dbt_adapter(directory) as (adapter, model):
        found = AdapterWarehouse(adapter, dry_run=True)
        try:
            yield found, model, project.connection_of(adapter)
        finally:
            found.close()


#: The change kinds a sync of an upsert reads from the warehouse (the runner's), in order:
#: rows that left the model are only counted and forgotten there, never read.
SYNC_READS = (("settle", "forget"), ("add", "update", "null_key", "duplicate_key"))


def main(directory: Path, state: Path, base_url: str) -> None:
    keys: dict[str, list[str]] = {}

    def read(kinds: tuple[str, ...]) -> None:
        for batch in warehouse.changes(kinds):
            changes = batch.column(CHANGE).to_pylist()
            for change, key in zip(changes, batch.column(KEY).to_pylist(), strict=True):
                keys.setdefault(change, []).append(key)

    with opened(directory, state) as (warehouse, model, connection):
        spec = build_spec(model)
        [sid] = warehouse.accounts(spec, project.TARGET, base_url)
        started = time.monotonic()
        before = project.received_bytes(connection) if connection else 0
        counts = warehouse.diff(spec, sid, [])
        for kinds in SYNC_READS:
            read(kinds)
        received = project.received_bytes(connection) - before if connection else None
        read(("remove",))  # to compare them with the baseline's
        seconds = time.monotonic() - started
    streamed = {kind: len(keys.get(kind, [])) for kind in ("add", "update", "remove")}
    counted = {"add": counts.add, "update": counts.update, "remove": counts.remove}
    if streamed != counted:
        sys.exit(f"the diff counted {counted} but streamed {streamed}")
    named = {kind: keys.pop(change, []) for kind, change in project.KINDS.items()}
    project.report(named | keys, seconds, received)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
