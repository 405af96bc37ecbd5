{#- The few SQL forms that differ between warehouses, each a dispatched macro (dbt-utils
    style), so that every job's macro is written once: `default__` is PostgreSQL's (and
    what most engines take), `<adapter>__` where an engine needs other SQL for the same job.
    tests/test_dialects.py renders every job for every adapter dbt maintains and parses it
    in that engine's dialect. -#}

{#- text_type(): the type of text columns in the state tables. Redshift's VARCHAR is 256
    bytes unless told otherwise, too short for the values and event bodies kept. -#}
{% macro text_type() -%}
  {{ return(adapter.dispatch('text_type', 'klaviyo_sync')()) }}
{%- endmacro %}

{% macro default__text_type() %}{{ return(type_string()) }}{% endmacro %}

{% macro redshift__text_type() %}{{ return('varchar(max)') }}{% endmacro %}

{#- timestamp_type(): an instant (with its time zone where the engine keeps one). -#}
{% macro timestamp_type() -%}
  {{ return(adapter.dispatch('timestamp_type', 'klaviyo_sync')()) }}
{%- endmacro %}

{% macro default__timestamp_type() %}{{ return('timestamp with time zone') }}{% endmacro %}

{#- BigQuery's and Spark's TIMESTAMP is an instant already (they have no WITH TIME ZONE). -#}
{% macro bigquery__timestamp_type() %}{{ return('timestamp') }}{% endmacro %}

{% macro spark__timestamp_type() %}{{ return('timestamp') }}{% endmacro %}

{#- now(): the current instant. Redshift's CURRENT_TIMESTAMP runs on the leader node only. -#}
{% macro now() -%}
  {{ return(adapter.dispatch('now', 'klaviyo_sync')()) }}
{%- endmacro %}

{% macro default__now() %}{{ return('current_timestamp') }}{% endmacro %}

{% macro redshift__now() %}{{ return('getdate()') }}{% endmacro %}

{#- seconds_between(start, end): the seconds from one instant to another, with fractions. -#}
{% macro seconds_between(start, end) -%}
  {{ return(adapter.dispatch('seconds_between', 'klaviyo_sync')(start, end)) }}
{%- endmacro %}

{% macro default__seconds_between(start, end) -%}
  {{ return('extract(epoch from ' ~ end ~ ' - ' ~ start ~ ')') }}
{%- endmacro %}

{% macro snowflake__seconds_between(start, end) -%}
  {{ return('datediff(millisecond, ' ~ start ~ ', ' ~ end ~ ') / 1000.0') }}
{%- endmacro %}

{% macro redshift__seconds_between(start, end) -%}
  {{ return(klaviyo_sync.snowflake__seconds_between(start, end)) }}
{%- endmacro %}

{% macro bigquery__seconds_between(start, end) -%}
  {{ return('timestamp_diff(' ~ end ~ ', ' ~ start ~ ', millisecond) / 1000.0') }}
{%- endmacro %}

{% macro spark__seconds_between(start, end) -%}
  {{ return('(unix_millis(' ~ end ~ ') - unix_millis(' ~ start ~ ')) / 1000.0') }}
{%- endmacro %}

{% macro trino__seconds_between(start, end) -%}
  {{ return("date_diff('millisecond', " ~ start ~ ', ' ~ end ~ ') / 1000.0') }}
{%- endmacro %}

{#- minutes_from_now(minutes): the instant so many minutes from now (a lease's expiry). -#}
{% macro minutes_from_now(minutes) -%}
  {{ return(adapter.dispatch('minutes_from_now', 'klaviyo_sync')(minutes | int)) }}
{%- endmacro %}

{% macro default__minutes_from_now(minutes) -%}
  {{ return(klaviyo_sync.now() ~ " + interval '" ~ minutes ~ " minutes'") }}
{%- endmacro %}

{% macro snowflake__minutes_from_now(minutes) -%}
  {{ return('dateadd(minute, ' ~ minutes ~ ', ' ~ klaviyo_sync.now() ~ ')') }}
{%- endmacro %}

{% macro redshift__minutes_from_now(minutes) -%}
  {{ return(klaviyo_sync.snowflake__minutes_from_now(minutes)) }}
{%- endmacro %}

{% macro bigquery__minutes_from_now(minutes) -%}
  {{ return('timestamp_add(current_timestamp, interval ' ~ minutes ~ ' minute)') }}
{%- endmacro %}

{% macro spark__minutes_from_now(minutes) -%}
  {{ return('current_timestamp + interval ' ~ minutes ~ ' minutes') }}
{%- endmacro %}

{% macro trino__minutes_from_now(minutes) -%}
  {{ return("current_timestamp + interval '" ~ minutes ~ "' minute") }}
{%- endmacro %}

{#- work_table(schema, name, sid): the table holding a run's working rows (`changes`, the
    diff; `outcomes`, a batch of answers). Where the engine has temporary tables, a
    temporary `klaviyo_<name>` of the session; elsewhere (BigQuery outside scripts, Spark,
    Trino) a table of the state schema for the sync, replaced by each run of it. -#}
{% macro work_table(schema, name, sid) -%}
  {{ return(adapter.dispatch('work_table', 'klaviyo_sync')(schema, name, sid)) }}
{%- endmacro %}

{% macro default__work_table(schema, name, sid) %}{{ return('klaviyo_' ~ name) }}{% endmacro %}

{% macro _state_work_table(schema, name, sid) -%}
  {{ return(schema ~ '.' ~ name ~ '_' ~ sid) }}
{%- endmacro %}

{% macro bigquery__work_table(schema, name, sid) -%}
  {{ return(klaviyo_sync._state_work_table(schema, name, sid)) }}
{%- endmacro %}

{% macro spark__work_table(schema, name, sid) -%}
  {{ return(klaviyo_sync._state_work_table(schema, name, sid)) }}
{%- endmacro %}

{% macro trino__work_table(schema, name, sid) -%}
  {{ return(klaviyo_sync._state_work_table(schema, name, sid)) }}
{%- endmacro %}

{#- analyze(table): the statements that give the planner a work table's statistics once its
    rows are in (a list, empty where the engine needs none). PostgreSQL never analyzes a
    temporary table by itself: without statistics it took a commit of 70,000 answers for a
    handful of rows and joined them to the journal in a nested loop, for twenty minutes. -#}
{% macro analyze(table) -%}
  {{ return(adapter.dispatch('analyze', 'klaviyo_sync')(table)) }}
{%- endmacro %}

{% macro default__analyze(table) %}{{ return([]) }}{% endmacro %}

{% macro postgres__analyze(table) %}{{ return(['analyze ' ~ table]) }}{% endmacro %}

{% macro redshift__analyze(table) %}{{ return(['analyze ' ~ table]) }}{% endmacro %}

{#- create_table(table, body, work): `create table` with the columns (`body` in brackets)
    or the query (`as ...`) of `body`; `work`: a work table (see work_table). -#}
{% macro create_table(table, body, work=false) -%}
  {{ return(adapter.dispatch('create_table', 'klaviyo_sync')(table, body, work)) }}
{%- endmacro %}

{% macro default__create_table(table, body, work) -%}
  {%- set exists = '' if body.startswith('as ') else 'if not exists ' -%}
  {{ return('create ' ~ ('temporary ' if work else '') ~ 'table ' ~ exists ~ table ~ ' ' ~ body) }}
{%- endmacro %}

{% macro bigquery__create_table(table, body, work) -%}
  {%- set exists = '' if body.startswith('as ') else 'if not exists ' -%}
  {{ return('create table ' ~ exists ~ table ~ ' ' ~ body) }}
{%- endmacro %}

{% macro trino__create_table(table, body, work) -%}
  {{ return(klaviyo_sync.bigquery__create_table(table, body, work)) }}
{%- endmacro %}

{#- Spark: row-level DML (the state's deletes, updates and merges) needs a table format that
    has it, Delta Lake unless the var `klaviyo_sync_file_format` names another (iceberg);
    plain parquet tables refuse it. -#}
{% macro spark__create_table(table, body, work) -%}
  {%- set using = ' using ' ~ var('klaviyo_sync_file_format', 'delta') -%}
  {%- if body.startswith('as ') -%}{{ return('create table ' ~ table ~ using ~ ' ' ~ body) }}
  {%- else -%}{{ return('create table if not exists ' ~ table ~ ' ' ~ body ~ using) }}
  {%- endif -%}
{%- endmacro %}

{#- primary_key(columns): a table's key where the engine has keys (declared, not enforced,
    elsewhere: the state is keyed by sync id in the statements themselves). -#}
{% macro primary_key(columns) -%}
  {{ return(adapter.dispatch('primary_key', 'klaviyo_sync')(columns)) }}
{%- endmacro %}

{% macro default__primary_key(columns) -%}
  {{ return(', primary key (' ~ columns ~ ')') }}
{%- endmacro %}

{% macro bigquery__primary_key(columns) %}{{ return('') }}{% endmacro %}

{% macro spark__primary_key(columns) %}{{ return('') }}{% endmacro %}

{% macro trino__primary_key(columns) %}{{ return('') }}{% endmacro %}

{#- clear_table(table): empty a work table. -#}
{% macro clear_table(table) -%}
  {{ return(adapter.dispatch('clear_table', 'klaviyo_sync')(table)) }}
{%- endmacro %}

{% macro default__clear_table(table) %}{{ return('truncate ' ~ table) }}{% endmacro %}

{% macro bigquery__clear_table(table) %}{{ return('truncate table ' ~ table) }}{% endmacro %}

{% macro spark__clear_table(table) %}{{ return('delete from ' ~ table) }}{% endmacro %}

{% macro trino__clear_table(table) %}{{ return('delete from ' ~ table) }}{% endmacro %}

{#- keyed_change(table, column, keys, condition, set): delete (or, with `set`, update) the
    rows of `table` whose `column` is among the keys the query `keys` returns, and that meet
    `condition` (SQL over the table's columns, or none). Spark's Delta tables take no
    subquery in a DELETE or UPDATE condition: a MERGE does it. -#}
{% macro keyed_change(table, column, keys, condition=none, set=none) -%}
  {{ return(adapter.dispatch('keyed_change', 'klaviyo_sync')(table, column, keys, condition, set)) }}
{%- endmacro %}

{% macro default__keyed_change(table, column, keys, condition, set) -%}
  {%- set action = 'update ' ~ table ~ ' set ' ~ set if set else 'delete from ' ~ table -%}
  {%- set where = (condition ~ ' and ' if condition else '') ~ column ~ ' in (' ~ keys ~ ')' -%}
  {{ return(action ~ ' where ' ~ where) }}
{%- endmacro %}

{% macro spark__keyed_change(table, column, keys, condition, set) -%}
  {{ return('merge into ' ~ table ~ ' as t using (select distinct * from (' ~ keys
      ~ ') as k0) as k (k) on ' ~ (condition ~ ' and ' if condition else '') ~ 't.' ~ column
      ~ ' = k.k when matched then ' ~ ('update set ' ~ set if set else 'delete')) }}
{%- endmacro %}
