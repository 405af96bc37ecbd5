{#-
  klaviyo_sync.check(): a post-hook for models annotated with `klaviyo` meta.

  Usage, in the model's properties YAML:

      models:
        - name: customers
          config:
            post_hook: "{{ klaviyo_sync.check() }}"
            meta:
              klaviyo: {object: profile, behavior: upsert}
          columns:
            - name: customer_id
              config:
                meta:
                  klaviyo: {sync_key: external_id}

  or for a whole folder in dbt_project.yml:
      models:
        my_project:
          marketing:
            +post-hook: "{{ klaviyo_sync.check() }}"

  or in the model's SQL: {{ config(post_hook="{{ klaviyo_sync.check() }}") }}

  In a properties YAML file the key must be `post_hook` (underscore). dbt leaves only
  `post_hook`/`pre_hook` unrendered there; a `post-hook` key is rendered while parsing, where
  no macros exist, and fails with "'klaviyo_sync' is undefined". dbt_project.yml accepts both.

  After dbt has built the model (table, view, incremental, snapshot or seed alike) it checks
  the built relation `this` against the annotations and fails the model with a compiler error
  when the annotations and the data cannot be synced:
    - no column, or more than one column, carries `sync_key`;
    - an annotated column does not exist in the relation (compared case-insensitively);
    - the sync key column has NULLs;
    - the sync key column has duplicate values.
  It does nothing for a model without a model-level `klaviyo` meta, never touches the
  network, and costs one aggregate query over the sync key column (plus one small query,
  only when there are duplicates, to show examples).

  What the hook returns: nothing (an empty string). dbt renders a hook's SQL, trims it and
  skips it when it is empty (`run_hooks` in dbt's global project and in dbt-duckdb), so an
  empty hook runs no statement at all. Our queries go through `run_query` while rendering.

  Hook strings are also rendered while dbt parses the project, when `execute` is false and no
  relation exists yet, so all the work happens inside `{% if execute %}`.

  Validating the annotation values themselves (allowed `object`, `field` names, ...) is the
  job of the `dbt-klaviyo` command, which uses the JSON Schema shipped in the Python package.
-#}

{% macro check() -%}
  {%- if execute -%}
    {{- klaviyo_sync._check_model() -}}
  {%- endif -%}
{%- endmacro %}


{% macro _check_model() -%}
  {%- if model is not defined or model is none or this is not defined or this is none -%}
    {%- do exceptions.raise_compiler_error(
      "klaviyo_sync.check() must be used as a model post-hook, e.g. "
      ~ "`post_hook: '{{ klaviyo_sync.check() }}'` under the model's `config:` in its YAML; "
      ~ "it cannot run in on-run-start/on-run-end or outside a model."
    ) -%}
  {%- endif -%}

  {%- set model_klaviyo = klaviyo_sync.model_annotation(model) -%}
  {%- if model_klaviyo is none -%}
    {#- Not a synced model: nothing to check. -#}
    {{- return('') -}}
  {%- endif -%}

  {%- set model_name = model.get('name') -%}
  {%- set yaml_file = model.get('patch_path') or model.get('original_file_path') or 'its YAML file' -%}
  {%- if yaml_file is string and '://' in yaml_file -%}
    {%- set yaml_file = yaml_file.split('://', 1)[1] -%}
  {%- endif -%}
  {%- set annotated = klaviyo_sync.column_annotations(model) -%}
  {%- set problems = [] -%}

  {#- 1. Exactly one sync key. -#}
  {%- set key_columns = [] -%}
  {%- for column in annotated -%}
    {%- if column.klaviyo is mapping and 'sync_key' in column.klaviyo -%}
      {%- do key_columns.append(column) -%}
    {%- endif -%}
  {%- endfor -%}
  {%- if key_columns | length == 0 -%}
    {%- if annotated -%}
      {%- set which = "none of its annotated columns ('"
        ~ (annotated | map(attribute='name') | join("', '")) ~ "') has `sync_key`" -%}
    {%- else -%}
      {%- set which = "no column has `klaviyo` meta, so there is no sync key" -%}
    {%- endif -%}
    {%- do problems.append(
      which ~ ". Mark exactly one column as the sync key in " ~ yaml_file
      ~ ", e.g. `config: {meta: {klaviyo: {sync_key: external_id}}}` on the column that "
      ~ "identifies each row (external_id, email, phone_number, klaviyo_id, or unique_id for events)."
    ) -%}
  {%- elif key_columns | length > 1 -%}
    {%- do problems.append(
      "columns '" ~ (key_columns | map(attribute='name') | join("', '")) ~ "'"
      ~ " all have `sync_key`, but a model has exactly one sync key. Keep `sync_key` on one "
      ~ "of them in " ~ yaml_file ~ " and map the others with `field:` instead."
    ) -%}
  {%- endif -%}

  {#- 2. Every annotated column exists in the built relation. -#}
  {%- set relation_columns = {} -%}
  {%- for column in adapter.get_columns_in_relation(this) -%}
    {%- set lowered = column.name | lower -%}
    {%- do relation_columns.update({lowered: column.name}) -%}
  {%- endfor -%}
  {%- if relation_columns | length == 0 -%}
    {%- do exceptions.raise_compiler_error(
      "klaviyo_sync.check() failed for model '" ~ model_name ~ "': the relation " ~ this
      ~ " was not found or has no columns. Use klaviyo_sync.check() as a post-hook "
      ~ "(not a pre-hook), on a model that is not ephemeral."
    ) -%}
  {%- endif -%}
  {%- set missing = [] -%}
  {%- for column in annotated -%}
    {%- if (column.name | lower) not in relation_columns -%}
      {%- do missing.append(column.name) -%}
      {%- do problems.append(
        "column '" ~ column.name ~ "' is annotated with `klaviyo` meta in " ~ yaml_file
        ~ " but does not exist in " ~ this ~ " (its columns: "
        ~ (relation_columns.values() | list | join(', ')) ~ "). Add the column to the "
        ~ "model's SQL, or fix or remove its entry in the YAML."
      ) -%}
    {%- endif -%}
  {%- endfor -%}

  {#- 3. The sync key has no NULLs and no duplicates: one aggregate query. -#}
  {%- if key_columns | length == 1 and key_columns[0].name not in missing -%}
    {%- set key_name = key_columns[0].name -%}
    {%- set key_sql = adapter.quote(relation_columns[key_name | lower]) -%}
    {%- set counts_sql -%}
      select
        coalesce(sum(case when sync_key is null then row_count else 0 end), 0) as null_rows,
        coalesce(sum(case when sync_key is not null and row_count > 1 then 1 else 0 end), 0) as duplicate_keys,
        coalesce(sum(case when sync_key is not null and row_count > 1 then row_count else 0 end), 0) as duplicate_rows
      from (
        select {{ key_sql }} as sync_key, count(*) as row_count
        from {{ this }}
        group by {{ key_sql }}
      ) as klaviyo_sync_keys
    {%- endset -%}
    {%- set counts = run_query(counts_sql).rows[0] -%}
    {%- set null_rows = counts[0] | int -%}
    {%- set duplicate_keys = counts[1] | int -%}
    {%- set duplicate_rows = counts[2] | int -%}

    {%- if null_rows > 0 -%}
      {%- do problems.append(
        "the sync key column '" ~ key_name ~ "' has " ~ null_rows ~ " NULL value"
        ~ ('s' if null_rows != 1 else '') ~ ". Every row needs a sync key: filter those rows "
        ~ "out (`where " ~ key_name ~ " is not null`) or fill them in the model's SQL."
      ) -%}
    {%- endif -%}

    {%- if duplicate_keys > 0 -%}
      {%- set examples_sql -%}
        select {{ key_sql }} as sync_key, count(*) as row_count
        from {{ this }}
        where {{ key_sql }} is not null
        group by {{ key_sql }}
        having count(*) > 1
        order by 2 desc, 1
        limit 5
      {%- endset -%}
      {%- set examples = [] -%}
      {%- for row in run_query(examples_sql).rows -%}
        {%- do examples.append("'" ~ row[0] ~ "' (" ~ (row[1] | int) ~ " rows)") -%}
      {%- endfor -%}
      {%- do problems.append(
        "the sync key column '" ~ key_name ~ "' has " ~ duplicate_keys ~ " duplicate key"
        ~ ('s' if duplicate_keys != 1 else '') ~ " (values found on more than one row; "
        ~ duplicate_rows ~ " rows in all), e.g. " ~ (examples | join(', '))
        ~ ". Each row must have its own key: deduplicate in the model's SQL (one row per "
        ~ key_name ~ "), or choose another sync key."
      ) -%}
    {%- endif -%}
  {%- endif -%}

  {%- if problems -%}
    {%- set lines = [] -%}
    {%- for problem in problems -%}
      {%- do lines.append("  - " ~ problem) -%}
    {%- endfor -%}
    {%- do exceptions.raise_compiler_error(
      "klaviyo_sync.check() failed for model '" ~ model_name ~ "' (" ~ this ~ "), which "
      ~ "cannot be synced to Klaviyo as it is:\n" ~ (lines | join("\n"))
    ) -%}
  {%- endif -%}
  {%- do log("klaviyo_sync.check(): model '" ~ model_name ~ "' can be synced", info=false) -%}
  {{- return('') -}}
{%- endmacro %}
