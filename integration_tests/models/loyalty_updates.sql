{#- Update Only (object: profile, behavior: update_only): a loyalty tier for customers that
    Klaviyo already has, keyed by external id. C99999 is in no other model, so Klaviyo has
    no profile for it: it is reported as not found and never created. -#}
{{ config(materialized='table') }}

select
    customer_id,
    case
        when lifetime_value >= 800 then 'gold'
        when lifetime_value >= 400 then 'silver'
        else 'bronze'
    end as loyalty_tier
from {{ ref('customers') }}
where customer_id <= 'C00100'

union all

select 'C99999' as customer_id, 'gold' as loyalty_tier
