"""Compare a model's relation with its last-synced snapshot, in DuckDB SQL.

The work stays in DuckDB: each row's mapped columns are fingerprinted, joined with the
snapshot, and only the rows to act on are materialised into a temporary table, which the
sender then reads in Arrow batches. Python never holds the whole model. Unmapped columns
are not part of the fingerprint, so changing them sends nothing.

Each changed row gets a `__change`:
- `add`: never accepted by Klaviyo (new, or failed or rejected before and now changed);
- `update`: accepted before, and a mapped value has changed since;
- `remove`: in the snapshot but no longer in the model;
- `null_key` / `duplicate_key`: cannot be synced until the model is fixed;
- `settle` / `memo`: back at the accepted version, with a refusal to forget / a memo to
  store (`refresh_memos`); nothing is sent.
A row whose current version Klaviyo already rejected is not sent again until it changes.
For deletions and events (`spec.once`) a key Klaviyo accepted is done for good: it is
never an `update` or a `remove`.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator

import duckdb
import pyarrow as pa

from dbt_klaviyo_sync.changeset import ChangeCounts, KeyProblems, field_column
from dbt_klaviyo_sync.spec import SyncSpec
from dbt_klaviyo_sync.warehouse.checks import mapped_columns, not_built, unreadable
from dbt_klaviyo_sync.warehouse.duckdb.columns import value_sql
from dbt_klaviyo_sync.warehouse.duckdb.state import CATALOG

CHANGES = "klaviyo_changes"
#: The keys whose rows the diff compares in full: those whose memo does not vouch for them.
SUSPECTS = "klaviyo_suspects"
#: A first sync's duplicated (and NULL) keys, with how many rows hold each.
DUPLICATES = "klaviyo_duplicates"
#: The only changes a first sync has: nothing was accepted, so nothing to update, remove,
#: settle or forget.
FIRST_SYNC_KINDS = ("add", "null_key", "duplicate_key")

#: How many rows travel from DuckDB to Python at a time.
READ_BATCH_ROWS = 10_000


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def relation_columns(con: duckdb.DuckDBPyConnection, spec: SyncSpec) -> dict[str, tuple[str, str]]:
    """The relation's real column names and DuckDB types, by lower-case name (DuckDB
    ignores case)."""
    unreadable(spec)
    try:
        described = con.execute(f"DESCRIBE SELECT * FROM {spec.relation}").fetchall()
    except duckdb.CatalogException as exc:
        raise not_built(spec) from exc
    return {row[0].lower(): (row[0], row[1]) for row in described}


def check_columns(con: duckdb.DuckDBPyConnection, spec: SyncSpec) -> list[tuple[str, str]]:
    """The relation's real name and type of each mapped column, in `spec.fields` order;
    raises when the model is not built or lacks an annotated column."""
    return mapped_columns(spec, relation_columns(con, spec))


def key_sql(text: str, key_field: str) -> str:
    """A sync key as Klaviyo matches it, from its text: emails without case or surrounding
    blanks, phone numbers without the spaces, dots, dashes and brackets people write in
    them. Keys, lookups and what is sent all use this form, so `x@ex.com` and `X@EX.COM`
    are one key (and two rows with them a duplicate), as they are one profile."""
    if key_field == "email":
        return f"lower(trim({text}))"
    if key_field == "phone_number":
        return rf"regexp_replace(trim({text}), '[\s().-]', '', 'g')"
    return text


def _is_nested(duckdb_type: str) -> bool:
    return "[" in duckdb_type or duckdb_type.startswith(("STRUCT", "MAP", "UNION"))


def fingerprint_sql(columns: list[tuple[str, str]], signature: str = "$signature") -> str:
    """A row's fingerprint (FINGERPRINT_VERSION md5-v1): the first 8 bytes of the MD5 of a
    canonical text, read as a big-endian unsigned 64-bit integer. The text is the spec's
    signature and each value in order, joined by U+001F, a NULL written as U+001E: so NULL
    differs from '' and the column order counts. Scalars are written as DuckDB casts them
    to VARCHAR, nested values as JSON. MD5 and those casts are documented and stable, where
    DuckDB's `hash()` may change in any release (and would re-send every row when it did).
    `columns` are the (name, type) of the selected values; `signature` is the SQL of the
    spec's signature (a parameter, or a literal where a view can hold none)."""
    texts = [
        f"coalesce({'to_json' if _is_nested(kind) else ''}({name})::VARCHAR, chr(30))"
        for name, kind in columns
    ]
    return f"('0x' || left(md5(concat_ws(chr(31), {signature}, {', '.join(texts)})), 16))::UBIGINT"


