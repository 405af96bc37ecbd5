"""The demo: the whole job on the embedded default, narrated step by step.

dbt builds 1,200 customers into DuckDB, the bundled Klaviyo emulator starts on loopback,
`dbt-klaviyo sync` sends every customer, the data moves on a day (3 customers change, 1 is
added, 1 leaves, and an unsynced column changes everywhere), `dbt-klaviyo plan` shows what
would change, and a second sync sends only the 4 profiles that changed. Last, the other
Census objects (a list mirror, an update-only sync, order events, then erasure requests), and
the run history and rejects. Run it with `python3 dev.py demo`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dbt_klaviyo_sync.emulator import Emulator

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT / "integration_tests"
BIN = Path(sys.executable).parent
PRIVATE_KEY = "pk_demo_not_a_real_key"
PUBLIC_KEY = "Demo12"


def step(number: int, text: str) -> None:
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(f"\n{bold}== {number}. {text}{plain}", flush=True)


def run(*command: str, env: dict[str, str] | None = None, allowed: int = 0) -> None:
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=PROJECT, env={**os.environ, **(env or {})})
    if done.returncode > allowed:
        sys.exit(f"the demo stopped: {command[0]} exited with {done.returncode}")


def dbt(*args: str) -> None:
    run(str(BIN / "dbt"), *args, "--profiles-dir", ".", "--quiet")


def main() -> None:
    for leftover in ("warehouse.duckdb", ".klaviyo_sync"):
        path = PROJECT / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    step(1, "dbt builds the example project: 1,200 customers in DuckDB")
    dbt("deps")
    dbt("build")

    with Emulator(private_key=PRIVATE_KEY, public_key=PUBLIC_KEY, job_seconds=0.5) as emulator:
        step(2, f"The bundled Klaviyo emulator listens on {emulator.url}")
        env = {
            "KLAVIYO_BASE_URL": emulator.url,
            "KLAVIYO_PRIVATE_API_KEY": PRIVATE_KEY,
            "KLAVIYO_PUBLIC_API_KEY": PUBLIC_KEY,
        }
        sync = [str(BIN / "dbt-klaviyo"), "sync", "--project-dir", ".", "--profiles-dir", "."]

        step(3, "First sync: every customer is new to Klaviyo, so all of them go")
        run(*sync, "--select", "customers", env=env)
        print(f"Klaviyo now holds {len(emulator.profiles()):,} profiles.")

        step(4, "A day later: 3 customers change, 1 signs up, 1 leaves (dbt var demo_step=1)")
        dbt("build", "--vars", "{demo_step: 1}")

        step(5, "The plan: what a second sync would send, field by field (nothing is sent)")
        cli = [str(BIN / "dbt-klaviyo")]
        run(*cli, "plan", "--project-dir", ".", "--profiles-dir", ".", "-s", "customers", env=env)

        step(6, "Second sync: only the 4 changed profiles are sent")
        before = emulator.stats()["writes"]
        run(*sync, "--select", "customers", env=env)
        print(f"Klaviyo received {emulator.stats()['writes'] - before} write requests.")

        step(7, "Third sync: nothing changed, so nothing is sent")
        before = emulator.stats()["writes"]
        run(*sync, "--select", "customers", env=env)
        print(f"Klaviyo received {emulator.stats()['writes'] - before} write requests.")

        step(8, "The other Census objects: a VIP list, loyalty tiers, erasures and orders")
        emulator.create_list("VIPs", list_id="VipLst")  # the list_id in models/schema.yml
        others = ["vip_audience", "loyalty_updates", "order_events"]
        # C99999 in loyalty_updates has no Klaviyo profile: update_only rejects it (exit 1).
        run(*sync, "--select", *others, env=env, allowed=1)
        # The erasures go after the loyalty updates, not beside them: Klaviyo deletes
        # asynchronously, so in one run which erased customers the update-only model still
        # found would vary, and so would this step's output.
        run(*sync, "--select", "erasure_requests", env=env)
        time.sleep(1)  # Klaviyo runs deletions asynchronously
        print(
            f"The VIP list has {len(emulator.list_members('VipLst'))} members, "
            f"{len(emulator.deletions())} profiles were deleted, "
            f"and Klaviyo holds {len(emulator.events())} Placed Order events."
        )

        step(9, "The run history, and the records Klaviyo rejected, with the reasons")
        run(*cli, "status", "--runs", "2")
        run(*cli, "rejects", "loyalty_updates")

    print(
        "\nThe state is in integration_tests/.klaviyo_sync/state.duckdb; try\n"
        '  .venv/bin/python -c "import duckdb; print(duckdb.connect('
        "'integration_tests/.klaviyo_sync/state.duckdb').sql('from runs'))\""
    )


if __name__ == "__main__":
    main()
