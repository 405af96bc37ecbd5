"""Every statement the sync runs on a warehouse, rendered for every adapter dbt maintains and
checked in that engine's SQL dialect with sqlglot, without the engines (which cannot run here).

The package's macros (macros/warehouse/*.sql) are rendered by a small Jinja harness, not by
dbt. It emulates what the macros use of dbt: `adapter.dispatch` (`<type>__name`, then the
parent adapter's, databricks -> spark and redshift -> postgres as those adapters declare,
then `default__name`), `return`, the `do` statement, `var()` (its default) and
`type_string()` (the type each adapter's Column gives "string"). It differs from dbt in that
it has no manifest, no other package's macros (a user's override of a job is not seen), no
adapter object beyond `dispatch`, and no compiled-SQL context (`this`, `ref`, ...), which the
warehouse macros do not use. The arguments are the kinds of values
dbt_klaviyo_sync/warehouse/adapter.py passes.

Each statement must parse in its dialect into one statement that sqlglot fully understands
(no opaque Command), regenerate without sqlglot flagging an unsupported construct, call only
the functions its engine documents (FUNCTIONS below, from each engine's SQL reference), and
avoid the constructs each engine refuses (REFUSED below). String literals are read back as
the engine's tokenizer would. What this cannot see: types and semantics an engine checks at
run time, and table formats (Spark's state needs Delta Lake or Iceberg).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import jinja2
import pytest
import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel

from dbt_klaviyo_sync.warehouse import reason_groups_sql

MACROS = Path(__file__).resolve().parent.parent / "macros" / "warehouse"

#: Adapter type -> sqlglot dialect.
DIALECTS = {
    "postgres": "postgres",
    "redshift": "redshift",
    "snowflake": "snowflake",
    "bigquery": "bigquery",
    "databricks": "databricks",
    "spark": "spark",
    "trino": "trino",
    "duckdb": "duckdb",
}
#: The adapter each one falls back to before `default__` (as the adapters declare it).
PARENT = {"databricks": "spark", "redshift": "postgres"}
#: What `type_string()` renders on each adapter (its Column's "string").
TYPE_STRING = {
    "postgres": "text",
    "redshift": "text",
    "snowflake": "text",
    "bigquery": "string",
    "databricks": "string",
    "spark": "string",
    "trino": "varchar",
    "duckdb": "text",
}
QUOTE = {"bigquery": "`", "databricks": "`", "spark": "`"}

#: The functions each engine's SQL reference documents, among those the sync calls, as sqlglot
#: reads them (its expression classes, or the name of a function it does not model): a call
#: of any other fails the check for that engine. Operators and what every engine has
#: (CASE, CAST, COALESCE, COUNT, LOWER, TRIM, ROUND, ROW_NUMBER, CHR, ...) are in _EVERYWHERE.
_EVERYWHERE = {"And", "Or", "Case", "If", "Exists", "Cast", "TryCast", "Coalesce", "Count"}
_EVERYWHERE |= {"Lower", "Trim", "Round", "RowNumber", "CurrentTimestamp", "RegexpReplace", "Chr"}
FUNCTIONS = {
    # concat_ws, left, md5, extract; hashtextextended and advisory locks
    "postgres": {"ConcatWs", "Left", "MD5", "Extract", "HASHTEXTEXTENDED"}
    | {"PG_TRY_ADVISORY_LOCK", "PG_ADVISORY_UNLOCK"},
    "duckdb": {"ConcatWs", "Left", "MD5", "Extract"},
    # left, md5, strtol (FromBase), datediff, dateadd; no concat_ws
    "redshift": {"Left", "MD5", "FromBase", "TsOrDsDiff", "TsOrDsAdd"},
    "snowflake": {"ConcatWs", "MD5NumberUpper64", "DateDiff", "DateAdd"},
    # farm_fingerprint, timestamp_diff, timestamp_add; no concat_ws, no md5 as text
    "bigquery": {"FarmFingerprint", "TimestampDiff", "TimestampAdd"},
    # concat_ws, md5, substr, conv, unix_millis
    "spark": {"ConcatWs", "MD5", "Substring", "CONV", "UnixMillis"},
    # concat_ws, md5 (of varbinary), to_utf8, substr, from_big_endian_64, date_diff
    "trino": {"ConcatWs", "MD5Digest", "Encode", "Substring", "FROM_BIG_ENDIAN_64", "DateDiff"},
}
FUNCTIONS["databricks"] = FUNCTIONS["spark"]


def _temporary(node: exp.Expression) -> bool:
    return isinstance(node, exp.Create) and any(
        isinstance(p, exp.TemporaryProperty) for p in node.find_all(exp.Property)
    )


def _keyed_dml(node: exp.Expression) -> bool:
    """A DELETE or UPDATE whose condition holds a subquery."""
    if not isinstance(node, exp.Delete | exp.Update):
        return False
    where = node.args.get("where")
    return where is not None and where.find(exp.Select) is not None


def _where_without_from(node: exp.Expression) -> bool:
    return isinstance(node, exp.Select) and bool(
        node.args.get("where") and not node.args.get("from_")
    )


def _conditional_match(node: exp.Expression) -> bool:
    return isinstance(node, exp.When) and node.args.get("matched") and node.args.get("condition")


def _regexp_flags(node: exp.Expression) -> bool:
    """A fourth argument: PostgreSQL's flags ('g'), a position elsewhere (where sqlglot keeps
    it: Trino's reading drops it, so the text is checked too)."""
    extra = ("position", "occurrence", "modifiers")
    return isinstance(node, exp.RegexpReplace) and any(node.args.get(a) for a in extra)


