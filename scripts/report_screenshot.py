"""The docs' picture of `dbt-klaviyo report` (docs/report.png), from a real run.

A copy of the demo project syncs a few times against the bundled emulator: the first sync,
a day's changes, a day when some emails and phone numbers are malformed (rejected, with
their reasons) and Klaviyo answers 429 once (a wait on its rate limit), another change, and
a run with nothing to do. `dbt-klaviyo report` writes the page, and headless Chromium takes
its picture. Run it with `.venv/bin/python scripts/report_screenshot.py [OUT.png]`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb

from dbt_klaviyo_sync.emulator import Emulator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for scripts.chromium, when run as a script

from scripts import chromium  # noqa: E402

BIN = Path(sys.executable).parent
PRIVATE_KEY = "pk_demo_not_a_real_key"
PUBLIC_KEY = "Demo12"
CHANGES = [
    "",
    "UPDATE main.customers SET city = 'Oakland' WHERE customer_id <= 'C00012'",
    """UPDATE main.customers SET email = 'no-at-sign.example.com'
           WHERE customer_id IN ('C00021', 'C00022', 'C00023');
       UPDATE main.customers SET phone = '12' WHERE customer_id = 'C00024';
       UPDATE main.customers SET city = 'Lyon' WHERE customer_id BETWEEN 'C00100' AND 'C00160'""",
    "DELETE FROM main.customers WHERE customer_id BETWEEN 'C00300' AND 'C00340'",
    "",
]


def run(project: Path, *command: str, env: dict[str, str], allowed: int = 0) -> None:
    done = subprocess.run(command, cwd=project, env={**os.environ, **env})
    if done.returncode > allowed:
        sys.exit(f"{' '.join(command)} exited with {done.returncode}")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "report.png").resolve()
    with tempfile.TemporaryDirectory(prefix="report-screenshot-") as scratch:
        project = Path(scratch) / "shop"
        shutil.copytree(
            ROOT / "integration_tests",
            project,
            ignore=shutil.ignore_patterns(
                "target", "dbt_packages", "logs", "*.duckdb*", ".klaviyo_sync", "*.yml.lock"
            ),
        )
        (project / "packages.yml").write_text(f"packages:\n  - local: {json.dumps(str(ROOT))}\n")
        dbt = [str(BIN / "dbt"), "--quiet"]
        for args in (["deps"], ["build", "--profiles-dir", "."]):
            run(project, *dbt, *args, env={})
        with Emulator(private_key=PRIVATE_KEY, public_key=PUBLIC_KEY, job_seconds=0.2) as emu:
            emu.set_rate_limit("get_accounts", burst=1000, steady=100_000)
            env = {
                "KLAVIYO_BASE_URL": emu.url,
                "KLAVIYO_PRIVATE_API_KEY": PRIVATE_KEY,
                "KLAVIYO_PUBLIC_API_KEY": PUBLIC_KEY,
            }
            sync = [str(BIN / "dbt-klaviyo"), "sync", "--project-dir", ".", "--profiles-dir", "."]
            for day, change in enumerate(CHANGES):
                if change:
                    with duckdb.connect(str(project / "warehouse.duckdb")) as con:
                        con.execute(change)
                if day == 2:  # Klaviyo asks the day's first update to wait two seconds
                    emu.inject(429, count=1, retry_after=2, operation="create_or_update_profile")
                run(project, *sync, "-q", "--select", "customers", env=env, allowed=1)
        run(project, str(BIN / "dbt-klaviyo"), "report", env={})
        page = project / "target" / "klaviyo-report.html"
        out.parent.mkdir(parents=True, exist_ok=True)
        chromium.headless(page, f"--screenshot={out}", width=1200, height=860)
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
