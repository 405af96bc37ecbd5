"""The benchmark harness, at 10,000 rows, on each warehouse, so that it cannot rot unnoticed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, PgDatabase, clean_env


def bench(out: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Run the harness at 10,000 rows; its table's cells, by step (and, under "text", what
    it wrote under the table)."""
    done = subprocess.run(
        [sys.executable, "run.py", "--sizes", "10000", "--out", str(out), *args],
        cwd=REPO / "benchmarks",
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = out.read_text().splitlines()
    rows = [line.split("|")[1:-1] for line in lines[2:] if line.startswith("|")]
    steps = {cells[1].strip(): [cell.strip() for cell in cells] for cells in rows}
    return {**steps, "text": [line for line in lines if line and not line.startswith("|")]}


def assert_common_steps(steps: dict[str, list[str]]) -> None:
    """What either warehouse reports: the model's build, (a), (b) and (c), the two diffs
    having found the same keys."""
    assert {
        "the model built (dbt run)",
        "(a) first full sync",
        "(b) no-op re-run",
        "(c) diff only, naive baseline",
        "(c) diff only, ours",
        "(c) re-run after the change set",
    } <= set(steps), steps
    full = steps["(a) first full sync"]
    assert float(full[5]) <= 0.5  # a job, a poll or two and its errors per 10,000 profiles
    assert full[4].endswith(" s") and float(full[4].removesuffix(" s")) > 0  # CPU per 1M
    assert full[6].endswith("its 1 import jobs fit in one burst of Klaviyo's limits")
    assert steps["(b) no-op re-run"][4:6] == ["-", "-"]
    assert steps["(c) diff only, naive baseline"][6].startswith(
        "added 49, changed 100, removed 50;"
    )
    assert "the same keys;" in steps["(c) diff only, ours"][6]
    assert "x faster" in steps["(c) diff only, ours"][6]


def test_the_benchmark_runs_and_reports_every_step(tmp_path: Path) -> None:
    steps = bench(tmp_path / "results.md")
    assert_common_steps(steps)
    assert len(steps) == 9, steps  # (d) at two scales, and the text
    # The no-op split: start-up, the dbt project (reused from (a), without dbt), the diff.
    assert re.search(
        r"start-up [\d.]+ s, dbt project [\d.]+ s \(as resolved before\), diff [\d.]+ s",
        steps["(b) no-op re-run"][6],
    ), steps["(b) no-op re-run"]
    limited = [cells for name, cells in steps.items() if name.startswith("(d) change set")]
    assert len(limited) == 2
    assert all("0 Retry-After violations" in cells[6] for cells in limited)
    # The pipeline without the network (it stops the run unless every row was recorded).
    [pipeline] = steps["text"]
    assert pipeline.startswith("Without the network, on one core, a first full sync of 10,000")
    assert "DuckDB's `json_object` writes the same rows' profile resources at" in pipeline


def test_the_benchmark_runs_on_postgres(pg_server: PgDatabase, tmp_path: Path) -> None:
    """The same steps with the model built by dbt-postgres and diffed there, the bytes
    that left the server counted; the database it built is dropped after."""
    steps = bench(tmp_path / "results.md", "--warehouse", "postgres", env=pg_server.env())
    assert_common_steps(steps)
    assert len(steps) == 7, steps  # no (d) unless asked for, and no text (the pipeline)
    assert steps["text"] == []
    assert "MB from the server" in steps["(c) diff only, naive baseline"][6]
    assert "% of the model's" in steps["(c) diff only, ours"][6]
    with pg_server.connect() as con, con.cursor() as cursor:
        cursor.execute(
            "select datname from pg_database where datname ~ '^klaviyo_bench_10000_[0-9]+$'"
        )
        left = cursor.fetchall()
    assert not left, f"the benchmark left its database behind: {left}"


def test_the_benchmark_stops_when_the_diffs_disagree() -> None:
    """No ratio is printed between two diffs that found other keys, even as many."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import run
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    found = {"count": 100, "digest": "1f0c", "first": ["C000000007"]}
    ours = {"kinds": {"added": found, "changed": found, "removed": found}}
    run.same_changes(ours, {"kinds": dict(ours["kinds"])})
    naive = {"kinds": {**ours["kinds"], "changed": {**found, "digest": "9a2e"}}}
    with pytest.raises(SystemExit, match="the two diffs disagree"):
        run.same_changes(ours, naive)