def _extract_epoch(node: exp.Expression) -> bool:
    return isinstance(node, exp.Extract) and node.this.name.lower() == "epoch"


def _data_type(*kinds: exp.DataType.Type) -> Callable[[exp.Expression], bool]:
    return lambda node: isinstance(node, exp.DataType) and node.this in kinds


#: Constructs each engine refuses, from its SQL reference: (why, test, the engines refusing).
_NO_TEMP = {"bigquery", "spark", "databricks", "trino"}
REFUSED: list[tuple[str, Callable[[exp.Expression], bool], set[str]]] = [
    ("the bit type", _data_type(exp.DataType.Type.BIT), set(DIALECTS) - {"postgres", "duckdb"}),
    ("extract(epoch ...)", _extract_epoch, set(DIALECTS) - {"postgres", "duckdb"}),
    ("regexp_replace flags", _regexp_flags, set(DIALECTS) - {"postgres", "duckdb"}),
    ("temporary tables", _temporary, _NO_TEMP),
    ("UPDATE ... FROM", lambda n: isinstance(n, exp.Update) and n.args.get("from_"), _NO_TEMP),
    ("a subquery in DELETE/UPDATE", _keyed_dml, {"spark", "databricks"}),
    ("WHERE without FROM", _where_without_from, {"bigquery"}),
    ("WHEN MATCHED AND ...", _conditional_match, {"redshift"}),
    ("IS DISTINCT FROM", lambda n: isinstance(n, exp.NullSafeEQ | exp.NullSafeNEQ), {"redshift"}),
    ("primary keys", lambda n: isinstance(n, exp.PrimaryKey), _NO_TEMP),
    ("column defaults", lambda n: isinstance(n, exp.DefaultColumnConstraint), _NO_TEMP),
]


# -- the harness ---------------------------------------------------------------------------


class _Return(Exception):
    def __init__(self, value: Any) -> None:
        self.value = value


def _return(value: Any) -> None:
    raise _Return(value)


@functools.cache
def package(adapter_type: str) -> Package:
    return Package(adapter_type)


