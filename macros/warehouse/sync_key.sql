{#- klaviyo_sync.sync_key(text, key_field): a sync key (the SQL text of its value) as
    Klaviyo matches it: emails without case or surrounding blanks, phone numbers without the
    spaces, dots, dashes and brackets people write in them; other keys as they are. -#}
{% macro sync_key(text, key_field) -%}
  {{ return(adapter.dispatch('sync_key', 'klaviyo_sync')(text, key_field)) }}
{%- endmacro %}

{% macro default__sync_key(text, key_field) -%}
  {%- if key_field == 'email' -%}{{ return('lower(trim(' ~ text ~ '))') }}
  {%- elif key_field == 'phone_number' -%}
    {{ return("regexp_replace(trim(" ~ text ~ "), '[[:space:]().-]', '', 'g')") }}
  {%- else -%}{{ return(text) }}
  {%- endif -%}
{%- endmacro %}

{% macro snowflake__sync_key(text, key_field) -%}
  {%- if key_field == 'phone_number' -%}
    {{ return("regexp_replace(trim(" ~ text ~ "), '[[:space:]().-]', '')") }}
  {%- else -%}{{ return(klaviyo_sync.default__sync_key(text, key_field)) }}
  {%- endif -%}
{%- endmacro %}

{% macro bigquery__sync_key(text, key_field) -%}
  {%- if key_field == 'phone_number' -%}
    {{ return("regexp_replace(trim(" ~ text ~ "), r'[\\s().-]', '')") }}
  {%- else -%}{{ return(klaviyo_sync.default__sync_key(text, key_field)) }}
  {%- endif -%}
{%- endmacro %}

{% macro spark__sync_key(text, key_field) -%}
  {%- if key_field == 'phone_number' -%}
    {{ return("regexp_replace(trim(" ~ text ~ "), '[\\\\s().-]', '')") }}
  {%- else -%}{{ return(klaviyo_sync.default__sync_key(text, key_field)) }}
  {%- endif -%}
{%- endmacro %}

{% macro redshift__sync_key(text, key_field) -%}
  {{ return(klaviyo_sync.snowflake__sync_key(text, key_field)) }}
{%- endmacro %}
