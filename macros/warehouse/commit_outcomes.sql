{#- klaviyo_sync.commit_outcomes(schema, sid, run_id, model): the statements that record a
    batch of Klaviyo's answers, loaded into the session's temporary table `klaviyo_outcomes`
    (the columns of OUTCOME_SCHEMA in dbt_klaviyo_sync/changeset.py), in one transaction:
    accepted rows update the snapshot (the values of a journaled record come from the
    journal), refused rows are remembered and logged, answered rows leave the journal.
    Returns the statement that creates `klaviyo_outcomes` ('table') and the others in order
    ('steps'). -#}
{% macro commit_outcomes(schema, sid, run_id, model) -%}
  {{ return(adapter.dispatch('commit_outcomes', 'klaviyo_sync')(schema, sid, run_id, model)) }}
{%- endmacro %}

{% macro default__commit_outcomes(schema, sid, run_id, model) -%}
  {%- set text = type_string() -%}
  {%- set sid_ = klaviyo_sync.literal(sid) -%}
  {%- set outcomes -%}
    (select b.key, b.outcome, b.fingerprint,
            coalesce(b.accepted_values, j.accepted_values) as accepted_values,
            b.klaviyo_id, b.in_snapshot, b.retry
     from klaviyo_outcomes as b left join (
         select key, accepted_values from (
             select key, accepted_values,
                    row_number() over (partition by key order by journaled_at desc) as n
             from {{ schema }}.journal where sync_id = {{ sid_ }}) as j0
         where n = 1) as j on j.key = b.key)
  {%- endset -%}
  {%- set answered = "('accepted', 'rejected', 'removed', 'forgotten')" -%}
  {{ return({
    'table': 'create temporary table if not exists klaviyo_outcomes (key ' ~ text
      ~ ', outcome ' ~ text ~ ', fingerprint bigint, accepted_values ' ~ text ~ ', klaviyo_id '
      ~ text ~ ', in_snapshot boolean, column_name ' ~ text ~ ', field ' ~ text ~ ', code '
      ~ text ~ ', reason ' ~ text ~ ', retry boolean)',
    'steps': [
      'insert into ' ~ schema ~ '.snapshot (sync_id, key, fingerprint, accepted_values,'
        ~ ' klaviyo_id, rejected_fingerprint, retry_rejected, updated_at)'
        ~ ' select ' ~ sid_ ~ ", key, case when outcome = 'accepted' then fingerprint end,"
        ~ " case when outcome = 'accepted' then accepted_values end, klaviyo_id,"
        ~ " case when outcome = 'rejected' then fingerprint end,"
        ~ " case when outcome = 'rejected' then retry end, current_timestamp"
        ~ ' from ' ~ outcomes ~ " as o where not in_snapshot and outcome in ('accepted', 'rejected')",
      'delete from ' ~ schema ~ '.snapshot where sync_id = ' ~ sid_ ~ ' and key in (select key'
        ~ " from klaviyo_outcomes where (in_snapshot and outcome = 'accepted')"
        ~ " or outcome in ('removed', 'forgotten'))",
      'insert into ' ~ schema ~ '.snapshot (sync_id, key, fingerprint, accepted_values,'
        ~ ' klaviyo_id, rejected_fingerprint, retry_rejected, updated_at)'
        ~ ' select ' ~ sid_ ~ ', key, fingerprint, accepted_values, klaviyo_id, null, null,'
        ~ ' current_timestamp from ' ~ outcomes ~ " as o where in_snapshot and outcome = 'accepted'",
      'update ' ~ schema ~ ".snapshot as s set rejected_fingerprint = case when b.outcome ="
        ~ " 'rejected' then b.fingerprint end, retry_rejected = case when b.outcome ="
        ~ " 'rejected' then b.retry end, updated_at = current_timestamp from klaviyo_outcomes as b"
        ~ ' where s.sync_id = ' ~ sid_ ~ " and s.key = b.key and b.in_snapshot"
        ~ " and b.outcome in ('rejected', 'settled')",
      'insert into ' ~ schema ~ '.rejects (run_id, sync_id, model, key, column_name, field, code,'
        ~ ' reason, fingerprint, rejected_at, retried) select ' ~ klaviyo_sync.literal(run_id)
        ~ ', ' ~ sid_ ~ ', ' ~ klaviyo_sync.literal(model) ~ ', key, column_name, field, code,'
        ~ ' reason, fingerprint, current_timestamp, coalesce(retry, false) from klaviyo_outcomes'
        ~ " where outcome in ('rejected', 'invalid')",
      'delete from ' ~ schema ~ '.journal where sync_id = ' ~ sid_ ~ ' and key in (select key'
        ~ ' from klaviyo_outcomes where outcome in ' ~ answered ~ ')',
      'delete from ' ~ schema ~ '.jobs where sync_id = ' ~ sid_ ~ ' and unit not in (select'
        ~ ' distinct unit from ' ~ schema ~ '.journal where sync_id = ' ~ sid_ ~ ')',
    ],
  }) }}
{%- endmacro %}