class Package:
    """The package's warehouse macros, rendered as dbt would on one adapter type."""

    def __init__(self, adapter_type: str, variables: dict[str, Any] | None = None) -> None:
        self.type = adapter_type
        self.variables = variables or {}
        self.macros: dict[str, Callable[..., Any]] = {}
        namespace = _Namespace(self.macros)
        env = jinja2.Environment(extensions=["jinja2.ext.do"], undefined=jinja2.StrictUndefined)
        context = {
            "klaviyo_sync": namespace,
            "adapter": _Adapter(self),
            "return": _return,
            "var": lambda name, default=None: self.variables.get(name, default),
            "type_string": lambda: TYPE_STRING[adapter_type],
        }
        for path in sorted(MACROS.glob("*.sql")):
            template = env.from_string(path.read_text())
            defined = template.new_context(context)
            for _ in template.root_render_func(defined):  # defines the file's macros
                pass
            for name, macro in defined.vars.items():  # dbt keeps _private macros too
                if isinstance(macro, jinja2.runtime.Macro):
                    self.macros[name] = _returning(macro)

    def dispatch(self, name: str) -> Callable[..., Any]:
        types = [self.type] + ([PARENT[self.type]] if self.type in PARENT else [])
        for prefix in [*types, "default"]:
            if f"{prefix}__{name}" in self.macros:
                return self.macros[f"{prefix}__{name}"]
        raise LookupError(f"no {name} for {self.type}")

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.macros[name](*args, **kwargs)

    def quote(self, name: str) -> str:
        mark = QUOTE.get(self.type, '"')
        return f"{mark}{name}{mark}"


def _returning(macro: jinja2.runtime.Macro) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return str(macro(*args, **kwargs)).strip()
        except _Return as returned:
            return returned.value

    return call


@dataclass
class _Namespace:
    macros: dict[str, Callable[..., Any]]

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return self.macros[name]


@dataclass
class _Adapter:
    package: Package

    def dispatch(self, name: str, namespace: str) -> Callable[..., Any]:
        assert namespace == "klaviyo_sync"
        return self.package.dispatch(name)


# -- what adapter.py renders ------------------------------------------------------------------

SCHEMA = "klaviyo_sync"
SID = "0f3a9c2b7d1e4a5b6c7d"
RUN = "4b0c6f2a9e8d7c6b5a4f3e2d1c0b9a8f"
HOLDER = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
TRICKY = "o'brien\\x@example.com\nsecond line"  # a quote, a backslash, a line break


def relation(package: Package) -> str:
    parts = {"bigquery": ["proj", "analytics", "customers"], "spark": ["analytics", "customers"]}
    names = parts.get(package.type, ["warehouse", "analytics", "customers"])
    if package.type == "databricks":
        names = ["main", "analytics", "customers"]
    return ".".join(package.quote(n) for n in names)


