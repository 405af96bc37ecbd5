{#-
  1,200 deterministic demo customers, generated in SQL (no CSV). The SQL runs unchanged on
  DuckDB and PostgreSQL: generate_series, ARRAY[...][i] and dbt's dateadd work on both.

  The dbt var `demo_step` moves the data forward, to show what a sync sends:
    0 (default)  customers C00001 .. C01200.
    1            the next day, still 1,200 rows:
                   - C00010 moved from San Francisco to Oakland           (location.city)
                   - C00042 placed a big order: lifetime_value 325.98 -> 575.98
                                                                         (properties.lifetime_value)
                   - C00077 was made a VIP by hand: is_vip false -> true  (properties.is_vip)
                   - C01201 (Nora Lindqvist, New York) signed up          (a new profile)
                   - C00013 is no longer in the model                     (a removed row)
                 and internal_score changes on every row; it is not annotated, so those
                 changes alone send nothing.
-#}
{%- set step = var('demo_step', 0) | int -%}
{%- if step not in [0, 1] -%}
  {%- do exceptions.raise_compiler_error(
    "customers: the var demo_step must be 0 or 1, got " ~ var('demo_step')
  ) -%}
{%- endif -%}

{{ config(materialized='table') }}

with ids as (

    select cast(i as integer) as n
    from generate_series(1, 1201) as r(i)
    {% if step == 0 -%}
    where i <= 1200
    {%- else -%}
    where i <> 13
    {%- endif %}

),

base as (

    select
        n,
        'C' || lpad(cast(n as varchar), 5, '0') as customer_id,
        case when n = 1201 then 'Nora' else (array[
            'Ada', 'Ben', 'Chloe', 'Diego', 'Elena', 'Farid', 'Grace', 'Hiro', 'Ines', 'Jonas',
            'Kemi', 'Liam', 'Maya', 'Noah', 'Olga', 'Priya', 'Quinn', 'Rosa', 'Sami', 'Tara'
        ])[n % 20 + 1] end as first_name,
        case when n = 1201 then 'Lindqvist' else (array[
            'Smith', 'Garcia', 'Chen', 'Okafor', 'Novak', 'Silva', 'Kowalski', 'Nguyen',
            'Haddad', 'Jensen', 'Rossi', 'Tanaka', 'Murphy', 'Dubois', 'Singh', 'Costa',
            'Larsen', 'Moreau', 'Ahmed', 'Fischer', 'Lopez', 'Kim', 'Brown'
        ])[(n * 7) % 23 + 1] end as last_name,
        n % 10 as place,
        -- a fixed pseudo-random spend; one customer in 25 has never ordered
        case when n % 25 = 0 then 0 else (n * 7919) % 100000 end as spend_cents

    from ids

),

customers as (

    select
        customer_id,
        lower(first_name || '.' || last_name || '.' || cast(n as varchar)) || '@example.com'
            as email,
        -- +1 415 555 1001 and up: every one is a valid E.164 number (checked with phonenumbers)
        '+1415555' || lpad(cast(1000 + n as varchar), 4, '0') as phone,
        first_name,
        last_name,
        (array[
            'San Francisco', 'New York', 'Austin', 'Chicago', 'Toronto',
            'London', 'Berlin', 'Paris', 'Sydney', 'Tokyo'
        ])[place + 1] as city,
        (array[
            'United States', 'United States', 'United States', 'United States', 'Canada',
            'United Kingdom', 'Germany', 'France', 'Australia', 'Japan'
        ])[place + 1] as country,
        spend_cents,
        spend_cents >= 80000 as is_vip,
        date '2022-01-01' + cast((n * 37) % 1000 as integer) as signup_date,
        -- the last order falls within 300 days after signing up
        case
            when spend_cents > 0
                then {{ dbt.dateadd(
                    'minute',
                    '(n * 7717) % 432000',
                    "cast(date '2022-01-01' + cast((n * 37) % 1000 as integer) as timestamp)"
                ) }}
        end as last_order_at,
        ((n * 31) + {{ step }} * 17) % 997 as internal_score

    from base

),

{% if step >= 1 -%}
changed as (

    select
        customer_id,
        email,
        phone,
        first_name,
        last_name,
        case when customer_id = 'C00010' then 'Oakland' else city end as city,
        country,
        case when customer_id = 'C00042' then spend_cents + 25000 else spend_cents end
            as spend_cents,
        case when customer_id = 'C00077' then true else is_vip end as is_vip,
        signup_date,
        last_order_at,
        internal_score
    from customers

)
{%- else -%}
changed as (select * from customers)
{%- endif %}

select
    customer_id,
    email,
    phone,
    first_name,
    last_name,
    city,
    country,
    cast(spend_cents / 100.0 as decimal(12, 2)) as lifetime_value,
    is_vip,
    cast(signup_date as date) as signup_date,
    cast(last_order_at as timestamp) as last_order_at,
    -- not annotated in schema.yml: never synced, whatever its value
    cast(internal_score as integer) as internal_score
from changed