def memo_sql(con: duckdb.DuckDBPyConnection, spec: SyncSpec, columns: list[tuple[str, str]]) -> str:
    """A row's memo: DuckDB's `hash()` of the same values as its fingerprint, salted with
    everything else the fingerprint depends on (the spec's signature, the values' types,
    the session's time zone) and with this DuckDB's version and machine, as `hash()` may
    change between releases. Seven times cheaper than the MD5, it is stored beside the
    fingerprint it was computed with: where a row's memo equals the stored one, its
    fingerprint is the stored one, and only the other rows' MD5 is computed. Any change to
    the salt makes every memo differ, so the rows fall back to their MD5 (and their memo is
    computed again, `refresh_memos`). Like the fingerprint's 64 bits, a change that keeps
    the hash has a 2^-64 chance; values DuckDB holds equal hash equal (0.0 and -0.0), where
    their text, and so the MD5, would differ."""
    [(zone,)] = con.execute("SELECT current_setting('TimeZone')").fetchall()
    types = ",".join(kind for _, kind in columns)
    salt = f"memo-v1|{duckdb.__version__}|{platform.machine()}|{zone}|{spec.signature}|{types}"
    literal = "'" + salt.replace("'", "''") + "'"
    return f"hash({literal}, {', '.join(name for name, _ in columns)})"


def _selected(con: duckdb.DuckDBPyConnection, spec: SyncSpec) -> list[str]:
    """The SQL of each mapped value as the changes table carries it: `f0` the normalised
    sync key (as text), `f1`... each selected by its type."""
    columns = check_columns(con, spec)
    return [
        key_sql(f"CAST({value_sql(_ident(name), kind, f.field)} AS VARCHAR)", spec.key_field)
        if i == 0
        else value_sql(_ident(name), kind, f.field)
        for i, ((name, kind), f) in enumerate(zip(columns, spec.fields, strict=True))
    ]


def key_problems(con: duckdb.DuckDBPyConnection, spec: SyncSpec) -> KeyProblems:
    """The model's NULL and duplicated sync keys, normalised as the diff keys rows."""
    keys = f"SELECT {_selected(con, spec)[0]} AS k FROM {spec.relation}"
    duplicated = f"SELECT k FROM ({keys}) WHERE k IS NOT NULL GROUP BY k HAVING count(*) > 1"
    found = con.execute(
        f"""SELECT (SELECT count(*) FROM ({keys}) WHERE k IS NULL),
                   (SELECT count(*) FROM ({duplicated})),
                   (SELECT list(k ORDER BY k)[1:3] FROM ({duplicated}))"""
    ).fetchone()
    assert found is not None  # an aggregate always has its row
    nulls, count, examples = found
    return KeyProblems(int(nulls), int(count), tuple(examples or ()))


