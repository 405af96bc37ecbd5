"""The benchmark harness, at 10,000 rows, so that it cannot rot unnoticed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, clean_env


def test_the_benchmark_runs_and_reports_every_step(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    done = subprocess.run(
        [sys.executable, "run.py", "--sizes", "10000", "--out", str(out)],
        cwd=REPO / "benchmarks",
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()[2:]]
    steps = {cells[1].strip(): cells for cells in rows}
    assert len(steps) == 7, out.read_text()  # (d) at two scales
    full = steps["(a) first full sync"]
    assert float(full[4]) <= 0.5  # a job, a poll or two and its errors per 10,000 profiles
    assert steps["(b) no-op re-run"][4].strip() == "-"
    assert "x faster" in steps["(c) diff only, ours"][5]
    limited = [cells for name, cells in steps.items() if name.startswith("(d) change set")]
    assert len(limited) == 2
    assert all("0 Retry-After violations" in cells[5] for cells in limited)
