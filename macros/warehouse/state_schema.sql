{#- klaviyo_sync.state_schema(): the schema of the user's warehouse that holds the sync
    state (its snapshot, runs, rejects and journal tables), `klaviyo_sync` unless the var
    `klaviyo_sync_schema` says otherwise. One table per kind, keyed by sync id. -#}
{% macro state_schema() -%}
  {{ return(var('klaviyo_sync_schema', 'klaviyo_sync')) }}
{%- endmacro %}
