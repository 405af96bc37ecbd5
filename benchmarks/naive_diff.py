"""The naive baseline: `naive_diff.py PROJECT SNAPSHOT`.

What a first attempt would do: load the model's mapped columns and last run's values
(kept in a table of their own) into Python dicts, then compare them key by key.
"""

from __future__ import annotations

import sys
from pathlib import Path

import duckdb
from project import COLUMNS


def main(directory: Path, snapshot: Path) -> None:
    columns = ", ".join(COLUMNS)
    with duckdb.connect(str(directory / "warehouse.duckdb"), read_only=True) as con:
        model = {row[0]: row for row in con.execute(f"SELECT {columns} FROM customers").fetchall()}
    with duckdb.connect(str(snapshot), read_only=True) as con:
        previous = {row[0]: row for row in con.execute("SELECT * FROM snapshot").fetchall()}
    added = sum(1 for key in model if key not in previous)
    changed = sum(1 for key, row in model.items() if key in previous and previous[key] != row)
    removed = sum(1 for key in previous if key not in model)
    print({"added": added, "changed": changed, "removed": removed})


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
