{#- klaviyo_sync.state_sql(name, schema, a): the SQL of one of the sync's smaller jobs on its
    state in the user's warehouse, by name, with the values in `a` (a dict) written as SQL
    literals. The bigger jobs have macros of their own (state_tables, change_set,
    commit_outcomes, sync_lock); what differs between engines comes from dialect.sql. -#}
{% macro state_sql(name, schema, a) -%}
  {{ return(adapter.dispatch('state_sql', 'klaviyo_sync')(name, schema, a)) }}
{%- endmacro %}

{% macro default__state_sql(name, schema, a) -%}
  {%- set v = {} -%}
  {%- for key, value in a.items() -%}
    {%- if value is iterable and value is not string -%}
      {%- set items = [] -%}
      {%- for item in value %}{% do items.append(klaviyo_sync.literal(item)) %}{% endfor -%}
      {%- do v.update({key: '(' ~ (items | join(', ') if items else 'null') ~ ')'}) -%}
    {%- else -%}
      {%- do v.update({key: klaviyo_sync.literal(value)}) -%}
    {%- endif -%}
  {%- endfor -%}
  {%- set s = schema -%}
  {%- set now = klaviyo_sync.now() -%}
  {%- set changes = klaviyo_sync.work_table(schema, 'changes', a.get('sid')) -%}
  {%- set every_reject = "select * from " ~ s ~ ".rejects where model = " ~ v.get('model') -%}
  {%- set open_rejects = "select l.model, l.key, l.column_name, l.field, l.code, l.reason,"
      ~ " l.rejected_at from (select *, row_number() over (partition by sync_id, key order by"
      ~ " rejected_at desc) as n from " ~ s ~ ".rejects where model = " ~ v.get('model')
      ~ ") as l join " ~ s ~ ".snapshot as s on s.sync_id = l.sync_id and s.key = l.key"
      ~ " and s.rejected_fingerprint is not null where l.n = 1 union all select r.model,"
      ~ " r.key, r.column_name, r.field, r.code, r.reason, r.rejected_at from " ~ s
      ~ ".rejects as r left join " ~ s ~ ".snapshot as s on s.sync_id = r.sync_id and s.key"
      ~ " = r.key where r.run_id in (select run_id from (select run_id, row_number() over"
      ~ " (partition by sync_id order by started_at desc) as n from " ~ s ~ ".runs where model = "
      ~ v.get('model') ~ ") as last where n = 1) and s.key is null" -%}
  {%- set sql = {
    'schema_version': "select value from " ~ s ~ ".meta where key = 'schema_version'",
    'set_schema_version': "delete from " ~ s ~ ".meta where key = 'schema_version'; insert into "
      ~ s ~ ".meta (key, value) values ('schema_version', " ~ v.get('version') ~ ")",
    'has_syncs': "select count(*) from " ~ s ~ ".syncs",
    'accounts': "select sync_id, account_id from " ~ s ~ ".syncs where unique_id = "
      ~ v.get('unique_id') ~ " and object = " ~ v.get('object') ~ " and behavior = "
      ~ v.get('behavior') ~ " and coalesce(list_id, '') = " ~ v.get('list_id') ~ " and target = "
      ~ v.get('target') ~ " and base_url = " ~ v.get('base_url'),
    'register': "insert into " ~ s ~ ".syncs (sync_id, model, unique_id, object, behavior,"
      ~ " list_id, target, base_url, account_id, fingerprint_version, created_at) select "
      ~ v.get('sid')
      ~ ", " ~ v.get('model') ~ ", " ~ v.get('unique_id') ~ ", " ~ v.get('object') ~ ", "
      ~ v.get('behavior') ~ ", " ~ v.get('list_id') ~ ", " ~ v.get('target') ~ ", "
      ~ v.get('base_url') ~ ", " ~ v.get('account_id') ~ ", " ~ v.get('fingerprint_version')
      ~ ", " ~ now ~ " from (select 1 as one) as once where not exists (select 1 from " ~ s
      ~ ".syncs where sync_id = " ~ v.get('sid') ~ ")",
    'fingerprint_version': "select fingerprint_version from " ~ s ~ ".syncs where sync_id = "
      ~ v.get('sid'),
    'forget': "update " ~ s ~ ".snapshot set fingerprint = case when " ~ v.get('keep_accepted')
      ~ " then fingerprint end, accepted_values = case when " ~ v.get('keep_accepted')
      ~ " then accepted_values end, rejected_fingerprint = null, retry_rejected = null"
      ~ " where sync_id = " ~ v.get('sid'),
    'start_run': "insert into " ~ s ~ ".runs (run_id, sync_id, model, started_at, dry_run,"
      ~ " full_refresh, status) values (" ~ v.get('run_id') ~ ", " ~ v.get('sid') ~ ", "
      ~ v.get('model') ~ ", " ~ now ~ ", false, " ~ v.get('full_refresh') ~ ", 'running')",
    'finish_run': "update " ~ s ~ ".runs set finished_at = " ~ now ~ ", added = "
      ~ v.get('added') ~ ", updated = " ~ v.get('updated') ~ ", removed = " ~ v.get('removed')
      ~ ", unchanged = " ~ v.get('unchanged') ~ ", rejected = " ~ v.get('rejected')
      ~ ", failed = " ~ v.get('failed') ~ ", requests = " ~ v.get('requests') ~ ", status = "
      ~ v.get('status') ~ ", error = " ~ v.get('error') ~ ", rate_limit_seconds = "
      ~ v.get('rate_limit_seconds') ~ " where run_id = " ~ v.get('run_id'),
    'record_job': "insert into " ~ s ~ ".jobs (sync_id, unit, job_id, created_at) values ("
      ~ v.get('sid') ~ ", " ~ v.get('unit') ~ ", " ~ v.get('job_id') ~ ", " ~ now ~ ")",
    'journaled': "select j.unit, b.job_id, j.position, j.key, j.fingerprint, j.in_snapshot,"
      ~ " j.klaviyo_id, j.accepted_values, " ~ klaviyo_sync.seconds_between('j.journaled_at', now)
      ~ " from " ~ s ~ ".journal as j left join " ~ s ~ ".jobs as b on b.sync_id = j.sync_id"
      ~ " and b.unit = j.unit where j.sync_id = " ~ v.get('sid')
      ~ " order by j.journaled_at, j.unit, j.position",
    'drop_journal': "delete from " ~ s ~ ".journal where sync_id = " ~ v.get('sid')
      ~ " and unit in " ~ v.get('units') ~ "; delete from " ~ s ~ ".jobs where sync_id = "
      ~ v.get('sid') ~ " and unit in " ~ v.get('units'),
    'hold': klaviyo_sync.keyed_change(changes, '__key', "select key from " ~ s
      ~ ".journal where sync_id = " ~ v.get('sid') ~ " and unit in " ~ v.get('units')),
    'held': "select count(*) from " ~ changes ~ " where __key in (select key from " ~ s
      ~ ".journal where sync_id = " ~ v.get('sid') ~ " and unit in " ~ v.get('units') ~ ")",
    'standing_rejects': "select count(*) from " ~ s ~ ".snapshot where sync_id = "
      ~ v.get('sid') ~ " and rejected_fingerprint is not null and key not in (select __key"
      ~ " from " ~ changes ~ " where __key is not null)",
    'accepted_count': "select count(*) from " ~ s ~ ".snapshot where sync_id = "
      ~ v.get('sid') ~ " and fingerprint is not null",
    'accepted_values': "select key, accepted_values from " ~ s ~ ".snapshot where sync_id = "
      ~ v.get('sid') ~ " and key in " ~ v.get('keys') ~ " and fingerprint is not null",
    'forget_removed': klaviyo_sync.keyed_change(s ~ '.snapshot', 'key', "select __key from "
      ~ changes ~ " where __change = 'remove'", condition="sync_id = " ~ v.get('sid')),
    'changes': "select * from " ~ changes ~ " where __change in " ~ v.get('kinds'),
    'last_runs': "select model, started_at, round(cast("
      ~ klaviyo_sync.seconds_between('started_at', 'finished_at') ~ " as decimal(18, 3)), 1) as seconds, status, added, updated, removed, unchanged,"
      ~ " rejected, failed, requests, round(rate_limit_seconds, 1)"
      ~ " as rate_limit_seconds, error from (select r.*, row_number() over (partition by"
      ~ " model order by started_at desc) as n from " ~ s ~ ".runs as r where "
      ~ v.get('model') ~ " is null or model = " ~ v.get('model') ~ ") as r0 where n <= "
      ~ v.get('runs') ~ " order by model, started_at desc",
    'add_rate_limit_seconds': "alter table " ~ s ~ ".runs add column rate_limit_seconds"
      ~ " decimal(18, 3)",
    'known_model': "select count(*) from " ~ s ~ ".syncs where model = " ~ v.get('model'),
    'synced_models': "select distinct model from " ~ s ~ ".syncs order by model",
    'rejects': "select model, key, column_name, field, code, reason, rejected_at from ("
      ~ (every_reject if a.get('every') else open_rejects) ~ ") as found"
      ~ " order by rejected_at desc, key",
  } -%}
  {{ return(sql[name]) }}
{%- endmacro %}
