"""Read the run history and the rejects back out of the state, for `dbt-klaviyo status`
and `dbt-klaviyo rejects`. The same tables are documented for users to query in SQL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.csv as pacsv

from dbt_klaviyo_sync.changeset import RUN_COLUMNS
from dbt_klaviyo_sync.errors import NeverSynced
from dbt_klaviyo_sync.warehouse import ReasonGroup, reason_groups, reason_groups_sql
from dbt_klaviyo_sync.warehouse.duckdb.state import CATALOG, State

_LAST_RUNS = f"""
    SELECT model, started_at, round(epoch(finished_at - started_at), 1) AS seconds, status,
           added, updated, removed, unchanged, rejected, failed, requests,
           round(rate_limit_seconds, 1) AS rate_limit_seconds, error
    FROM {CATALOG}.runs
    WHERE $model IS NULL OR model = $model
    QUALIFY row_number() OVER (PARTITION BY model ORDER BY started_at DESC) <= $runs
    ORDER BY model, started_at DESC"""

# Outstanding rejects: records whose current version was refused (the snapshot keeps its
# fingerprint until the row changes), with the latest reason given; plus the rows the
# model's last run could not send at all (NULL or duplicated keys), which are in no snapshot.
_OUTSTANDING = f"""
    WITH latest AS (
        SELECT * FROM {CATALOG}.rejects WHERE model = $model
        QUALIFY row_number() OVER (PARTITION BY sync_id, key ORDER BY rejected_at DESC) = 1
    ),
    last_runs AS (
        SELECT arg_max(run_id, started_at) AS run_id FROM {CATALOG}.runs
        WHERE model = $model GROUP BY sync_id
    )
    SELECT l.model, l.key, l.column_name, l.field, l.code, l.reason, l.rejected_at
    FROM latest AS l
    JOIN {CATALOG}.snapshot AS s
      ON s.sync_id = l.sync_id AND s.key = l.key AND s.rejected_fingerprint IS NOT NULL
    UNION ALL
    SELECT r.model, r.key, r.column_name, r.field, r.code, r.reason, r.rejected_at
    FROM {CATALOG}.rejects AS r
    LEFT JOIN {CATALOG}.snapshot AS s ON s.sync_id = r.sync_id AND s.key = r.key
    WHERE r.run_id IN (SELECT run_id FROM last_runs) AND s.key IS NULL
    ORDER BY rejected_at DESC, key"""

_EVERY_REJECT = f"""
    SELECT model, key, column_name, field, code, reason, rejected_at
    FROM {CATALOG}.rejects WHERE model = $model ORDER BY rejected_at DESC, key"""


def last_runs(state: State, model: str | None, runs: int) -> list[dict[str, Any]]:
    """The last `runs` runs of each synced model (or of one), newest first."""
    if model is not None:
        _require_synced(state, model)
    rows = state.con.execute(_LAST_RUNS, {"model": model, "runs": runs}).fetchall()
    return [dict(zip(RUN_COLUMNS, row, strict=True)) for row in rows]


@dataclass(frozen=True)
class Rejects:
    """A model's rejects, as a query to count, page through or export."""

    state: State
    model: str
    every: bool

    def _run(self, sql: str) -> duckdb.DuckDBPyConnection:
        query = _EVERY_REJECT if self.every else _OUTSTANDING
        return self.state.con.execute(sql.format(query=query), {"model": self.model})

    def count(self) -> int:
        [(found,)] = self._run("SELECT count(*) FROM ({query})").fetchall()
        return int(found)

    def first(self, limit: int) -> list[tuple[Any, ...]]:
        return self._run(f"SELECT * FROM ({{query}}) LIMIT {int(limit)}").fetchall()

    def by_reason(self, examples: int) -> list[ReasonGroup]:
        sql = reason_groups_sql("{query}", examples)
        return reason_groups(self._run(sql).fetchall())

    def export_csv(self, path: Path) -> None:
        """Stream every reject to a CSV file with a header, however many there are."""
        query = _EVERY_REJECT if self.every else _OUTSTANDING
        reader = self.state.con.sql(query, params={"model": self.model}).to_arrow_reader(10_000)
        with pacsv.CSVWriter(str(path), reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)


def rejects(state: State, model: str, every: bool = False) -> Rejects:
    """The model's outstanding rejects (or, with `every`, every reject ever logged)."""
    _require_synced(state, model)
    return Rejects(state, model, every)


def _require_synced(state: State, model: str) -> None:
    [(known,)] = state.con.execute(
        f"SELECT count(*) FROM {CATALOG}.syncs WHERE model = $1", [model]
    ).fetchall()
    if not known:
        names = state.con.execute(f"SELECT DISTINCT model FROM {CATALOG}.syncs").fetchall()
        raise NeverSynced(model, [name for (name,) in names])
