{#- klaviyo_sync.commit_outcomes(schema, sid, run_id, model): the statements that record a
    batch of Klaviyo's answers, loaded into the session's temporary table `klaviyo_outcomes`
    (or the sync's work table: see work_table; the columns of OUTCOME_SCHEMA in
    dbt_klaviyo_sync/changeset.py), in one transaction: accepted rows update the snapshot
    (the values of a journaled record come from the journal), refused rows are remembered and
    logged, answered rows leave the journal, and the sync's lease (sync_lock) is renewed.
    Returns the statement that creates the outcomes table ('table'), the one that empties it
    ('clear'), its name ('name') and the others in order ('steps'). -#}
{% macro commit_outcomes(schema, sid, run_id, model) -%}
  {{ return(adapter.dispatch('commit_outcomes', 'klaviyo_sync')(schema, sid, run_id, model)) }}
{%- endmacro %}

{#- The outcomes table, and the batch's answers with a journaled record's values. -#}
{% macro _outcomes(schema, sid) -%}
  {%- set text = klaviyo_sync.text_type() -%}
  {%- set name = klaviyo_sync.work_table(schema, 'outcomes', sid) -%}
  {%- set answers -%}
    (select b.key, b.outcome, b.fingerprint,
            coalesce(b.accepted_values, j.accepted_values) as accepted_values,
            b.klaviyo_id, b.in_snapshot, b.retry
     from {{ name }} as b left join (
         select key, accepted_values from (
             select key, accepted_values,
                    row_number() over (partition by key order by journaled_at desc) as n
             from {{ schema }}.journal where sync_id = {{ klaviyo_sync.literal(sid) }}) as j0
         where n = 1) as j on j.key = b.key)
  {%- endset -%}
  {{ return({
    'name': name,
    'answers': answers,
    'table': klaviyo_sync.create_table(name, '(key ' ~ text ~ ', outcome ' ~ text
      ~ ', fingerprint bigint, accepted_values ' ~ text ~ ', klaviyo_id ' ~ text
      ~ ', in_snapshot boolean, column_name ' ~ text ~ ', field ' ~ text ~ ', code ' ~ text
      ~ ', reason ' ~ text ~ ', retry boolean)', work=true),
    'clear': klaviyo_sync.clear_table(name),
  }) }}
{%- endmacro %}

{#- The rejects logged and the journal's answered records, the same on every engine. -#}
{% macro _log_and_unjournal(schema, sid, run_id, model, outcomes) -%}
  {%- set sid_ = klaviyo_sync.literal(sid) -%}
  {%- set answered = "('accepted', 'rejected', 'removed', 'forgotten')" -%}
  {{ return([
      'insert into ' ~ schema ~ '.rejects (run_id, sync_id, model, key, column_name, field, code,'
        ~ ' reason, fingerprint, rejected_at, retried) select ' ~ klaviyo_sync.literal(run_id)
        ~ ', ' ~ sid_ ~ ', ' ~ klaviyo_sync.literal(model) ~ ', key, column_name, field, code,'
        ~ ' reason, fingerprint, ' ~ klaviyo_sync.now() ~ ', coalesce(retry, false) from '
        ~ outcomes ~ " where outcome in ('rejected', 'invalid')",
      klaviyo_sync.keyed_change(schema ~ '.journal', 'key', 'select key from ' ~ outcomes
        ~ ' where outcome in ' ~ answered, condition='sync_id = ' ~ sid_),
      klaviyo_sync.keyed_change(schema ~ '.jobs', 'unit', 'select unit from ' ~ schema
        ~ '.jobs where sync_id = ' ~ sid_ ~ ' and unit not in (select distinct unit from '
        ~ schema ~ '.journal where sync_id = ' ~ sid_ ~ ')', condition='sync_id = ' ~ sid_),
  ]) }}
{%- endmacro %}

{% macro default__commit_outcomes(schema, sid, run_id, model) -%}
  {%- set sid_ = klaviyo_sync.literal(sid) -%}
  {%- set now = klaviyo_sync.now() -%}
  {%- set o = klaviyo_sync._outcomes(schema, sid) -%}
  {%- set steps = [
      'insert into ' ~ schema ~ '.snapshot (sync_id, key, fingerprint, accepted_values,'
        ~ ' klaviyo_id, rejected_fingerprint, retry_rejected, updated_at)'
        ~ ' select ' ~ sid_ ~ ", key, case when outcome = 'accepted' then fingerprint end,"
        ~ " case when outcome = 'accepted' then accepted_values end, klaviyo_id,"
        ~ " case when outcome = 'rejected' then fingerprint end,"
        ~ " case when outcome = 'rejected' then retry end, " ~ now
        ~ ' from ' ~ o.answers ~ " as o where not in_snapshot and outcome in ('accepted', 'rejected')",
      'delete from ' ~ schema ~ '.snapshot where sync_id = ' ~ sid_ ~ ' and key in (select key'
        ~ ' from ' ~ o.name ~ " where (in_snapshot and outcome = 'accepted')"
        ~ " or outcome in ('removed', 'forgotten'))",
      'insert into ' ~ schema ~ '.snapshot (sync_id, key, fingerprint, accepted_values,'
        ~ ' klaviyo_id, rejected_fingerprint, retry_rejected, updated_at)'
        ~ ' select ' ~ sid_ ~ ', key, fingerprint, accepted_values, klaviyo_id, null, null, '
        ~ now ~ ' from ' ~ o.answers ~ " as o where in_snapshot and outcome = 'accepted'",
      'update ' ~ schema ~ ".snapshot as s set rejected_fingerprint = case when b.outcome ="
        ~ " 'rejected' then b.fingerprint end, retry_rejected = case when b.outcome ="
        ~ " 'rejected' then b.retry end, updated_at = " ~ now ~ " from " ~ o.name ~ " as b"
        ~ ' where s.sync_id = ' ~ sid_ ~ " and s.key = b.key and b.in_snapshot"
        ~ " and b.outcome in ('rejected', 'settled')",
  ] -%}
  {{ return({'table': o.table, 'clear': o['clear'], 'name': o.name,
             'steps': klaviyo_sync.analyze(o.name) + steps + klaviyo_sync._log_and_unjournal(schema, sid, run_id, model, o.name)
                      + klaviyo_sync.sync_lock(schema, sid, none).renew}) }}
{%- endmacro %}

{#- BigQuery, Spark (Delta) and Trino: the snapshot's upkeep in one MERGE (BigQuery counts
    DML statements against its quotas; Spark and Trino have no UPDATE ... FROM). -#}
{% macro _merge_commit_outcomes(schema, sid, run_id, model) -%}
  {%- set sid_ = klaviyo_sync.literal(sid) -%}
  {%- set now = klaviyo_sync.now() -%}
  {%- set o = klaviyo_sync._outcomes(schema, sid) -%}
  {%- set merge -%}
    merge into {{ schema }}.snapshot as s
    using (select * from {{ o.answers }} as a
           where outcome in ('accepted', 'rejected', 'removed', 'forgotten', 'settled')) as o
    on s.sync_id = {{ sid_ }} and s.key = o.key
    when matched and o.outcome in ('removed', 'forgotten') then delete
    when matched and o.outcome = 'accepted' then update set
        fingerprint = o.fingerprint, accepted_values = o.accepted_values,
        klaviyo_id = o.klaviyo_id, rejected_fingerprint = null, retry_rejected = null,
        updated_at = {{ now }}
    when matched and o.in_snapshot then update set
        rejected_fingerprint = case when o.outcome = 'rejected' then o.fingerprint end,
        retry_rejected = case when o.outcome = 'rejected' then o.retry end,
        updated_at = {{ now }}
    when not matched and o.outcome in ('accepted', 'rejected') then insert
        (sync_id, key, fingerprint, accepted_values, klaviyo_id, rejected_fingerprint,
         retry_rejected, updated_at)
        values ({{ sid_ }}, o.key,
                case when o.outcome = 'accepted' then o.fingerprint end,
                case when o.outcome = 'accepted' then o.accepted_values end, o.klaviyo_id,
                case when o.outcome = 'rejected' then o.fingerprint end,
                case when o.outcome = 'rejected' then o.retry end, {{ now }})
  {%- endset -%}
  {{ return({'table': o.table, 'clear': o['clear'], 'name': o.name,
             'steps': klaviyo_sync.analyze(o.name) + [merge] + klaviyo_sync._log_and_unjournal(schema, sid, run_id, model, o.name)
                      + klaviyo_sync.sync_lock(schema, sid, none).renew}) }}
{%- endmacro %}

{% macro bigquery__commit_outcomes(schema, sid, run_id, model) -%}
  {{ return(klaviyo_sync._merge_commit_outcomes(schema, sid, run_id, model)) }}
{%- endmacro %}

{% macro spark__commit_outcomes(schema, sid, run_id, model) -%}
  {{ return(klaviyo_sync._merge_commit_outcomes(schema, sid, run_id, model)) }}
{%- endmacro %}

{% macro trino__commit_outcomes(schema, sid, run_id, model) -%}
  {{ return(klaviyo_sync._merge_commit_outcomes(schema, sid, run_id, model)) }}
{%- endmacro %}
