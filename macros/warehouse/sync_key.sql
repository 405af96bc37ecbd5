{#- klaviyo_sync.sync_key(text, key_field): a sync key (the SQL text of its value) as
    Klaviyo matches it: emails without case or surrounding blanks, phone numbers without the
    spaces, dots, dashes and brackets people write in them; other keys as they are. -#}
{% macro sync_key(text, key_field) -%}
  {{ return(adapter.dispatch('sync_key', 'klaviyo_sync')(text, key_field)) }}
{%- endmacro %}

{#- phone_marks(text): the phone number without spaces, dots, dashes and brackets. -#}
{% macro phone_marks(text) -%}
  {{ return(adapter.dispatch('phone_marks', 'klaviyo_sync')(text)) }}
{%- endmacro %}

{% macro default__sync_key(text, key_field) -%}
  {%- if key_field == 'email' -%}{{ return('lower(trim(' ~ text ~ '))') }}
  {%- elif key_field == 'phone_number' -%}{{ return(klaviyo_sync.phone_marks('trim(' ~ text ~ ')')) }}
  {%- else -%}{{ return(text) }}
  {%- endif -%}
{%- endmacro %}

{#- PostgreSQL and DuckDB replace every match only with the 'g' flag. -#}
{% macro default__phone_marks(text) -%}
  {{ return("regexp_replace(" ~ text ~ ", '[[:space:]().-]', '', 'g')") }}
{%- endmacro %}

{#- Snowflake and Redshift (POSIX classes) replace every match without a flag. -#}
{% macro snowflake__phone_marks(text) -%}
  {{ return("regexp_replace(" ~ text ~ ", '[[:space:]().-]', '')") }}
{%- endmacro %}

{% macro redshift__phone_marks(text) -%}
  {{ return(klaviyo_sync.snowflake__phone_marks(text)) }}
{%- endmacro %}

{#- BigQuery (RE2) and Trino (Java) write white space \s; a raw string in BigQuery. -#}
{% macro bigquery__phone_marks(text) -%}
  {{ return("regexp_replace(" ~ text ~ ", r'[\\s().-]', '')") }}
{%- endmacro %}

{% macro trino__phone_marks(text) -%}
  {{ return("regexp_replace(" ~ text ~ ", '[\\s().-]', '')") }}
{%- endmacro %}

{#- Spark's string literals read backslash escapes: \\s reaches the (Java) regex as \s. -#}
{% macro spark__phone_marks(text) -%}
  {{ return("regexp_replace(" ~ text ~ ", '[\\\\s().-]', '')") }}
{%- endmacro %}
