"""Reverse ETL from dbt models to Klaviyo."""