def _model_sql(
    con: duckdb.DuckDBPyConnection,
    spec: SyncSpec,
    selected: list[str],
    legacy: bool = False,
    signature: str = "$signature",
    keys: str = "",
) -> str:
    """The model's rows: the key `__key` (also sent as `f0`), the fingerprint, its memo
    `__memo`, the values; with `legacy`, also `__legacy`, the fingerprint versions before
    md5-v1 computed. With `keys` (a query of `__key`s), only the rows of those keys and of
    NULL keys, filtered before any fingerprint is computed."""
    projection = _projection(selected)
    typed = _typed(con, spec, projection)
    fingerprint = fingerprint_sql(typed, signature)
    values = ", ".join(field_column(i) for i in range(len(selected)))
    if legacy:
        raw = ", ".join(_ident(name) for name, _ in check_columns(con, spec))
        projection += f", hash($signature, {raw}) AS __legacy"
        values += ", __legacy"
    return f"""SELECT {field_column(0)} AS __key, {fingerprint} AS __fingerprint,
            {memo_sql(con, spec, typed)} AS __memo, {values}
        FROM (SELECT {projection} FROM {spec.relation}
              {f"WHERE {selected[0]} IS NULL OR {selected[0]} IN ({keys})" if keys else ""})"""


def _projection(selected: list[str]) -> str:
    """The selected values as the changes table names them: `f0`, `f1`, ..."""
    return ", ".join(f"{sql} AS {field_column(i)}" for i, sql in enumerate(selected))


def _typed(
    con: duckdb.DuckDBPyConnection, spec: SyncSpec, projection: str
) -> list[tuple[str, str]]:
    """The (name, DuckDB type) of each selected value."""
    typed = con.execute(f"DESCRIBE SELECT {projection} FROM {spec.relation} LIMIT 0").fetchall()
    return [(str(name), str(kind)) for name, kind, *_ in typed]


