{#-
  Helpers that read the `klaviyo` annotations of a model from the `model` context variable.

  In a hook (and in any macro it calls) `model` is the node as a plain dict
  (`node.to_dict()`), the same shape as in manifest.json:
    model.config.meta.klaviyo                 model level (dbt 1.10+ puts `meta` under `config`)
    model.meta.klaviyo                        older top-level `meta`, still accepted
    model.columns[name].config.meta.klaviyo   column level (dbt 1.10+)
    model.columns[name].meta.klaviyo          older column-level `meta`
  dbt copies one form into the other, but we read both and prefer `config`.
-#}

{% macro _meta_klaviyo(node) -%}
  {#- The `klaviyo` entry of a node or column dict: config.meta first, then meta. None if unset. -#}
  {%- set config = node.get('config') or {} -%}
  {%- set config_meta = config.get('meta') or {} -%}
  {%- set value = config_meta.get('klaviyo') -%}
  {%- if value is none -%}
    {%- set value = (node.get('meta') or {}).get('klaviyo') -%}
  {%- endif -%}
  {{- return(value) -}}
{%- endmacro %}


{% macro model_annotation(node=none) -%}
  {#- The model-level `klaviyo` meta of `node` (default: the current model), or None. -#}
  {%- set node = node if node is not none else model -%}
  {{- return(klaviyo_sync._meta_klaviyo(node)) -}}
{%- endmacro %}


{% macro column_annotations(node=none) -%}
  {#-
    The annotated columns of `node` (default: the current model), as a list of
    {"name": <column name as written in YAML>, "klaviyo": <its klaviyo meta>}, in YAML order.
  -#}
  {%- set node = node if node is not none else model -%}
  {%- set annotated = [] -%}
  {%- for name, column in (node.get('columns') or {}).items() -%}
    {%- set value = klaviyo_sync._meta_klaviyo(column) -%}
    {%- if value is not none -%}
      {%- do annotated.append({'name': column.get('name') or name, 'klaviyo': value}) -%}
    {%- endif -%}
  {%- endfor -%}
  {{- return(annotated) -}}
{%- endmacro %}
