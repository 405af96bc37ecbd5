"""The naive baseline: `naive_diff.py PROJECT STATE`.

What a first attempt would do: load the model's mapped columns and the snapshot's last
accepted values into Python dicts, then compare them key by key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import duckdb
from project import COLUMNS


def main(directory: Path, state: Path) -> None:
    columns = ", ".join(COLUMNS)
    with duckdb.connect(str(directory / "warehouse.duckdb"), read_only=True) as con:
        model = {row[0]: row for row in con.execute(f"SELECT {columns} FROM customers").fetchall()}
    with duckdb.connect(str(state), read_only=True) as con:
        snapshot = {
            key: json.loads(values)
            for key, values in con.execute("SELECT key, accepted_values FROM snapshot").fetchall()
        }
    changed = added = 0
    for key, row in model.items():
        old = snapshot.get(key)
        if old is None:
            added += 1
        elif [str(v) for v in row[1:]] != [str(v) for v in list(old.values())[1:]]:
            changed += 1
    removed = sum(1 for key in snapshot if key not in model)
    print({"added": added, "changed": changed, "removed": removed})


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