def statements(package: Package) -> Iterator[tuple[str, str]]:
    """(job, SQL) for every statement the AdapterWarehouse renders, with realistic values."""
    for sql in package("state_tables", SCHEMA):
        yield "state_tables", sql
    lock = package("sync_lock", SCHEMA, SID, HOLDER)
    for part in ("take", "renew", "release"):
        for sql in lock[part]:
            yield f"sync_lock.{part}", sql
    identity = {
        "unique_id": "model.shop.customers",
        "object": "profile",
        "behavior": "upsert",
        "target": "prod",
        "base_url": "https://a.klaviyo.com",
    }
    jobs: dict[str, dict[str, Any]] = {
        "schema_version": {},
        "set_schema_version": {"version": "1"},
        "has_syncs": {},
        "accounts": {**identity, "list_id": ""},
        "register": {
            **identity,
            "sid": SID,
            "model": "customers",
            "list_id": None,
            "account_id": None,
            "fingerprint_version": package("fingerprint_version"),
        },
        "fingerprint_version": {"sid": SID},
        "forget": {"sid": SID, "keep_accepted": True},
        "start_run": {"run_id": RUN, "sid": SID, "model": "customers", "full_refresh": False},
        "finish_run": {
            "run_id": RUN,
            "status": "failed",
            "error": TRICKY,
            **dict.fromkeys(["added", "updated", "removed", "unchanged", "rejected"], 3),
            "failed": 0,
            "requests": 12,
            "rate_limit_seconds": 2.5,
        },
        "add_rate_limit_seconds": {},
        "record_job": {"sid": SID, "unit": "u0001", "job_id": "01HZX"},
        "journaled": {"sid": SID},
        "drop_journal": {"sid": SID, "units": ["u0001", "u0002"]},
        "hold": {"sid": SID, "units": ["u0001"]},
        "held": {"sid": SID, "units": ["u0001"]},
        "standing_rejects": {"sid": SID},
        "accepted_count": {"sid": SID},
        "accepted_values": {"sid": SID, "keys": [TRICKY, "C00001"]},
        "forget_removed": {"sid": SID},
        "changes": {"sid": SID, "kinds": ["add", "update"]},
        "known_model": {"model": "customers"},
        "synced_models": {},
    }
    for name, values in jobs.items():
        for sql in package("state_sql", name, SCHEMA, values).split("; "):
            yield f"state_sql.{name}", sql
    for model in (None, "customers"):
        yield (
            "state_sql.last_runs",
            package("state_sql", "last_runs", SCHEMA, {"model": model, "runs": 5}),
        )
    for every in (False, True):
        sql = package("state_sql", "rejects", SCHEMA, {"model": "customers", "every": every})
        yield "state_sql.rejects", sql
        yield "rejects.count", f"select count(*) from ({sql}) as r"
        yield "rejects.first", f"select * from ({sql}) as r limit 20"
        yield "rejects.by_reason", reason_groups_sql(sql, 3)
    for key_field, once, events in (
        ("external_id", False, False),
        ("email", True, False),
        ("phone_number", False, True),
    ):
        quote = package.quote
        values = [quote("email"), package("as_text", quote("attributes")), quote("signup_date")]
        texts = [package("as_text", f"f{i}") for i in range(1, 4)]
        change_set = package(
            "change_set",
            SCHEMA,
            relation(package),
            package("as_text", quote("customer_id")),
            key_field,
            values,
            texts,
            "3f2a1b0c9d8e7f6a",
            SID,
            once,
            events,
        )
        for part in ("drop", "create", "duplicates", "counts", "rows"):
            yield f"change_set.{part}", change_set[part]
        for sql in change_set["analyze"]:
            yield "change_set.analyze", sql
    commit = package("commit_outcomes", SCHEMA, SID, RUN, "customers")
    yield "commit_outcomes.table", commit["table"]
    yield "commit_outcomes.clear", commit["clear"]
    columns = "key, outcome, fingerprint, accepted_values, klaviyo_id, in_snapshot, column_name"
    yield "commit_outcomes.insert", f"insert into {commit['name']} ({columns}) values (%s)"
    for sql in commit["steps"]:
        yield "commit_outcomes.steps", sql
    for key_field in ("external_id", "email", "phone_number"):
        key_text = package("as_text", package.quote("customer_id"))
        found = package("key_problems", relation(package), key_text, key_field)
        yield "key_problems.counts", found["counts"]
        yield "key_problems.examples", found["examples"]


# -- the checks ----------------------------------------------------------------------------


