{#- klaviyo_sync.state_tables(schema): the statements that create the sync state in the
    user's warehouse, when it is not there yet: one table per kind (syncs, snapshot, runs,
    rejects, journal, jobs), each keyed by sync id, never a table per sync or per run. The
    columns are those of the DuckDB state file (see docs/state.md, "The state tables"). -#}
{% macro state_tables(schema) -%}
  {{ return(adapter.dispatch('state_tables', 'klaviyo_sync')(schema)) }}
{%- endmacro %}

{% macro default__state_tables(schema) -%}
  {%- set text, stamp = klaviyo_sync.text_type(), klaviyo_sync.timestamp_type() -%}
  {%- set tables = {
    'meta': '(key ' ~ text ~ ' not null, value ' ~ text ~ ' not null)',
    'syncs': '(sync_id ' ~ text ~ ' not null, model ' ~ text ~ ' not null, unique_id ' ~ text
      ~ ' not null, object ' ~ text ~ ' not null, behavior ' ~ text ~ ' not null, list_id '
      ~ text ~ ', target ' ~ text ~ ' not null, base_url ' ~ text ~ ' not null, account_id '
      ~ text ~ ', fingerprint_version ' ~ text ~ ', created_at ' ~ stamp ~ ' not null'
      ~ klaviyo_sync.primary_key('sync_id') ~ ')',
    'snapshot': '(sync_id ' ~ text ~ ' not null, key ' ~ text ~ ' not null, fingerprint bigint,'
      ~ ' accepted_values ' ~ text ~ ', klaviyo_id ' ~ text ~ ', rejected_fingerprint bigint,'
      ~ ' retry_rejected boolean, updated_at ' ~ stamp ~ ' not null'
      ~ klaviyo_sync.primary_key('sync_id, key') ~ ')',
    'runs': '(run_id ' ~ text ~ ' not null, sync_id ' ~ text ~ ' not null, model ' ~ text
      ~ ' not null, started_at ' ~ stamp ~ ' not null, finished_at ' ~ stamp ~ ', dry_run'
      ~ ' boolean not null, full_refresh boolean not null, added bigint, updated bigint, removed'
      ~ ' bigint, unchanged bigint, rejected bigint, failed bigint, requests bigint, status '
      ~ text ~ ' not null, error ' ~ text ~ ', rate_limit_seconds decimal(18, 3)'
      ~ klaviyo_sync.primary_key('run_id') ~ ')',
    'rejects': '(run_id ' ~ text ~ ' not null, sync_id ' ~ text ~ ' not null, model ' ~ text
      ~ ' not null, key ' ~ text ~ ', column_name ' ~ text ~ ', field ' ~ text ~ ', code ' ~ text
      ~ ' not null, reason ' ~ text ~ ' not null, fingerprint bigint, rejected_at ' ~ stamp
      ~ ' not null, retried boolean)',
    'journal': '(sync_id ' ~ text ~ ' not null, unit ' ~ text ~ ' not null, position integer'
      ~ ' not null, key ' ~ text ~ ' not null, fingerprint bigint, in_snapshot boolean not null,'
      ~ ' klaviyo_id ' ~ text ~ ', accepted_values ' ~ text ~ ', body ' ~ text ~ ', journaled_at '
      ~ stamp ~ ' not null)',
    'jobs': '(sync_id ' ~ text ~ ' not null, unit ' ~ text ~ ' not null, job_id ' ~ text
      ~ ' not null, created_at ' ~ stamp ~ ' not null)',
  } -%}
  {%- set statements = ['create schema if not exists ' ~ schema] -%}
  {%- for name, columns in tables.items() -%}
    {%- do statements.append(klaviyo_sync.create_table(schema ~ '.' ~ name, columns)) -%}
  {%- endfor -%}
  {{ return(statements) }}
{%- endmacro %}
