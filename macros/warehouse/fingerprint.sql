{#- klaviyo_sync.fingerprint(signature, texts): a row's fingerprint, a signed 64-bit integer
    from a documented, stable digest of a canonical text. The text is the mapping's signature
    and each value's text (`texts`: SQL expressions, in order) joined by U+001F, a NULL written
    as U+001E, so that NULL differs from '' and the column order counts. `md5-v1` takes the
    first 8 bytes of MD5 as a signed 64-bit integer (as DuckDB's state file does), on every
    engine that can; the others report their own version (`fingerprint_version`). No engine's
    own row hash is used: Spark's xxhash64 skips NULLs, Redshift's chained fnv_hash collides
    across column boundaries, and Snowflake's HASH is undocumented. -#}
{% macro fingerprint(signature, texts) -%}
  {{ return(adapter.dispatch('fingerprint', 'klaviyo_sync')(signature, texts)) }}
{%- endmacro %}

{% macro fingerprint_version() -%}
  {{ return(adapter.dispatch('fingerprint_version', 'klaviyo_sync')()) }}
{%- endmacro %}

{% macro default__fingerprint_version() %}{{ return('md5-v1') }}{% endmacro %}

{#- canonical_text(signature, texts): the text a fingerprint digests (see above). -#}
{% macro canonical_text(signature, texts) -%}
  {{ return(adapter.dispatch('canonical_text', 'klaviyo_sync')(signature, texts)) }}
{%- endmacro %}

{% macro _canonical_parts(signature, texts) -%}
  {%- set parts = [klaviyo_sync.literal(signature)] -%}
  {%- for text in texts -%}
    {%- do parts.append('coalesce(' ~ text ~ ', chr(30))') -%}
  {%- endfor -%}
  {{ return(parts) }}
{%- endmacro %}

{% macro default__canonical_text(signature, texts) -%}
  {{ return('concat_ws(chr(31), ' ~ klaviyo_sync._canonical_parts(signature, texts) | join(', ') ~ ')') }}
{%- endmacro %}

{#- Redshift has no concat_ws, BigQuery neither; every part is non-NULL, so || is the same. -#}
{% macro redshift__canonical_text(signature, texts) -%}
  {{ return(klaviyo_sync._canonical_parts(signature, texts) | join(' || chr(31) || ')) }}
{%- endmacro %}

{% macro bigquery__canonical_text(signature, texts) -%}
  {{ return(klaviyo_sync.redshift__canonical_text(signature, texts)) }}
{%- endmacro %}

{% macro default__fingerprint(signature, texts) -%}
  {%- set text = klaviyo_sync.canonical_text(signature, texts) -%}
  {{ return("('x' || left(md5(" ~ text ~ "), 16))::bit(64)::bigint") }}
{%- endmacro %}

{#- Snowflake: MD5_NUMBER_UPPER64 is the same 8 bytes, unsigned; NUMBER's exact arithmetic
    makes them signed. -#}
{% macro snowflake__fingerprint(signature, texts) -%}
  {%- set text = klaviyo_sync.canonical_text(signature, texts) -%}
  {{ return("cast((md5_number_upper64(" ~ text ~ ") + 9223372036854775808)"
      ~ " % 18446744073709551616 - 9223372036854775808 as bigint)") }}
{%- endmacro %}

{#- BigQuery: FarmHash Fingerprint64 of the same text, an INT64. -#}
{% macro bigquery__fingerprint(signature, texts) -%}
  {{ return("farm_fingerprint(" ~ klaviyo_sync.canonical_text(signature, texts) ~ ")") }}
{%- endmacro %}

{% macro bigquery__fingerprint_version() %}{{ return('farm-v1') }}{% endmacro %}

{#- Spark and Databricks: conv() to a negative base reads the 16 hex digits as a signed
    64-bit number. -#}
{% macro spark__fingerprint(signature, texts) -%}
  {%- set text = klaviyo_sync.canonical_text(signature, texts) -%}
  {{ return("cast(conv(substr(md5(" ~ text ~ "), 1, 16), 16, -10) as bigint)") }}
{%- endmacro %}

{#- Trino: MD5 of the UTF-8 bytes, the first 8 read big-endian as a BIGINT. -#}
{% macro trino__fingerprint(signature, texts) -%}
  {%- set text = klaviyo_sync.canonical_text(signature, texts) -%}
  {{ return("from_big_endian_64(substr(md5(to_utf8(" ~ text ~ ")), 1, 8))") }}
{%- endmacro %}

{#- Redshift: STRTOL reads at most a BIGINT, so 15 hex digits (60 bits) of the MD5. -#}
{% macro redshift__fingerprint(signature, texts) -%}
  {%- set text = klaviyo_sync.canonical_text(signature, texts) -%}
  {{ return("strtol(left(md5(" ~ text ~ "), 15), 16)") }}
{%- endmacro %}

{% macro redshift__fingerprint_version() %}{{ return('md5-60-v1') }}{% endmacro %}
