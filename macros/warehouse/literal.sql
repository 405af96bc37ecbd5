{#- klaviyo_sync.literal(value): a Python value as an SQL literal (NULL, true/false, a
    number, or a quoted string), for the statements the sync renders and runs itself. -#}
{% macro literal(value) -%}
  {{ return(adapter.dispatch('literal', 'klaviyo_sync')(value)) }}
{%- endmacro %}

{% macro default__literal(value) -%}
  {%- if value is none -%}{{ return('null') }}
  {%- elif value is sameas true -%}{{ return('true') }}
  {%- elif value is sameas false -%}{{ return('false') }}
  {%- elif value is number -%}{{ return(value | string) }}
  {%- else -%}{{ return("'" ~ (value | string | replace("'", "''")) ~ "'") }}
  {%- endif -%}
{%- endmacro %}
