{#- Events (object: event, behavior: send): about 500 orders as "Placed Order" events, each sent
    once by its order id. At demo_step 1 ten more orders arrive and order O000001's amount is
    corrected: that correction is not sent again, since an event is sent once. -#}
{{ config(materialized='table') }}

{%- set step = var('demo_step', 0) | int %}

select
    'O' || lpad(cast(i as varchar), 6, '0') as order_id,
    c.email,
    c.customer_id,
    {{ dbt.dateadd('hour', 'i', "timestamp '2024-01-01 09:00:00'") }} as ordered_at,
    cast((i % 50) + 9.99 {% if step >= 1 %}+ case when i = 1 then 100 else 0 end{% endif %}
        as decimal(10, 2)) as amount,
    'USD' as currency,
    'SKU-' || cast(i % 7 as varchar) as sku,
    cast(i % 3 + 1 as integer) as quantity
from generate_series(1, {{ 510 if step >= 1 else 500 }}) as r(i)
join {{ ref('customers') }} as c
    on c.customer_id = 'C' || lpad(cast((i % 1100) + 1 as varchar), 5, '0')
-- customers who asked to be forgotten place no orders here
where c.customer_id not in (select customer_id from {{ ref('erasure_requests') }})
