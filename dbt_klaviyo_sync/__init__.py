"""Reverse ETL from dbt models to Klaviyo.

`sync(...)` and `validate(...)` are the Python API (see `dbt_klaviyo_sync.api`); they are
imported on first use, so that the CLI's `--help` and the emulator start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dbt_klaviyo_sync.api import sync, validate

__all__ = ["sync", "validate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dbt_klaviyo_sync import api

        return getattr(api, name)
    raise AttributeError(f"module 'dbt_klaviyo_sync' has no attribute {name!r}")
