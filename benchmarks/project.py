"""The benchmark's dbt project: one annotated customers model of N rows, generated in SQL.

Deterministic: the same N gives the same rows, on either warehouse (the model's SQL runs
unchanged on DuckDB and PostgreSQL). The dbt var `step` applies the change set of the
benchmark's step (c): 1% of rows change a mapped value, 0.5% leave, 0.5% arrive.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: The profile's target, on either warehouse (part of the sync id).
TARGET = "dev"

# generate_series over a bigint, so that i * 7919 cannot overflow PostgreSQL's integer.
MODEL = """{{{{ config(materialized='table') }}}}
{{% set step = var('step', 0) | int %}}
{{% set last = {grown} if step else {last} %}}
select
    'C' || lpad(cast(i as varchar), 9, '0') as customer_id,
    'customer.' || i || '@example.com' as email,
    '+1' || cast(2012000000 + (i % 7000000) as varchar) as phone,
    (array['Ada', 'Ben', 'Chloe', 'Diego', 'Elena', 'Farid', 'Grace', 'Hiro'])[i % 8 + 1]
        as first_name,
    (array['Smith', 'Garcia', 'Chen', 'Okafor', 'Novak', 'Silva', 'Nguyen'])[i % 7 + 1]
        as last_name,
    (array['Austin', 'Berlin', 'Chicago', 'London', 'Paris', 'Tokyo'])[i % 6 + 1]
        {{% if step %}} || case when i % 100 = 7 then ' (moved)' else '' end {{% endif %}}
        as city,
    (array['US', 'DE', 'US', 'GB', 'FR', 'JP'])[i % 6 + 1] as country,
    cast((i * 7919) % 100000 / 100.0 as decimal(12, 2)) as lifetime_value,
    i % 10 = 0 as is_vip,
    date '2020-01-01' + cast(i % 1500 as integer) as signup_date,
    cast(i % 40 as integer) as orders,
    (array['new', 'active', 'lapsed'])[i % 3 + 1] as segment,
    i % 997 as internal_score
from generate_series(cast(0 as bigint), {{{{ last }}}}) as r(i)
{{% if step %}}where i % 200 <> 3{{% endif %}}
"""

COLUMNS = {
    "customer_id": "sync_key: external_id",
    "email": "field: email",
    "phone": "field: phone_number",
    "first_name": "field: first_name",
    "last_name": "field: last_name",
    "city": "field: location.city",
    "country": "field: location.country",
    "lifetime_value": "field: properties.lifetime_value",
    "is_vip": "field: properties.is_vip",
    "signup_date": "field: properties.signup_date",
    "orders": "field: properties.orders",
    "segment": "field: properties.segment",
}


def write(directory: Path, rows: int, postgres: Any = None) -> Path:
    """A dbt project that builds `rows` customers into directory/warehouse.duckdb, or into
    the PostgreSQL database given (a tests.conftest.PgDatabase; schema main, as on DuckDB),
    with the klaviyo_sync package of this checkout installed: its macros diff in PostgreSQL
    (run `dbt deps`)."""
    (directory / "models").mkdir(parents=True, exist_ok=True)
    (directory / "dbt_project.yml").write_text(
        "name: bench\nconfig-version: 2\nprofile: bench\nmodel-paths: [models]\n"
    )
    if postgres is None:
        output = f"type: duckdb\n      path: {directory / 'warehouse.duckdb'}"
    else:
        output = (
            f"type: postgres\n      host: {postgres.host}\n      port: {postgres.port}\n"
            f"      user: {postgres.user}\n      password: ''\n"
            f"      dbname: {postgres.name}\n      schema: main"
        )
        # JSON strings are YAML strings: safe for any path.
        (directory / "packages.yml").write_text(f"packages:\n  - local: {json.dumps(str(REPO))}\n")
    (directory / "profiles.yml").write_text(
        f"bench:\n  target: {TARGET}\n  outputs:\n    {TARGET}:\n      {output}\n      threads: 1\n"
    )
    (directory / "models" / "customers.sql").write_text(
        MODEL.format(last=rows - 1, grown=rows + rows // 200 - 1)
    )
    columns = "".join(
        f"      - name: {name}\n        config: {{meta: {{klaviyo: {{{meta}}}}}}}\n"
        for name, meta in COLUMNS.items()
    )
    (directory / "models" / "schema.yml").write_text(
        "models:\n  - name: customers\n    config:\n"
        "      meta: {klaviyo: {object: profile, behavior: upsert}}\n"
        f"    columns:\n{columns}"
    )
    return directory


def is_postgres(directory: Path) -> bool:
    return (directory / "packages.yml").exists()


@contextlib.contextmanager
def dbt_adapter(directory: Path) -> Iterator[tuple[Any, Any]]:
    """dbt's adapter for the project's target, set up as a sync sets it up
    (dbt_klaviyo_sync.dbt.adapter), with its connection open; and the customers model."""
    from dbt_klaviyo_sync.dbt import DbtArgs, DbtProject, adapter, select_models

    project = DbtProject.locate(DbtArgs(project_dir=str(directory), profiles_dir=str(directory)))
    [model] = select_models(project)  # and the manifest the adapter reads macros from, current
    with adapter(project) as found:
        yield found, model


def connection_of(adapter: Any) -> Any:
    """The DB-API connection of dbt's adapter (psycopg2's, for dbt-postgres)."""
    return adapter.connections.get_thread_connection().handle


def received_bytes(connection: Any) -> int:
    """The bytes the client's TCP socket to the server has received so far, as the kernel
    counts them (tcp_info's tcpi_bytes_received, Linux): the wire's bytes, the protocol's
    framing included."""
    fd = connection.fileno()
    with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    # struct tcp_info: tcpi_bytes_acked at byte 120, tcpi_bytes_received at 128.
    return int(struct.unpack_from("Q", info, 128)[0])


#: What both diffs report, for the harness to compare: the change kinds, as the naive
#: baseline names them, and ours (`__change`).
KINDS = {"added": "add", "changed": "update", "removed": "remove"}


def report(keys: dict[str, list[str]], seconds: float, received: int | None) -> None:
    """Print what a diff found, as one JSON line: per kind, how many keys, a digest of all
    of them (sorted) and the first few; the diff's own seconds and the bytes it received."""
    found = {}
    for kind, listed in keys.items():
        listed.sort()
        digest = hashlib.sha256("\n".join(listed).encode()).hexdigest()
        found[kind] = {"count": len(listed), "digest": digest, "first": listed[:3]}
    print(json.dumps({"kinds": found, "seconds": seconds, "bytes": received}))
