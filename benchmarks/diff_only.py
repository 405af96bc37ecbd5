"""Our diff alone, on the benchmark project: `diff_only.py PROJECT STATE`.

Runs in a process of its own so that its peak memory is its own. Works on a copy of the
state, which the diff does not change.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dbt_klaviyo_sync.manifest import read_models
from dbt_klaviyo_sync.spec import build_spec
from dbt_klaviyo_sync.warehouse.duckdb import diff
from dbt_klaviyo_sync.warehouse.duckdb.state import open_state


def main(directory: Path, state: Path) -> None:
    [model] = read_models(directory / "target" / "manifest.json")
    spec = build_spec(model)
    with open_state(state, {"warehouse": directory / "warehouse.duckdb"}, read_only=True) as s:
        [(sid,)] = s.con.execute("SELECT sync_id FROM klaviyo_sync_state.syncs").fetchall()
        counts = diff.compute(s.con, spec, sid)
    print(counts)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
