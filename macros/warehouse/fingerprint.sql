{#- klaviyo_sync.fingerprint(signature, texts): a row's fingerprint, a 64-bit integer from
    a documented, stable digest of a canonical text. The text is the mapping's signature and
    each value's text (`texts`: SQL expressions, in order) joined by U+001F, a NULL written as
    U+001E, so that NULL differs from '' and the column order counts. `md5-v1` takes the
    first 8 bytes of MD5 as a signed 64-bit integer, where the warehouse has MD5. -#}
{% macro fingerprint(signature, texts) -%}
  {{ return(adapter.dispatch('fingerprint', 'klaviyo_sync')(signature, texts)) }}
{%- endmacro %}

{% macro fingerprint_version() -%}
  {{ return(adapter.dispatch('fingerprint_version', 'klaviyo_sync')()) }}
{%- endmacro %}

{% macro default__fingerprint_version() %}{{ return('md5-v1') }}{% endmacro %}

{% macro _canonical_text(signature, texts, sep, null) -%}
  {%- set parts = [klaviyo_sync.literal(signature)] -%}
  {%- for text in texts -%}
    {%- do parts.append('coalesce(' ~ text ~ ', ' ~ null ~ ')') -%}
  {%- endfor -%}
  {{ return('concat_ws(' ~ sep ~ ', ' ~ parts | join(', ') ~ ')') }}
{%- endmacro %}

{% macro default__fingerprint(signature, texts) -%}
  {%- set text = klaviyo_sync._canonical_text(signature, texts, 'chr(31)', 'chr(30)') -%}
  {{ return("('x' || left(md5(" ~ text ~ "), 16))::bit(64)::bigint") }}
{%- endmacro %}

{% macro snowflake__fingerprint(signature, texts) -%}
  {%- set text = klaviyo_sync._canonical_text(signature, texts, 'chr(31)', 'chr(30)') -%}
  {{ return("md5_number_upper64(" ~ text ~ ")") }}
{%- endmacro %}

{% macro bigquery__fingerprint(signature, texts) -%}
  {%- set text = klaviyo_sync._canonical_text(signature, texts, "'\\x1f'", "'\\x1e'") -%}
  {{ return("farm_fingerprint(" ~ text ~ ")") }}
{%- endmacro %}

{% macro bigquery__fingerprint_version() %}{{ return('farm-v1') }}{% endmacro %}

{% macro spark__fingerprint(signature, texts) -%}
  {%- set text = klaviyo_sync._canonical_text(signature, texts, 'chr(31)', 'chr(30)') -%}
  {{ return("cast(conv(substr(md5(" ~ text ~ "), 1, 16), 16, 10) as decimal(20, 0))") }}
{%- endmacro %}

{% macro databricks__fingerprint(signature, texts) -%}
  {{ return(klaviyo_sync.spark__fingerprint(signature, texts)) }}
{%- endmacro %}

{% macro redshift__fingerprint(signature, texts) -%}
  {%- set text = klaviyo_sync._canonical_text(signature, texts, 'chr(31)', 'chr(30)') -%}
  {{ return("strtol(left(md5(" ~ text ~ "), 15), 16)") }}
{%- endmacro %}

{% macro redshift__fingerprint_version() %}{{ return('md5-60-v1') }}{% endmacro %}
