{#- klaviyo_sync.as_text(expression): a value as text, the way the warehouse writes it. -#}
{% macro as_text(expression) -%}
  {{ return(adapter.dispatch('as_text', 'klaviyo_sync')(expression)) }}
{%- endmacro %}

{% macro default__as_text(expression) -%}
  {{ return('cast(' ~ expression ~ ' as ' ~ type_string() ~ ')') }}
{%- endmacro %}

{#- Redshift's VARCHAR is 256 bytes unless told otherwise. -#}
{% macro redshift__as_text(expression) -%}
  {{ return('cast(' ~ expression ~ ' as ' ~ klaviyo_sync.text_type() ~ ')') }}
{%- endmacro %}
