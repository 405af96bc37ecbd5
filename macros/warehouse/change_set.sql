{#- klaviyo_sync.change_set(...): the statements that work out, inside the warehouse, the
    rows of a model to act on, into the session's temporary table `klaviyo_changes` (or
    the sync's work table where the engine has none: see work_table) with the columns of
    dbt_klaviyo_sync/changeset.py: the model's rows, their normalised sync key
    and fingerprint, full-outer-joined with the sync's snapshot, so that only added,
    changed and removed rows come out, and only they leave the warehouse.

    schema: the state schema; relation: the model; key_text: the SQL of the sync key
    column's text; key_field: the identifier it is; values: the SQL of the other mapped
    values, in order (f1, f2, ...); texts: the SQL of their texts over f1, f2, ..., for the
    fingerprint; signature: the mapping's digest; sid: the sync id; once: deletions and
    events act once per key; events: the bodies of events in flight come along. Returns the
    statements by name: drop, create, analyze (a list), duplicates, counts, rows. -#}
{% macro change_set(schema, relation, key_text, key_field, values, texts, signature, sid, once, events) -%}
  {{ return(adapter.dispatch('change_set', 'klaviyo_sync')(
      schema, relation, key_text, key_field, values, texts, signature, sid, once, events)) }}
{%- endmacro %}

{% macro default__change_set(schema, relation, key_text, key_field, values, texts, signature, sid, once, events) -%}
  {%- set sid_ = klaviyo_sync.literal(sid) -%}
  {%- set once_ = 'true' if once else 'false' -%}
  {%- set key = klaviyo_sync.sync_key(key_text, key_field) -%}
  {%- set changes = klaviyo_sync.work_table(schema, 'changes', sid) -%}
  {%- set fields = [] -%}
  {%- for i in range(1, values | length + 1) %}{% do fields.append('f' ~ i) %}{% endfor -%}
  {#- Only the columns the sync reads leave the warehouse: the key is not sent twice (the
      reader takes f0 from __key), and __sent comes only for events. -#}
  {%- set sent -%}
    select key, body from (
      select key, body, row_number() over (partition by key order by journaled_at desc) as n
      from {{ schema }}.journal where sync_id = {{ sid_ }} and body is not null) as j0
    where n = 1
  {%- endset -%}
  {%- set query -%}
    as
    with model as (
        select __key,
               {{ klaviyo_sync.fingerprint(signature, ['__key'] + texts) }} as __fingerprint
               {%- for f in fields %}, {{ f }}{% endfor %}
        from (select {{ key }} as __key
                     {%- for value in values %}, {{ value }} as f{{ loop.index }}{% endfor %}
              from {{ relation }}) as m0
    ),
    snap as (
        select key, fingerprint, rejected_fingerprint, retry_rejected, klaviyo_id
        from {{ schema }}.snapshot where sync_id = {{ sid_ }}
    )
    {%- if events %},
    sent as ({{ sent }})
    {%- endif %}
    select case when m.__fingerprint is null then
                     case when {{ once_ }} then 'forget' else 'remove' end
                when m.__key is null then 'null_key'
                when s.fingerprint is null then 'add'
                when m.__fingerprint = s.fingerprint then 'settle'
                else 'update' end as __change,
           s.key is not null as __in_snapshot,
           s.klaviyo_id as __klaviyo_id,
           coalesce(m.__key, s.key) as __key,
           coalesce(m.__fingerprint, s.fingerprint) as __fingerprint
           {%- if events %}, j.body as __sent{% endif %}
           {%- for f in fields %}, m.{{ f }}{% endfor %}
    from model as m
    full outer join snap as s on s.key = m.__key
    {%- if events %}
    left join sent as j on j.key = coalesce(m.__key, s.key)
    {%- endif %}
    where case when m.__fingerprint is null then not {{ once_ }} or s.fingerprint is null
               when m.__key is null then true
               when m.__fingerprint = s.fingerprint then s.rejected_fingerprint is not null
               else (s.rejected_fingerprint is null or m.__fingerprint <> s.rejected_fingerprint
                     or coalesce(s.retry_rejected, false))
                    and (not {{ once_ }} or s.fingerprint is null) end
  {%- endset -%}
  {%- set duplicated -%}
    select k from (select {{ key }} as k from {{ relation }}) as keys
    where k in (select __key from {{ changes }} where __change in ('add', 'update'))
    group by k having count(*) > 1
  {%- endset -%}
  {{ return({
      'drop': 'drop table if exists ' ~ changes,
      'create': klaviyo_sync.create_table(changes, query, work=true),
      'analyze': klaviyo_sync.analyze(changes),
      'duplicates': klaviyo_sync.keyed_change(changes, '__key', duplicated,
          condition="__change in ('add', 'update')", set="__change = 'duplicate_key'"),
      'counts': "select case when __change in ('null_key', 'duplicate_key') then 'invalid'"
                ~ " else __change end, count(*) from " ~ changes ~ " group by 1",
      'rows': 'select count(*) from ' ~ relation,
  }) }}
{%- endmacro %}