def _suspects(
    con: duckdb.DuckDBPyConnection, spec: SyncSpec, selected: list[str], sid: str
) -> None:
    """The keys to compare in full, into `klaviyo_suspects`: new, gone, refused before, or
    whose memo differs from the stored one (changed, or never memoised). A key outside it
    has every row at the fingerprint Klaviyo accepted and no refusal standing: the full
    comparison would find nothing to do for it. Only keys and memos are joined here."""
    projection = _projection(selected)
    memo = memo_sql(con, spec, _typed(con, spec, projection))
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {SUSPECTS} AS
        SELECT DISTINCT coalesce(m.__key, s.key) AS __key
        FROM (SELECT {field_column(0)} AS __key, {memo} AS __memo
              FROM (SELECT {projection} FROM {spec.relation})) AS m
        FULL OUTER JOIN (SELECT key, memo, rejected_fingerprint FROM {CATALOG}.snapshot
                         WHERE sync_id = $1) AS s ON s.key = m.__key
        WHERE m.__key IS NULL OR m.__memo IS DISTINCT FROM s.memo
           OR s.rejected_fingerprint IS NOT NULL""",
        [sid],
    )


def compute(
    con: duckdb.DuckDBPyConnection, spec: SyncSpec, sid: str, held: list[str] | None = None
) -> ChangeCounts:
    """Materialise the rows to act on into the temporary `klaviyo_changes` table.

    First the keys whose memo (`memo_sql`) does not vouch for them (`_suspects`): on a
    nightly run, the few that changed. Then one pass over those keys' rows: fingerprinted
    (`fingerprint_sql`), full-outer-joined with the snapshot's keys and fingerprints, so
    that added, changed and removed rows come out together and only they carry their
    values onward. Rows at their accepted fingerprint whose memo is missing or stale come
    out as `memo`, for `refresh_memos`. An event that an earlier run sent without seeing
    the answer carries that exact body (`__sent`), to be sent again as it was.

    Duplicated keys are looked for among the keys about to be sent only: finding them in
    the whole model costs a third of the diff, and a key whose copies all match what
    Klaviyo accepted has nothing to send. (The build-time check reports every duplicate.)

    The rows of `held` journal units (bulk jobs an earlier run created, still running in
    Klaviyo) are taken out: sending them again could land before the job and be overwritten
    by its older values. They are counted in `ChangeCounts.held`.

    A sync with nothing recorded yet (its first, or one whose state was lost) gets a view
    instead (`_first_sync`): every row is new, so nothing needs materialising.
    """
    selected = _selected(con, spec)
    _drop_changes(con)
    if not held and not _recorded(con, sid):
        return _first_sync(con, spec, selected)
    _suspects(con, spec, selected, sid)
    suspects = f"SELECT __key FROM {SUSPECTS}"
    # A row kept only for its memo carries no values: after an upgrade that is every row.
    memo_only = "m.__fingerprint = s.fingerprint AND s.rejected_fingerprint IS NULL"
    values = ", ".join(
        f"CASE WHEN {memo_only} THEN NULL ELSE m.{field_column(i)} END AS {field_column(i)}"
        for i in range(len(selected))
    )
    sent = (
        f"""SELECT key, arg_max(body, journaled_at) AS body FROM {CATALOG}.journal
            WHERE sync_id = $sid AND body IS NOT NULL GROUP BY key"""
        if spec.object == "event"
        else "SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS body WHERE false"
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {CHANGES} AS
        WITH model AS ({_model_sql(con, spec, selected, keys=suspects)}),
        snap AS (
            SELECT key, fingerprint, memo, rejected_fingerprint, retry_rejected, klaviyo_id
            FROM {CATALOG}.snapshot WHERE sync_id = $sid AND key IN ({suspects})
        ),
        sent AS ({sent})
        SELECT CASE WHEN m.__fingerprint IS NULL THEN CASE WHEN $once THEN 'forget'
                                                          ELSE 'remove' END
                    WHEN m.__key IS NULL THEN 'null_key'
                    WHEN s.fingerprint IS NULL THEN 'add'
                    WHEN {memo_only} THEN 'memo'
                    WHEN m.__fingerprint = s.fingerprint THEN 'settle'
                    ELSE 'update' END AS __change,
               s.key IS NOT NULL AS __in_snapshot,
               s.klaviyo_id AS __klaviyo_id,
               coalesce(m.__key, s.key) AS __key,
               coalesce(m.__fingerprint, s.fingerprint) AS __fingerprint,
               j.body AS __sent, m.__memo, {values}
        FROM model AS m
        FULL OUTER JOIN snap AS s ON s.key = m.__key
        LEFT JOIN sent AS j ON j.key = coalesce(m.__key, s.key)
        WHERE CASE WHEN m.__fingerprint IS NULL THEN NOT $once OR s.fingerprint IS NULL
                   WHEN m.__key IS NULL THEN TRUE
                   WHEN m.__fingerprint = s.fingerprint
                       THEN s.rejected_fingerprint IS NOT NULL OR m.__memo IS DISTINCT FROM s.memo
                   ELSE (m.__fingerprint IS DISTINCT FROM s.rejected_fingerprint
                         OR coalesce(s.retry_rejected, false))
                        AND (NOT $once OR s.fingerprint IS NULL) END""",
        {"signature": spec.signature, "sid": sid, "once": spec.once},
    )
    held_rows = _hold(con, sid, held or [])
    counts = _counts(con)
    if counts.get("add") or counts.get("update"):
        con.execute(
            f"""UPDATE {CHANGES} SET __change = 'duplicate_key'
            WHERE __change IN ('add', 'update') AND __key IN (
                SELECT {selected[0]} AS __key FROM {spec.relation}
                WHERE __key IN (SELECT __key FROM {CHANGES} WHERE __change IN ('add', 'update'))
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
        held=held_rows,
    )


def _recorded(con: duckdb.DuckDBPyConnection, sid: str) -> bool:
    """Whether the sync has anything recorded: a snapshot row, or a journaled record."""
    [(found,)] = con.execute(
        f"""SELECT EXISTS (SELECT 1 FROM {CATALOG}.snapshot WHERE sync_id = $1)
                OR EXISTS (SELECT 1 FROM {CATALOG}.journal WHERE sync_id = $1)""",
        [sid],
    ).fetchall()
    return bool(found)


def _first_sync(
    con: duckdb.DuckDBPyConnection, spec: SyncSpec, selected: list[str]
) -> ChangeCounts:
    """The changes of a sync with nothing recorded: every row of the model is an `add`, or
    a `null_key` or `duplicate_key`. Only the duplicated keys are materialised (one pass
    over the keys); the changes are a view over the model, fingerprinted as they are read,
    so a first sync of 10M rows starts sending at once and never holds them all."""
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {DUPLICATES} AS
            SELECT __key, count(*) AS copies
            FROM (SELECT {selected[0]} AS __key FROM {spec.relation})
            GROUP BY ALL HAVING count(*) > 1 OR __key IS NULL"""
    )
    signature = "'" + spec.signature.replace("'", "''") + "'"
    con.execute(
        f"""CREATE TEMP VIEW {CHANGES} AS
        SELECT CASE WHEN m.__key IS NULL THEN 'null_key'
                    WHEN d.__key IS NOT NULL THEN 'duplicate_key' ELSE 'add' END AS __change,
               false AS __in_snapshot, NULL::VARCHAR AS __klaviyo_id, m.__key, m.__fingerprint,
               NULL::VARCHAR AS __sent, m.* EXCLUDE (__key, __fingerprint)
        FROM ({_model_sql(con, spec, selected, signature=signature)}) AS m
        LEFT JOIN {DUPLICATES} AS d ON d.__key = m.__key"""
    )
    [(model_rows, invalid)] = con.execute(
        f"""SELECT (SELECT count(*) FROM {spec.relation}),
                   (SELECT coalesce(sum(copies), 0) FROM {DUPLICATES})"""
    ).fetchall()
    return ChangeCounts(
        add=model_rows - invalid, update=0, remove=0, invalid=invalid, model_rows=model_rows
    )


