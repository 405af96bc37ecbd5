{#- klaviyo_sync.sync_lock(schema, sid, holder): one sync at a time per sync id. Returns the
    statements that take the lock ('take', the last one answering 1 row, true or a count of 1,
    when this holder has it), keep it while the run commits ('renew') and give it back
    ('release'). `holder` names the run (unique per process); it may be none for 'renew'.

    PostgreSQL has advisory locks, released when the session ends. Elsewhere a lease: a row
    per sync id in the state schema's `leases` table, with an expiry `klaviyo_sync_lease_minutes`
    (60 by default) after the last commit, so that a killed run blocks its sync no longer. -#}
{% macro sync_lock(schema, sid, holder) -%}
  {{ return(adapter.dispatch('sync_lock', 'klaviyo_sync')(schema, sid, holder)) }}
{%- endmacro %}

{% macro default__sync_lock(schema, sid, holder) -%}
  {%- set key = 'hashtextextended(' ~ klaviyo_sync.literal(sid) ~ ', 0)' -%}
  {{ return({
      'take': ['select pg_try_advisory_lock(' ~ key ~ ')'],
      'renew': [],
      'release': ['select pg_advisory_unlock(' ~ key ~ ')'],
  }) }}
{%- endmacro %}

{#- The lease, taken in one MERGE (which the engines serialise per table): a new row, or
    the row of an expired lease or of this holder's. -#}
{% macro _lease(schema, sid, holder, take=none) -%}
  {%- set sid_, holder_ = klaviyo_sync.literal(sid), klaviyo_sync.literal(holder) -%}
  {%- set text = klaviyo_sync.text_type() -%}
  {%- set leases = schema ~ '.leases' -%}
  {%- set until = klaviyo_sync.minutes_from_now(var('klaviyo_sync_lease_minutes', 60)) -%}
  {%- set merge -%}
    merge into {{ leases }} as l using (select {{ sid_ }} as sync_id) as n
    on l.sync_id = n.sync_id
    when matched and (l.holder = {{ holder_ }} or l.expires_at < {{ klaviyo_sync.now() }})
        then update set holder = {{ holder_ }}, expires_at = {{ until }}
    when not matched then insert (sync_id, holder, expires_at)
        values ({{ sid_ }}, {{ holder_ }}, {{ until }})
  {%- endset -%}
  {%- set table = klaviyo_sync.create_table(leases, '(sync_id ' ~ text ~ ' not null, holder '
      ~ text ~ ' not null, expires_at ' ~ klaviyo_sync.timestamp_type() ~ ' not null)') -%}
  {%- set held = 'select count(*) from ' ~ leases ~ ' where sync_id = ' ~ sid_ ~ ' and holder = '
      ~ holder_ -%}
  {{ return({
      'take': [table] + (take or [merge]) + [held],
      'renew': ['update ' ~ leases ~ ' set expires_at = ' ~ until ~ ' where sync_id = ' ~ sid_],
      'release': ['delete from ' ~ leases ~ ' where sync_id = ' ~ sid_ ~ ' and holder = ' ~ holder_],
  }) }}
{%- endmacro %}

{% macro snowflake__sync_lock(schema, sid, holder) -%}
  {{ return(klaviyo_sync._lease(schema, sid, holder)) }}
{%- endmacro %}

{% macro bigquery__sync_lock(schema, sid, holder) -%}
  {{ return(klaviyo_sync._lease(schema, sid, holder)) }}
{%- endmacro %}

{% macro spark__sync_lock(schema, sid, holder) -%}
  {{ return(klaviyo_sync._lease(schema, sid, holder)) }}
{%- endmacro %}

{% macro trino__sync_lock(schema, sid, holder) -%}
  {{ return(klaviyo_sync._lease(schema, sid, holder)) }}
{%- endmacro %}

{#- DuckDB's file lock keeps other processes out already; the lease keeps a second sync of
    the same id in one process out too. -#}
{% macro duckdb__sync_lock(schema, sid, holder) -%}
  {{ return(klaviyo_sync._lease(schema, sid, holder)) }}
{%- endmacro %}

{#- Redshift has no advisory locks, and its MERGE takes no condition on WHEN MATCHED: an
    expired lease is dropped, then the row inserted unless another holder has it (Redshift's
    serializable isolation fails one of two such runs at once). -#}
{% macro redshift__sync_lock(schema, sid, holder) -%}
  {%- set sid_, holder_ = klaviyo_sync.literal(sid), klaviyo_sync.literal(holder) -%}
  {%- set leases = schema ~ '.leases' -%}
  {%- set until = klaviyo_sync.minutes_from_now(var('klaviyo_sync_lease_minutes', 60)) -%}
  {%- set take = [
      'delete from ' ~ leases ~ ' where sync_id = ' ~ sid_ ~ ' and (holder = ' ~ holder_
        ~ ' or expires_at < ' ~ klaviyo_sync.now() ~ ')',
      'insert into ' ~ leases ~ ' (sync_id, holder, expires_at) select ' ~ sid_ ~ ', ' ~ holder_
        ~ ', ' ~ until ~ ' where not exists (select 1 from ' ~ leases ~ ' where sync_id = '
        ~ sid_ ~ ')',
  ] -%}
  {{ return(klaviyo_sync._lease(schema, sid, holder, take=take)) }}
{%- endmacro %}
