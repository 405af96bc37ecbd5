{#- Profile deletion (object: profile, behavior: delete): customers who asked to be
    forgotten. Each is deleted from Klaviyo once; the state remembers it for good.
    At demo_step 1 one more customer asks. -#}
{{ config(materialized='table') }}

select customer_id
from (values ('C00003'), ('C00005'){% if var('demo_step', 0) | int >= 1 %}, ('C00008'){% endif %})
    as requests(customer_id)
