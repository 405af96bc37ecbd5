"""The command line itself: argument forms, exit statuses, and keys kept out of errors."""

from __future__ import annotations

import pytest

from dbt_klaviyo_sync import cli
from dbt_klaviyo_sync.dbt import DbtProject
from tests.conftest import PRIVATE_KEY, PUBLIC_KEY


@pytest.mark.parametrize(
    ("given", "expanded"),
    [
        (["sync", "--select", "a", "b"], ["sync", "--select", "a", "--select", "b"]),
        (["sync", "-s", "a", "--dry-run"], ["sync", "-s", "a", "--dry-run"]),
        (
            ["sync", "--select", "a", "b", "-s", "c"],
            ["sync", "--select", "a", "--select", "b", "-s", "c"],
        ),
        (["sync", "--select"], ["sync", "--select"]),
        (["sync", "--select", "--dry-run"], ["sync", "--select", "--dry-run"]),
    ],
)
def test_select_takes_several_names_as_dbt_does(given: list[str], expanded: list[str]) -> None:
    assert cli._expand_multi_values(given) == expanded


def test_an_unexpected_error_exits_2_without_a_traceback_or_keys(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KLAVIYO_PRIVATE_API_KEY", PRIVATE_KEY)
    monkeypatch.setenv("KLAVIYO_PUBLIC_API_KEY", PUBLIC_KEY)

    def explode(*args: object) -> None:
        raise RuntimeError(f"something broke near {PRIVATE_KEY} and {PUBLIC_KEY}")

    monkeypatch.setattr(DbtProject, "locate", explode)
    with pytest.raises(SystemExit) as exited:
        cli.main(["sync"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Internal error" in err and "RuntimeError" in err and "--log-level debug" in err
    assert "Traceback" not in err  # a traceback could carry what a library put in it
    assert PRIVATE_KEY not in err and PUBLIC_KEY not in err
    assert "[redacted key]" in err
