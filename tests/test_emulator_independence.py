"""The emulator checks what the client sends with code of its own: its email and phone
rules are written from Klaviyo's documentation, and nothing under emulator/ imports the
client, so a mistake in the client's validators shows up as Klaviyo's 400 in the tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dbt_klaviyo_sync import identifiers as client
from dbt_klaviyo_sync.emulator import identifiers as emulator

EMULATOR = Path(emulator.__file__).parent
#: The one module of the client's package the emulator may use: the spec it validates against.
ALLOWED = ("dbt_klaviyo_sync.emulator", "dbt_klaviyo_sync.klaviyo.openapi")


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, absolute (`from .x import y` counts as the package's)."""
    package = "dbt_klaviyo_sync.emulator"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from package import module` imports the module.
            found += [f"{base}.{alias.name}" for alias in node.names]
    return found


def test_no_emulator_module_imports_the_client() -> None:
    offending = {
        f"{path.name}: {module}"
        for path in sorted(EMULATOR.glob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] == "dbt_klaviyo_sync"
        and not any(module == a or module.startswith(a + ".") for a in ALLOWED)
    }
    assert offending == set()


def test_the_import_check_sees_a_client_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from dbt_klaviyo_sync.identifiers import e164\nfrom ..klaviyo import openapi\n"
        "from ..klaviyo.client import KlaviyoClient\nfrom .errors import invalid\n"
    )
    assert imported_modules(module) == [
        "dbt_klaviyo_sync.identifiers.e164",
        "dbt_klaviyo_sync.klaviyo.openapi",
        "dbt_klaviyo_sync.klaviyo.client.KlaviyoClient",
        "dbt_klaviyo_sync.emulator.errors.invalid",
    ]


def verdict(check: object, text: str) -> str | None:
    """What a validator makes of `text`: the value it returns, or None when it refuses."""
    assert callable(check)
    try:
        return str(check(text))
    except ValueError:
        return None


# Where the two disagree, and why each is right for its job.
DISAGREEMENTS = [
    # The client normalises a formatted number before sending it; Klaviyo verifies that
    # numbers are sent in E.164 (klaviyo-api-python#48), so the emulator refuses the raw text.
    (client.e164, emulator.e164, "+1 (415) 555-0123", "+14155550123", None),
    # The client refuses special-use domains (they cannot receive mail); Klaviyo documents
    # no such rule, so the emulator leaves them to syntax, which they pass.
    (client.checked_email, emulator.checked_email, "a@x.test", None, "a@x.test"),
    # The client accepts internationalised addresses (RFC 6531); the emulator holds to RFC
    # 5322, which is ASCII, as Klaviyo documents nothing wider.
    (client.checked_email, emulator.checked_email, "ä@example.com", "ä@example.com", None),
    # The client trims; the emulator takes what is sent, and spaces are not in an address.
    (client.checked_email, emulator.checked_email, " a@example.com", "a@example.com", None),
]


@pytest.mark.parametrize(("ours", "theirs", "text", "by_client", "by_emulator"), DISAGREEMENTS)
def test_where_the_client_and_the_emulator_disagree(
    ours: object, theirs: object, text: str, by_client: str | None, by_emulator: str | None
) -> None:
    assert (verdict(ours, text), verdict(theirs, text)) == (by_client, by_emulator)


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("+14155550123", True),
        ("+442071838750", True),
        ("+390612345678", True),  # Italy: the national number keeps its leading zero
        ("+1555", False),
        ("+2345678900", False),  # Klaviyo's own example of a refused number (API.md §3)
        ("+04155550123", False),
        ("14155550123", False),
        ("+1415555012345678", False),  # more than 15 digits
        ("+14155550123;ext=1", False),
        ("+1-415-555-0123", False),
    ],
)
def test_the_emulator_phone_rule(text: str, valid: bool) -> None:
    assert (verdict(emulator.e164, text) == text) is valid


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("a@example.com", True),
        ("A.B+tag@Sub.Example.co.uk", True),
        ("o'brien!#$%&*/=?^_`{|}~-@example.com", True),
        ("a@xn--exmple-cua.com", True),
        ("a@example.xn--p1ai", True),
        ("a" * 64 + "@example.com", True),
        ("a" * 65 + "@example.com", False),
        ("a@" + ".".join(["b" * 63] * 4) + ".com", False),  # over 254 in all
        ("a..b@example.com", False),
        (".a@example.com", False),
        ("a.@example.com", False),
        ('"quoted"@example.com', False),
        ("a@[127.0.0.1]", False),
        ("a@localhost", False),
        ("a@-example.com", False),
        ("a@example-.com", False),
        ("a@example.c", False),
        ("a@example.123", False),
        ("a@example.com.", False),
        ("a@@example.com", False),
        ("a b@example.com", False),
        ("@example.com", False),
        ("a@", False),
        ("", False),
    ],
)
def test_the_emulator_email_rule(text: str, valid: bool) -> None:
    assert (verdict(emulator.checked_email, text) == text) is valid
