"""The DuckDB warehouse: the dbt database attached read-only next to a local state file,
in one DuckDB connection, so that the diff is a single SQL join and only changed rows reach
Python. `state` holds the state tables, `diff` the SQL over the models, `columns` how each
type is selected, `history` the queries of `status` and `rejects`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from dbt_klaviyo_sync.changeset import ChangeCounts, KeyProblems
from dbt_klaviyo_sync.spec import SyncSpec
from dbt_klaviyo_sync.warehouse.duckdb import diff, history
from dbt_klaviyo_sync.warehouse.duckdb.state import (
    FINGERPRINT_VERSION,
    State,
    default_path,
    open_state,
)

__all__ = ["DuckDBWarehouse", "default_path", "open_duckdb"]


class DuckDBWarehouse(State):
    """The `Warehouse` of a dbt-duckdb target: the state's own tables and writes (`State`),
    and the diff over the attached models."""

    fingerprints = FINGERPRINT_VERSION
    # Each commit scans the snapshot; one of a whole DuckDB row group of new rows (122,880)
    # writes it straight into the state file, compressed, where a smaller one writes them
    # to the write-ahead log and a checkpoint compresses them later. Whole groups only:
    # the part-filled group a larger commit leaves next to its full ones costs checkpoints
    # rewriting its neighbours to merge it (a first sync of 1M profiles: 3.4 CPU-s). (At
    # Klaviyo's steady pace `COMMIT_SECONDS` comes first; this counts when the CPU bounds.)
    commit_records = 122_880
    # The journal keeps its deleted rows until a checkpoint, and reading values back from
    # it scanned them all on every commit (2.8 s against 1.3 s at 1M rows).
    values_until_commit = True
    shaped_ahead = 1  # a 1M first sync: 18.1 s -> 16.2 s on 2 cores

    def describe(self, spec: SyncSpec) -> None:
        diff.check_columns(self.con, spec)

    def key_problems(self, spec: SyncSpec) -> KeyProblems:
        return diff.key_problems(self.con, spec)

    def readable(self, spec: SyncSpec) -> None:
        diff.relation_columns(self.con, spec)

    def rebase(self, spec: SyncSpec, sid: str) -> int | None:
        if not self.needs_rebase(sid):
            return None
        if self.read_only:
            self.in_memory()  # a dry run carries the sync over in a copy
        with self.transaction() as writer:
            carried = diff.rebase(writer, spec, sid)
            self.rebased(sid)
        return carried

    def diff(self, spec: SyncSpec, sid: str, held: list[str]) -> ChangeCounts:
        self.budget_for("diff")
        try:
            counts = diff.compute(self.con, spec, sid, held)
            if not self.read_only:
                with self.writing():
                    diff.refresh_memos(self.con, sid)
            return counts
        finally:
            self.budget_for("send")

    def model_keys(self, spec: SyncSpec) -> set[str]:
        return diff.model_keys(self.con, spec)

    def changes(self, kinds: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
        return diff.batches(self.con, kinds)

    def standing_rejects(self, sid: str) -> int:
        return diff.standing_rejects(self.con, sid)

    def forget_removed(self, sid: str) -> None:
        with self.writing():
            diff.forget_removed(self.con, sid)

    def last_runs(self, model: str | None, runs: int) -> list[dict[str, Any]]:
        return history.last_runs(self, model, runs)

    def rejects(self, model: str, every: bool = False) -> history.Rejects:
        return history.rejects(self, model, every)


@contextmanager
def open_duckdb(
    state_path: Path | None, databases: Mapping[str, Path], *, read_only: bool = False
) -> Iterator[DuckDBWarehouse]:
    """The warehouse of a dbt-duckdb target (see `state.open_state`)."""
    with open_state(state_path, databases, read_only=read_only, kind=DuckDBWarehouse) as wh:
        yield wh
