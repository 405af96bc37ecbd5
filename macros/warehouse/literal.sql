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

{#- Snowflake, BigQuery, Spark and Databricks read backslash escapes in string literals
    (BigQuery takes no '' for a quote, nor a line break; Spark reads '' as two literals). -#}
{% macro _backslash_literal(value) -%}
  {%- if value is string -%}
    {%- set escaped = value | replace('\\', '\\\\') | replace("'", "\\'")
        | replace('\n', '\\n') | replace('\r', '\\r') -%}
    {{ return("'" ~ escaped ~ "'") }}
  {%- else -%}{{ return(klaviyo_sync.default__literal(value)) }}
  {%- endif -%}
{%- endmacro %}

{% macro snowflake__literal(value) %}{{ return(klaviyo_sync._backslash_literal(value)) }}{% endmacro %}

{% macro bigquery__literal(value) %}{{ return(klaviyo_sync._backslash_literal(value)) }}{% endmacro %}

{% macro spark__literal(value) %}{{ return(klaviyo_sync._backslash_literal(value)) }}{% endmacro %}

{#- Redshift reads backslash escapes too, and takes '' for a quote. -#}
{% macro redshift__literal(value) -%}
  {%- if value is string -%}
    {{ return("'" ~ (value | replace('\\', '\\\\') | replace("'", "''")) ~ "'") }}
  {%- else -%}{{ return(klaviyo_sync.default__literal(value)) }}
  {%- endif -%}
{%- endmacro %}
