"""The benchmark's dbt project: one annotated customers model of N rows, generated in SQL.

Deterministic: the same N gives the same rows. The dbt var `step` applies the change set
of the benchmark's step (c): 1% of rows change a mapped value, 0.5% leave, 0.5% arrive.
"""

from __future__ import annotations

from pathlib import Path

MODEL = """{{{{ config(materialized='table') }}}}
{{% set step = var('step', 0) | int %}}
select
    'C' || lpad(cast(i as varchar), 9, '0') as customer_id,
    'customer.' || i || '@example.com' as email,
    '+1' || cast(2012000000 + (i % 7000000) as varchar) as phone,
    ['Ada', 'Ben', 'Chloe', 'Diego', 'Elena', 'Farid', 'Grace', 'Hiro'][i % 8 + 1] as first_name,
    ['Smith', 'Garcia', 'Chen', 'Okafor', 'Novak', 'Silva', 'Nguyen'][i % 7 + 1] as last_name,
    ['Austin', 'Berlin', 'Chicago', 'London', 'Paris', 'Tokyo'][i % 6 + 1]
        {{% if step %}} || case when i % 100 = 7 then ' (moved)' else '' end {{% endif %}}
        as city,
    ['US', 'DE', 'US', 'GB', 'FR', 'JP'][i % 6 + 1] as country,
    cast((i * 7919) % 100000 / 100.0 as decimal(12, 2)) as lifetime_value,
    i % 10 = 0 as is_vip,
    date '2020-01-01' + cast(i % 1500 as integer) as signup_date,
    cast(i % 40 as integer) as orders,
    ['new', 'active', 'lapsed'][i % 3 + 1] as segment,
    i % 997 as internal_score
from range(0, {rows}{{% if step %}} + {rows} // 200{{% endif %}}) as r(i)
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


def write(directory: Path, rows: int) -> Path:
    """A dbt project that builds `rows` customers into directory/warehouse.duckdb."""
    (directory / "models").mkdir(parents=True, exist_ok=True)
    (directory / "dbt_project.yml").write_text(
        "name: bench\nconfig-version: 2\nprofile: bench\nmodel-paths: [models]\n"
    )
    (directory / "profiles.yml").write_text(
        f"bench:\n  target: dev\n  outputs:\n    dev:\n      type: duckdb\n"
        f"      path: {directory / 'warehouse.duckdb'}\n      threads: 1\n"
    )
    (directory / "models" / "customers.sql").write_text(MODEL.format(rows=rows))
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