def check(adapter_type: str, job: str, sql: str) -> list[str]:
    """What the dialect's reading of one statement finds wrong (nothing, when all is well)."""
    dialect = DIALECTS[adapter_type]
    sql = sql.replace("(%s)", "(" + ", ".join(["null"] * 7) + ")")  # the driver's marks
    try:
        parsed = sqlglot.parse(sql, read=dialect, error_level=ErrorLevel.RAISE)
    except sqlglot.errors.ParseError as exc:
        return [f"{job}: does not parse in {dialect}: {exc}"]
    if len(parsed) != 1 or parsed[0] is None:
        return [f"{job}: {len(parsed)} statements in one"]
    tree = parsed[0]
    problems = []
    if isinstance(tree, exp.Command):
        problems.append(f"{job}: sqlglot reads it only as an opaque command: {sql[:60]}")
    try:
        tree.sql(dialect=dialect, unsupported_level=ErrorLevel.RAISE)
    except sqlglot.errors.UnsupportedError as exc:
        problems.append(f"{job}: unsupported in {dialect}: {exc}")
    for node in tree.walk():
        if isinstance(node, exp.Func):
            name = node.name.upper() if isinstance(node, exp.Anonymous) else type(node).__name__
            if name not in _EVERYWHERE | FUNCTIONS[adapter_type]:
                problems.append(f"{job}: {adapter_type} has no {name}: {node.sql()[:60]}")
        for why, refused, engines in REFUSED:
            if adapter_type in engines and refused(node):
                problems.append(f"{job}: {adapter_type} refuses {why}: {node.sql()[:60]}")
    # what sqlglot reads alike in every dialect, checked on the text
    text = " ".join(sql.lower().split())
    if adapter_type in {"bigquery", "spark", "databricks"} and "with time zone" in text:
        problems.append(f"{job}: {adapter_type} has no TIMESTAMP WITH TIME ZONE")
    if adapter_type not in {"postgres", "duckdb"} and "'', 'g')" in text:
        problems.append(f"{job}: {adapter_type} refuses regexp_replace flags")
    truncate = text.startswith("truncate ") and not text.startswith("truncate table ")
    if adapter_type in {"bigquery", "spark", "databricks", "trino"} and truncate:
        problems.append(f"{job}: {adapter_type} needs TRUNCATE TABLE")
    return problems


