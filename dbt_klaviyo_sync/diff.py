"""Compare a model's relation with its last-synced snapshot, in DuckDB SQL.

The work stays in DuckDB: each row's mapped columns are fingerprinted, joined with the
snapshot, and only the rows to act on are materialised into a temporary table, which the
sender then reads in Arrow batches. Python never holds the whole model. Unmapped columns
are not part of the fingerprint, so changing them sends nothing.

Each changed row gets a `__change`:
- `add`: never accepted by Klaviyo (new, or failed or rejected before and now changed);
- `update`: accepted before, and a mapped value has changed since;
- `remove`: in the snapshot but no longer in the model;
- `null_key` / `duplicate_key`: cannot be synced until the model is fixed.
A row whose current version Klaviyo already rejected is not sent again until it changes.
For deletions and events (`spec.once`) a key Klaviyo accepted is done for good: it is
never an `update` or a `remove`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from dbt_klaviyo_sync.errors import AnnotationError, AnnotationErrors, ConfigurationError
from dbt_klaviyo_sync.spec import SyncSpec
from dbt_klaviyo_sync.state import CATALOG

CHANGES = "klaviyo_changes"

#: How many rows travel from DuckDB to Python at a time.
READ_BATCH_ROWS = 10_000


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def field_column(index: int) -> str:
    """The name of a mapped field's column in the changes table: f0 is the sync key."""
    return f"f{index}"


@dataclass(frozen=True)
class ChangeCounts:
    add: int
    update: int
    remove: int
    invalid: int
    model_rows: int

    @property
    def to_send(self) -> int:
        return self.add + self.update


def _relation_columns(con: duckdb.DuckDBPyConnection, spec: SyncSpec) -> dict[str, tuple[str, str]]:
    """The relation's real column names and DuckDB types, by lower-case name (DuckDB
    ignores case)."""
    try:
        described = con.execute(f"DESCRIBE SELECT * FROM {spec.relation}").fetchall()
    except duckdb.CatalogException as exc:
        raise ConfigurationError(
            f"model '{spec.model}': its relation {spec.relation} is not in the dbt database. "
            "Run `dbt run` (or `dbt build`) for it first."
        ) from exc
    return {row[0].lower(): (row[0], row[1]) for row in described}


def column_sql(column: str, duckdb_type: str, field: str) -> str:
    """The SQL that selects a mapped column for the changes table: the column itself, or
    a cast where Arrow would not carry the DuckDB type exactly to Python (see
    `payloads.value_sql`, next to the code that reads what it selects)."""
    from dbt_klaviyo_sync.payloads import value_sql  # payloads imports this module

    return value_sql(_ident(column), duckdb_type, field)


def check_columns(con: duckdb.DuckDBPyConnection, spec: SyncSpec) -> list[tuple[str, str]]:
    """The relation's real name and type of each mapped column, in `spec.fields` order;
    raises when the model is not built or lacks an annotated column."""
    columns = _relation_columns(con, spec)
    missing = [f for f in spec.fields if f.column.lower() not in columns]
    if missing:
        raise AnnotationErrors(
            [
                AnnotationError(
                    spec.model,
                    f"the column is annotated but {spec.relation} has no such column (it has: "
                    f"{', '.join(name for name, _ in columns.values())}). Fix the annotation "
                    "or the model, "
                    "then run dbt.",
                    f.column,
                )
                for f in missing
            ]
        )
    return [columns[f.column.lower()] for f in spec.fields]


def compute(con: duckdb.DuckDBPyConnection, spec: SyncSpec, sid: str) -> ChangeCounts:
    """Materialise the rows to act on into the temporary `klaviyo_changes` table.

    One pass: the model's rows, fingerprinted with DuckDB's 64-bit `hash` of the mapped
    values (an md5 of their JSON cost five times as much), full-outer-joined with the
    snapshot's keys and fingerprints, so that added, changed and removed rows come out
    together and only they carry their values onward.

    Duplicated keys are looked for among the keys about to be sent only: finding them in
    the whole model costs a third of the diff, and a key whose copies all match what
    Klaviyo accepted has nothing to send. (The build-time check reports every duplicate.)
    """
    columns = check_columns(con, spec)
    mapped = ", ".join(
        f"{column_sql(name, kind, f.field)} AS {field_column(i)}"
        for i, ((name, kind), f) in enumerate(zip(columns, spec.fields, strict=True))
    )
    values = ", ".join(field_column(i) for i in range(len(columns)))
    key = field_column(0)
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {CHANGES} AS
        WITH model AS (
            SELECT CAST({key} AS VARCHAR) AS __key, hash($signature, {values}) AS __fingerprint,
                   {values}
            FROM (SELECT {mapped} FROM {spec.relation})
        ),
        snap AS (
            SELECT key, fingerprint, rejected_fingerprint, klaviyo_id
            FROM {CATALOG}.snapshot WHERE sync_id = $sid
        )
        SELECT CASE WHEN m.__fingerprint IS NULL THEN 'remove'
                    WHEN m.__key IS NULL THEN 'null_key'
                    WHEN s.fingerprint IS NULL THEN 'add'
                    ELSE 'update' END AS __change,
               s.key IS NOT NULL AS __in_snapshot,
               s.klaviyo_id AS __klaviyo_id,
               coalesce(m.__key, s.key) AS __key,
               coalesce(m.__fingerprint, s.fingerprint) AS __fingerprint,
               m.* EXCLUDE (__key, __fingerprint)
        FROM model AS m
        FULL OUTER JOIN snap AS s ON s.key = m.__key
        WHERE CASE WHEN m.__fingerprint IS NULL THEN NOT $once
                   WHEN m.__key IS NULL THEN TRUE
                   ELSE m.__fingerprint IS DISTINCT FROM s.fingerprint
                        AND m.__fingerprint IS DISTINCT FROM s.rejected_fingerprint
                        AND (NOT $once OR s.fingerprint IS NULL) END""",
        {"signature": spec.signature, "sid": sid, "once": spec.once},
    )
    counts = _counts(con)
    if counts.get("add") or counts.get("update"):
        model_keys = f"SELECT CAST({_ident(columns[0][0])} AS VARCHAR) AS key FROM {spec.relation}"
        con.execute(
            f"""UPDATE {CHANGES} SET __change = 'duplicate_key'
            WHERE __change IN ('add', 'update') AND __key IN (
                SELECT key FROM ({model_keys})
                WHERE key IN (SELECT __key FROM {CHANGES} WHERE __change IN ('add', 'update'))
                GROUP BY ALL HAVING count(*) > 1)"""
        )
        counts = _counts(con)
    [(model_rows,)] = con.execute(f"SELECT count(*) FROM {spec.relation}").fetchall()
    return ChangeCounts(
        add=counts.get("add", 0),
        update=counts.get("update", 0),
        remove=counts.get("remove", 0),
        invalid=counts.get("invalid", 0),
        model_rows=model_rows,
    )


def _counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    return dict(
        con.execute(
            f"""SELECT CASE WHEN __change LIKE '%_key' THEN 'invalid' ELSE __change END,
                       count(*) FROM {CHANGES} GROUP BY ALL"""
        ).fetchall()
    )


def batches(
    con: duckdb.DuckDBPyConnection, changes: tuple[str, ...], rows: int = READ_BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """Stream the changed rows of the given kinds, a batch at a time."""
    kinds = ", ".join(f"'{kind}'" for kind in changes)
    reader = con.sql(f"SELECT * FROM {CHANGES} WHERE __change IN ({kinds})").to_arrow_reader(rows)
    yield from reader
