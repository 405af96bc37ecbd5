{#- The VIP list audience (object: list, behavior: mirror): the list holds exactly the
    VIP customers. A customer who stops being a VIP leaves the list; the profile stays. -#}
{{ config(materialized='table') }}

select email, customer_id, first_name
from {{ ref('customers') }}
where is_vip