@pytest.mark.parametrize("adapter_type", sorted(DIALECTS))
def test_every_statement_reads_in_its_engines_dialect(adapter_type: str) -> None:
    problems = [
        p for job, sql in statements(package(adapter_type)) for p in check(adapter_type, job, sql)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("adapter_type", sorted(set(DIALECTS) - {"postgres", "duckdb"}))
def test_the_checks_refuse_postgresqls_sql_elsewhere(adapter_type: str) -> None:
    """The checks can fail: PostgreSQL's statements, read as another engine's, are refused
    for what that engine lacks (advisory locks, ::bit(64), extract(epoch), the 'g' flag, ...)."""
    postgres = statements(package("postgres"))
    problems = [p for job, sql in postgres for p in check(adapter_type, job, sql)]
    found = "\n".join(problems)
    for missing in ("PG_TRY_ADVISORY_LOCK", "bit type", "EXTRACT", "regexp_replace flags"):
        assert missing in found, f"{missing} not caught for {adapter_type}"
    if adapter_type in {"bigquery", "spark", "databricks", "trino"}:
        assert "temporary tables" in found and "UPDATE ... FROM" in found
        assert "TRUNCATE TABLE" in found and "primary keys" in found


def test_postgresql_work_tables_get_statistics_before_they_are_joined() -> None:
    """PostgreSQL never analyzes a temporary table itself: a commit's answers, joined to the
    journal without statistics, once ran for twenty minutes in a nested loop."""
    postgres = package("postgres")
    commit = postgres("commit_outcomes", SCHEMA, SID, RUN, "customers")
    assert commit["steps"][0] == f"analyze {commit['name']}"
    quote = postgres.quote
    change_set = postgres(
        "change_set",
        SCHEMA,
        relation(postgres),
        postgres("as_text", quote("customer_id")),
        "external_id",
        [],
        [],
        "3f2a1b0c9d8e7f6a",
        SID,
        False,
        False,
    )
    assert change_set["analyze"] == ["analyze klaviyo_changes"]
    assert package("snowflake")("commit_outcomes", SCHEMA, SID, RUN, "customers")["steps"][0] != (
        "analyze klaviyo_outcomes"
    )


def test_dispatch_picks_each_engines_variant() -> None:
    """Databricks falls back to Spark's macros and Redshift to PostgreSQL's, as in dbt; each
    fingerprint reports its own version."""
    versions = {t: package(t)("fingerprint_version") for t in DIALECTS}
    assert versions == {
        "postgres": "md5-v1",
        "duckdb": "md5-v1",
        "snowflake": "md5-v1",
        "spark": "md5-v1",
        "databricks": "md5-v1",
        "trino": "md5-v1",
        "redshift": "md5-60-v1",
        "bigquery": "farm-v1",
    }
    spark = package("spark")("fingerprint", "s", ["f1"])
    assert package("databricks")("fingerprint", "s", ["f1"]) == spark
    assert "strtol" in package("redshift")("fingerprint", "s", ["f1"])
    assert (
        "pg_try_advisory_lock" in package("postgres")("sync_lock", SCHEMA, SID, HOLDER)["take"][0]
    )
    for lease in ("redshift", "snowflake", "bigquery", "databricks", "trino", "duckdb"):
        take = package(lease)("sync_lock", SCHEMA, SID, HOLDER)["take"]
        assert "leases" in take[-1], lease


@pytest.mark.parametrize("adapter_type", sorted(DIALECTS))
@pytest.mark.parametrize(
    "value", [TRICKY, "tab\there", "back\\slash'", "50% off_now", "emoji \U0001f600", ""]
)
def test_string_literals_read_back_as_written(adapter_type: str, value: str) -> None:
    """A value written into SQL (a key, a model name, an error message) is read by the engine
    as the same string: BigQuery and Spark take no '' for a quote, and read backslashes."""
    literal = package(adapter_type)("literal", value)
    read = sqlglot.parse_one(f"select {literal}", read=DIALECTS[adapter_type])
    assert isinstance(read.expressions[0], exp.Literal)
    assert read.expressions[0].this == value


def test_canonical_text_tells_null_from_empty_and_counts_column_order() -> None:
    """The fingerprint's text, run in DuckDB in both of its forms (concat_ws, and || where an
    engine has no concat_ws): the same text, NULL unlike '', order counted. The default
    fingerprint there gives DuckDB's own md5-v1 values."""
    con = duckdb.connect()

    def text(adapter_type: str, *values: str | None) -> str:
        names = [f"c{i}" for i in range(len(values))]
        sql = package(adapter_type)("canonical_text", "sig", names)
        row = con.execute(
            f"select {sql} from (select {', '.join('?' for _ in names)}) as t("
            + ", ".join(names)
            + ")",
            list(values),
        ).fetchone()
        assert row is not None
        return str(row[0])

    for values in [(None, "a"), ("a", None), ("", "a"), ("a", ""), ("ab", "c"), ("a", "bc")]:
        assert text("postgres", *values) == text("bigquery", *values) == text("redshift", *values)
    seen = {text("postgres", *v) for v in [(None, "a"), ("a", None), ("", "a"), ("a", "")]}
    assert len(seen) == 4
    assert text("postgres", "ab", "c") != text("postgres", "a", "bc")

    from dbt_klaviyo_sync.warehouse.duckdb.diff import fingerprint_sql

    ours = package("duckdb")("fingerprint", "sig", ["c0", "c1"])
    theirs = fingerprint_sql([("c0", "VARCHAR"), ("c1", "VARCHAR")])
    rows = "(values ('a', null), (null, 'a'), ('', 'x'), ('é', 'ü')) as t(c0, c1)"
    mine = [v for (v,) in con.execute(f"select {ours} from {rows}").fetchall()]
    reference = con.execute(f"select {theirs} from {rows}", {"signature": "sig"}).fetchall()
    assert mine == [v - 2**64 if v >= 2**63 else v for (v,) in reference]


# -- Snowflake for real, through fakesnow -----------------------------------------------------

SNOWFLAKE_PROFILE = """    snowflake:
      type: snowflake
      account: fake
      user: fake
      password: fake
      role: fake
      warehouse: fake
      database: demo
      schema: analytics
      threads: 1
"""
# The demo's customers model as Snowflake SQL (its own SQL is PostgreSQL's and DuckDB's):
# the columns schema.yml maps, 1,200 rows.
SNOWFLAKE_CUSTOMERS = """create or replace table demo.analytics.customers as
select 'C' || lpad(to_varchar(n), 5, '0') as customer_id,
       'customer.' || n || '@example.com' as email,
       '+1415555' || lpad(to_varchar(1000 + n), 4, '0') as phone,
       'First' || n as first_name, 'Last' || n as last_name,
       iff(n % 2 = 0, 'Oslo', 'Paris') as city, 'Norway' as country,
       cast(n * 1.5 as number(12, 2)) as lifetime_value, n % 7 = 0 as is_vip,
       to_date('2022-01-01') as signup_date,
       to_timestamp('2023-01-01 10:00:00') as last_order_at, n % 997 as internal_score
from (select seq4() + 1 as n from table(generator(rowcount => 1200)))"""


@pytest.mark.slow
def test_snowflake_syncs_through_fakesnow(
    tmp_path: Path, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole sync on a Snowflake target, dbt-snowflake's adapter and the Snowflake
    connector patched onto DuckDB by fakesnow, in this process: a first sync, a no-op, then
    2 changed rows and 1 removed; the lease given back. Skipped unless dbt-snowflake and
    fakesnow are installed, which pin versions the project's own environment does not take:
    in a separate virtualenv, `pip install -e '.[dev]' 'dbt-snowflake>=1.10,<1.12'
    'fakesnow>=0.12,<0.13'`, then `pytest -m slow -k fakesnow tests/test_dialects.py`.
    fakesnow cannot translate MD5_NUMBER_UPPER64; the test gives its DuckDB translation the
    meaning Snowflake documents (the first 8 bytes of the MD5, unsigned).
    """
    fakesnow = pytest.importorskip("fakesnow")
    pytest.importorskip("dbt.adapters.snowflake")
    from dbt.cli.main import dbtRunner
    from sqlglot.dialects.duckdb import DuckDB

    from tests.conftest import copy_integration_project, sync

    monkeypatch.setitem(
        DuckDB.Generator.TRANSFORMS,
        exp.MD5NumberUpper64,
        lambda self, e: (
            f"cast(cast(('0x' || left(md5({self.sql(e, 'this')}), 16)) as ubigint) as hugeint)"
        ),
    )
    project = copy_integration_project(tmp_path / "project")
    profiles = project / "profiles.yml"
    profiles.write_text(profiles.read_text() + SNOWFLAKE_PROFILE)
    (tmp_path / "db").mkdir()
    env = {"DBT_TARGET": "snowflake"}
    with fakesnow.patch(db_path=str(tmp_path / "db")):
        import snowflake.connector

        connection = snowflake.connector.connect(database="demo", schema="analytics")
        cursor = connection.cursor()
        cursor.execute(SNOWFLAKE_CUSTOMERS)
        deps = dbtRunner().invoke(["deps", "--project-dir", str(project)])
        assert deps.success, deps.exception

        first = sync(project, emulator, "--select", "customers", env=env)
        assert first.returncode == 0, first.output
        assert first.row("customers")["added"] == 1200
        assert len(emulator.profiles()) == 1200
        again = sync(project, emulator, "--select", "customers", env=env)
        assert again.row("customers")["unchanged"] == 1200, again.output
        assert again.row("customers")["requests"] == 0

        cursor.execute(
            "update demo.analytics.customers set city = 'Bergen'"
            " where customer_id in ('C00001', 'C00002')"
        )
        cursor.execute("delete from demo.analytics.customers where customer_id = 'C00003'")
        changed = sync(project, emulator, "--select", "customers", env=env)
        assert changed.returncode == 0, changed.output
        counts = changed.row("customers")
        assert (counts["updated"], counts["removed"], counts["unchanged"]) == (2, 1, 1197)
        held = {p["attributes"]["external_id"]: p["attributes"] for p in emulator.profiles()}
        assert held["C00001"]["location"]["city"] == "Bergen"

        cursor.execute("select count(*) from klaviyo_sync.leases")
        assert cursor.fetchall() == [(0,)]  # every lease given back
        cursor.execute("select fingerprint_version from klaviyo_sync.syncs")
        assert cursor.fetchall() == [("md5-v1",)]
