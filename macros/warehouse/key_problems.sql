{#- klaviyo_sync.key_problems(relation, key_text, key_field): the statements that find a
    model's rows the next sync rejects for their key alone, over the whole model, with the
    key normalised as the diff keys rows (sync_key): `counts` (rows with a NULL key, keys
    on more than one row) and `examples` (a few of those keys). `validate` runs them. -#}
{% macro key_problems(relation, key_text, key_field) -%}
  {{ return(adapter.dispatch('key_problems', 'klaviyo_sync')(relation, key_text, key_field)) }}
{%- endmacro %}

{% macro default__key_problems(relation, key_text, key_field) -%}
  {%- set keys = 'select ' ~ klaviyo_sync.sync_key(key_text, key_field) ~ ' as k from ' ~ relation -%}
  {%- set duplicated = 'select k from (' ~ keys ~ ') as keys where k is not null'
      ~ ' group by k having count(*) > 1' -%}
  {{ return({
      'counts': 'select (select count(*) from (' ~ keys ~ ') as keys where k is null),'
                ~ ' (select count(*) from (' ~ duplicated ~ ') as d)',
      'examples': 'select k from (' ~ duplicated ~ ') as d order by k limit 3',
  }) }}
{%- endmacro %}
