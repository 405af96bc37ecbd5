"""Reverse ETL from dbt models to Klaviyo.

`sync(...)` and `validate(...)` are the Python API (see `dbt_klaviyo_sync.api`); they are
imported on first use, so that the CLI's `--help` and the emulator start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dbt_klaviyo_sync.api import sync, validate

#: The tool's version, and the dbt package's (dbt_project.yml `version:`), kept equal by
#: tests/test_packaging.py: `sync` and `validate` refuse a dbt package of another minor version.
__version__ = "0.1.0"

__all__ = ["__version__", "sync", "validate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dbt_klaviyo_sync import api

        return getattr(api, name)
    raise AttributeError(f"module 'dbt_klaviyo_sync' has no attribute {name!r}")
