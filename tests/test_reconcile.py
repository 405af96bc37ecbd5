"""List reconcile: `--reconcile` (or `reconcile: true` on a list model) reads the list's
members back from Klaviyo, removes those not in the model and adds back model rows the list
lost; a normal sync leaves members added elsewhere alone. End to end: real dbt, the CLI and
the emulator, whose list has more members than one page holds."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import Sync, change_model, klaviyo_api, model_rows, sync

LIST_ID = "VipLst"  # the list_id in integration_tests/models/schema.yml
PAGE = 100


def vips(project: Path, emulator: Emulator, *args: str) -> Sync:
    return sync(project, emulator, "--select", "vip_audience", *args)


def set_list_meta(project: Path, **meta: str) -> None:
    schema = project / "models" / "schema.yml"
    lines = "".join(f"\n          {key}: {value}" for key, value in meta.items())
    text = schema.read_text()
    schema.write_text(text.replace(f"list_id: {LIST_ID}", f"list_id: {LIST_ID}{lines}"))


def members(emulator: Emulator) -> set[str]:
    ids = emulator.list_members(LIST_ID)
    return {p["attributes"]["email"] for p in emulator.profiles() if p["id"] in ids}


def model_emails(project: Path) -> set[str]:
    return {r["email"] for r in model_rows(project, "SELECT email FROM main.vip_audience")}


def join_elsewhere(emulator: Emulator, *emails: str) -> None:
    """Profiles added to the list outside the sync, as the web app or a form would."""
    ids = [
        klaviyo_api(
            emulator,
            "POST",
            "/api/profile-import",
            {"data": {"type": "profile", "attributes": {"email": email}}},
        )["data"]["id"]
        for email in emails
    ]
    body = {"data": [{"type": "profile", "id": i} for i in ids]}
    klaviyo_api(emulator, "POST", f"/api/lists/{LIST_ID}/relationships/profiles", body)


def pages_read(emulator: Emulator) -> int:
    return int(emulator.stats()["requests_by_operation"].get("get_profiles_for_list", 0))


def test_reconcile_removes_members_not_in_the_model(
    warehouse_project: Path, emulator: Emulator
) -> None:
    project = warehouse_project
    emulator.create_list("VIPs", list_id=LIST_ID)
    assert vips(project, emulator).returncode == 0
    wanted = model_emails(project)
    assert len(wanted) > PAGE  # the list spans several pages
    join_elsewhere(emulator, "stray@example.com")

    normal = vips(project, emulator)
    assert normal.returncode == 0, normal.output
    assert "stray@example.com" in members(emulator)  # a normal sync never reads the list
    assert pages_read(emulator) == 0

    plan = vips(project, emulator, "--dry-run", "--reconcile")
    assert plan.returncode == 0, plan.output
    assert plan.row("vip_audience")["removed"] == 1
    assert (
        f"reconcile read {len(wanted) + 1:,} members of list {LIST_ID}: would remove 1 not "
        "in the model; would add back 0 model rows the list lacked"
    ) in plan.stdout
    assert "stray@example.com" in members(emulator)

    done = vips(project, emulator, "--reconcile")
    assert done.returncode == 0, done.output
    assert done.row("vip_audience")["removed"] == 1
    assert "removed 1 not in the model; sent 0" in done.stdout and "removed 1 not" in done.stderr
    assert members(emulator) == wanted
    # The plan and the sync each read every page, each with the most members a page holds.
    assert pages_read(emulator) == 2 * math.ceil((len(wanted) + 1) / PAGE)
    assert emulator.stats()["requests_by_operation"]["remove_profiles_from_list"] == 1

    again = vips(project, emulator, "--reconcile")
    assert again.returncode == 0 and again.row("vip_audience")["removed"] == 0


def test_reconcile_repairs_a_list_after_a_lost_state(project: Path, emulator: Emulator) -> None:
    """`reconcile: true` on the model: a removal the lost state forgot is made, and a member
    removed elsewhere is added back."""
    emulator.create_list("VIPs", list_id=LIST_ID)
    set_list_meta(project, reconcile="true")
    assert vips(project, emulator).returncode == 0
    wanted = sorted(model_emails(project))
    leaving, removed_elsewhere = wanted[0], wanted[1]
    shutil.rmtree(project / ".klaviyo_sync")  # the state is lost ...
    change_model(project, f"DELETE FROM main.vip_audience WHERE email = '{leaving}'")
    profile_id = next(
        p["id"] for p in emulator.profiles() if p["attributes"]["email"] == removed_elsewhere
    )
    klaviyo_api(
        emulator,
        "DELETE",
        f"/api/lists/{LIST_ID}/relationships/profiles",
        {"data": [{"type": "profile", "id": profile_id}]},
    )

    done = vips(project, emulator)  # ... so every row looks new, and no row looks removed

    assert done.returncode == 0, done.output
    assert "removed 1 not in the model" in done.stdout
    assert members(emulator) == set(wanted) - {leaving}

    # Once the state knows the row, a member removed elsewhere is added back.
    klaviyo_api(
        emulator,
        "DELETE",
        f"/api/lists/{LIST_ID}/relationships/profiles",
        {"data": [{"type": "profile", "id": profile_id}]},
    )
    again = vips(project, emulator)
    assert again.returncode == 0, again.output
    assert "sent 1 model rows the list lacked" in again.stdout
    assert again.row("vip_audience")["added"] == 1
    assert members(emulator) == set(wanted) - {leaving}


def test_the_brake_stops_a_reconcile_that_would_remove_too_much(
    project: Path, emulator: Emulator
) -> None:
    emulator.create_list("VIPs", list_id=LIST_ID)
    set_list_meta(project, max_removal_share="0.02")
    assert vips(project, emulator).returncode == 0
    strays = [f"stray{i}@example.com" for i in range(12)]
    join_elsewhere(emulator, *strays)

    stopped = vips(project, emulator, "--reconcile")

    assert stopped.returncode == 2, stopped.output
    assert "would remove from list VipLst (reconcile) 12 profiles" in stopped.output
    assert "--allow-removals" in stopped.output
    assert set(strays) <= members(emulator)

    allowed = vips(project, emulator, "--reconcile", "--allow-removals")
    assert allowed.returncode == 0, allowed.output
    assert allowed.row("vip_audience")["removed"] == 12
    assert members(emulator) == model_emails(project)

    # A list Klaviyo will not read stops the model, after its own changes were recorded.
    emulator.inject(400, operation="get_profiles_for_list")
    unread = vips(project, emulator, "--reconcile")
    assert unread.returncode == 2, unread.output
    assert "reconcile could not read list VipLst" in unread.output
    assert "Traceback" not in unread.output


def test_no_reconcile_after_a_run_whose_changes_failed(project: Path, emulator: Emulator) -> None:
    """While a change has not reached Klaviyo, the list is not what the model wants yet:
    reconcile waits for a run that sent everything."""
    emulator.create_list("VIPs", list_id=LIST_ID)
    set_list_meta(project, reconcile="true")
    assert vips(project, emulator).returncode == 0
    join_elsewhere(emulator, "stray@example.com")
    change_model(
        project,
        "INSERT INTO main.vip_audience VALUES ('new.vip@example.com', 'C09001', 'New')",
    )
    emulator.inject(400, operation="add_profiles_to_list")  # refused whole: the row fails
    read_before = pages_read(emulator)

    failed = vips(project, emulator)

    assert failed.returncode == 1, failed.output
    assert "reconcile skipped: not every change reached Klaviyo" in failed.stdout
    assert "stray@example.com" in members(emulator)
    assert pages_read(emulator) == read_before

    done = vips(project, emulator)
    assert done.returncode == 0, done.output
    assert members(emulator) == model_emails(project)