def _changes_kind(con: duckdb.DuckDBPyConnection) -> str | None:
    """What the last diff's changes are: 'VIEW' (a first sync's), 'LOCAL TEMPORARY' (a
    table), or None before any diff."""
    found = con.execute(
        "SELECT table_type FROM information_schema.tables WHERE table_name = $1 "
        "AND table_catalog = 'temp'",
        [CHANGES],
    ).fetchall()
    return str(found[0][0]) if found else None


def _drop_changes(con: duckdb.DuckDBPyConnection) -> None:
    """Drop the last diff's changes, a table or a view (DuckDB's DROP names which)."""
    if kind := _changes_kind(con):
        con.execute(f"DROP {'VIEW' if kind == 'VIEW' else 'TABLE'} {CHANGES}")


def _streamed(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the last diff was a first sync's (`_first_sync`): its changes hold only
    `FIRST_SYNC_KINDS`, and no earlier refusal stands."""
    return _changes_kind(con) == "VIEW"


def model_keys(con: duckdb.DuckDBPyConnection, spec: SyncSpec) -> set[str]:
    """The model's sync keys as `__key` writes them, NULL ones left out."""
    key = _selected(con, spec)[0]
    rows = con.execute(
        f"SELECT DISTINCT k FROM (SELECT {key} AS k FROM {spec.relation}) WHERE k IS NOT NULL"
    ).fetchall()
    return {str(k) for (k,) in rows}


def rebase(con: duckdb.DuckDBPyConnection, spec: SyncSpec, sid: str) -> int:
    """Bring a sync recorded by an earlier version to today's keys and fingerprints,
    without sending anything: keys are normalised (`key_sql`; two that become one keep the
    latest), and every row whose values are still those Klaviyo accepted (or refused) by
    DuckDB's `hash()` of the raw values, as earlier versions fingerprinted them, gets its
    md5-v1 fingerprint. Rows that changed meanwhile keep the old one, so they are sent.
    Run on the state's write connection, in its transaction; returns the rows carried over."""
    snapshot = f"{CATALOG}.snapshot"
    normal = key_sql("key", spec.key_field)
    con.execute(
        f"""DELETE FROM {snapshot} WHERE sync_id = $1 AND rowid NOT IN (
                SELECT arg_max(rowid, updated_at) FROM {snapshot}
                WHERE sync_id = $1 GROUP BY {normal})""",
        [sid],
    )
    con.execute(f"UPDATE {snapshot} SET key = {normal} WHERE sync_id = $1", [sid])
    model = _model_sql(con, spec, _selected(con, spec), legacy=True)
    carried = 0
    for column in ("fingerprint", "rejected_fingerprint"):
        [(count,)] = con.execute(
            f"""UPDATE {snapshot} AS s SET {column} = m.fp
                FROM (SELECT __key, __legacy, any_value(__fingerprint) AS fp
                      FROM ({model}) GROUP BY ALL) AS m
                WHERE s.sync_id = $sid AND s.key = m.__key AND s.{column} = m.__legacy""",
            {"sid": sid, "signature": spec.signature},
        ).fetchall()
        carried += int(count)
    con.execute(f"UPDATE {snapshot} SET memo = NULL WHERE sync_id = $1", [sid])
    return carried


def forget_removed(con: duckdb.DuckDBPyConnection, sid: str) -> None:
    """Drop the rows that left the model from the snapshot, so they are sent again if they
    come back. Runs on the connection that owns the temporary changes table."""
    if _streamed(con):
        return
    con.execute(
        f"""DELETE FROM {CATALOG}.snapshot WHERE sync_id = $1 AND key IN
            (SELECT __key FROM {CHANGES} WHERE __change = 'remove')""",
        [sid],
    )


def refresh_memos(con: duckdb.DuckDBPyConnection, sid: str) -> None:
    """Store the memo of each row the last diff found at its accepted fingerprint with its
    memo missing or stale (after an upgrade, a new DuckDB, a new time zone): the next diff
    skips their MD5. Only where the stored fingerprint is still the one the memo was
    computed with. Runs on the connection that owns the temporary changes table."""
    if _streamed(con):
        return
    con.execute(
        f"""UPDATE {CATALOG}.snapshot AS s SET memo = c.__memo
            FROM (SELECT __key, __fingerprint, any_value(__memo) AS __memo FROM {CHANGES}
                  WHERE __change IN ('memo', 'settle') GROUP BY ALL) AS c
            WHERE s.sync_id = $1 AND s.key = c.__key AND s.fingerprint = c.__fingerprint
              AND s.memo IS DISTINCT FROM c.__memo""",
        [sid],
    )


def standing_rejects(con: duckdb.DuckDBPyConnection, sid: str) -> int:
    """How many rows stand refused from earlier runs and are not tried again in this one
    (their rows did not change): they are out of step with Klaviyo all the same, so every
    run counts them until they are fixed."""
    if _streamed(con):
        return 0
    [(count,)] = con.execute(
        f"""SELECT count(*) FROM {CATALOG}.snapshot
            WHERE sync_id = $1 AND rejected_fingerprint IS NOT NULL
            AND key NOT IN (SELECT __key FROM {CHANGES} WHERE __key IS NOT NULL)""",
        [sid],
    ).fetchall()
    return int(count)


def _hold(con: duckdb.DuckDBPyConnection, sid: str, units: list[str]) -> int:
    """Take the rows of these journal units out of the changes table; how many there were."""
    if not units:
        return 0
    pending = f"""__key IN (SELECT key FROM {CATALOG}.journal
        WHERE sync_id = $1 AND unit IN (SELECT unnest($2::VARCHAR[])))"""
    [(held,)] = con.execute(
        f"SELECT count(*) FROM {CHANGES} WHERE {pending}", [sid, units]
    ).fetchall()
    con.execute(f"DELETE FROM {CHANGES} WHERE {pending}", [sid, units])
    return int(held)


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
    if _streamed(con) and not set(changes) & set(FIRST_SYNC_KINDS):
        return
    kinds = ", ".join(f"'{kind}'" for kind in changes)
    reader = con.sql(f"SELECT * FROM {CHANGES} WHERE __change IN ({kinds})").to_arrow_reader(rows)
    yield from reader
