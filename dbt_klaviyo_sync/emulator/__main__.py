"""`python -m dbt_klaviyo_sync.emulator`: the same as `dbt-klaviyo emulator`."""

from __future__ import annotations

from .command import emulator

if __name__ == "__main__":
    emulator(prog_name="python -m dbt_klaviyo_sync.emulator")
