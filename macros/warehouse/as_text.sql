{#- klaviyo_sync.as_text(expression): a value as text, the way the warehouse writes it. -#}
{% macro as_text(expression) -%}
  {{ return(adapter.dispatch('as_text', 'klaviyo_sync')(expression)) }}
{%- endmacro %}

{% macro default__as_text(expression) -%}
  {{ return('cast(' ~ expression ~ ' as ' ~ type_string() ~ ')') }}
{%- endmacro %}

{% macro bigquery__as_text(expression) -%}
  {{ return('to_json_string(' ~ expression ~ ')') }}
{%- endmacro %}
