"""Every command output shown in README.md and docs/*.md is what the command prints: each
scenario of scripts/docs_outputs.py runs the real CLI, dbt and the emulator on a private
copy of the session's built demo project, and each block marked `<!-- output: NAME -->`
must hold what its scenario printed. With DBT_KLAVIYO_DOCS_WRITE=1 (`python3 dev.py docs`)
the scenarios rewrite the blocks instead, after a change to what a command prints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scripts import docs_outputs

WRITE = os.environ.get("DBT_KLAVIYO_DOCS_WRITE") == "1"
FIX = "Run `python3 dev.py docs` to rewrite the blocks (then read the diff: is it meant?)."


def test_every_text_block_is_made_by_a_scenario_or_says_why_not() -> None:
    assert docs_outputs.unaccounted() == []


@pytest.mark.parametrize("scenario", sorted(docs_outputs.SCENARIOS))
def test_the_docs_show_what_the_commands_print(
    scenario: str, request: pytest.FixtureRequest
) -> None:
    on_postgres = docs_outputs.SCENARIOS[scenario].postgres
    project: Path = request.getfixturevalue("pg_project" if on_postgres else "project")
    outputs = docs_outputs.run_scenario(scenario, project)
    if WRITE:
        docs_outputs.write(outputs)
        return
    drifted = docs_outputs.differences(outputs)
    assert not drifted, "\n\n".join([*drifted, FIX])


def test_a_drifted_block_is_named_with_its_page_and_marker() -> None:
    """The check can fail: a block one word off is reported, with where it is."""
    [block] = [b for b in docs_outputs.all_blocks() if b.name == "status-typo"]
    diff = docs_outputs.differences({"status-typo": block.text.replace("never", "not")})
    assert len(diff) == 1
    assert f"{block.where} (the page)" in diff[0] and "<!-- output: status-typo -->" in diff[0]
    assert "-Error: model 'custmers' has never been synced" in diff[0]
