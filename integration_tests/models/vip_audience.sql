{#- The VIP list audience (object: list, behavior: mirror): the list holds exactly the
    VIP customers. A customer who stops being a VIP leaves the list; the profile stays. -#}
{{ config(materialized='table') }}

select email, customer_id, first_name
from {{ ref('customers') }}
-- customers who asked to be forgotten join no list
where is_vip and customer_id not in (select customer_id from {{ ref('erasure_requests') }})
