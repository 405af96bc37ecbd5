"""`python -m dbt_klaviyo_sync.emulator`: the same as `dbt-klaviyo emulator`."""

from __future__ import annotations

import sys

from dbt_klaviyo_sync.cli import main

if __name__ == "__main__":
    main(["emulator", *sys.argv[1:]])
