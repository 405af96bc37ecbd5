"""API keys: read from the environment cleanly, refused with a message that never shows
them, and scrubbed from everything that comes back from outside, whatever form they
take (a server or proxy that echoes the Authorization header, a key cut in two)."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from dbt_klaviyo_sync import api
from dbt_klaviyo_sync.emulator import Emulator
from dbt_klaviyo_sync.errors import ConfigurationError, CredentialsError
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient, KlaviyoRejected, _parse_errors
from dbt_klaviyo_sync.logs import REDACTED, api_key, redact
from tests.conftest import PRIVATE_KEY, PUBLIC_KEY

#: A private key that does not look like one (so only the client's own knowledge of it,
#: not the shape of Klaviyo's keys, can catch it).
ODD_KEY = "Zq7-odd-shaped-secret-0042"


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(private_key=PRIVATE_KEY, public_key=PUBLIC_KEY) as emu:
        yield emu


@pytest.fixture
def no_keys(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("KLAVIYO_PRIVATE_API_KEY", "KLAVIYO_PUBLIC_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# Reading keys


@pytest.mark.parametrize("around", ["{}\n", "{}\r\n", "  {}\t", "\n{} "])
def test_a_key_is_read_without_the_whitespace_around_it(
    no_keys: pytest.MonkeyPatch, around: str
) -> None:
    """A Kubernetes secret ends in a newline, a CRLF .env file in \\r\\n."""
    no_keys.setenv("KLAVIYO_PRIVATE_API_KEY", around.format(PRIVATE_KEY))
    no_keys.setenv("KLAVIYO_PUBLIC_API_KEY", around.format(PUBLIC_KEY))
    options = api._options()
    assert (options.private_key, options.public_key) == (PRIVATE_KEY, PUBLIC_KEY)


@pytest.mark.parametrize("value", [None, "", " \r\n"])
def test_an_unset_or_blank_key_is_none(no_keys: pytest.MonkeyPatch, value: str | None) -> None:
    if value is not None:
        no_keys.setenv("KLAVIYO_PRIVATE_API_KEY", value)
    assert api_key("KLAVIYO_PRIVATE_API_KEY") is None


@pytest.mark.parametrize(
    "inside", ["pk_abc123\ndef456", "pk_abc123 def456", "pk_abc123\x1bdef456", "pk_abc123é456"]
)
def test_a_key_with_whitespace_or_control_characters_inside_is_refused_unshown(
    no_keys: pytest.MonkeyPatch, inside: str
) -> None:
    no_keys.setenv("KLAVIYO_PRIVATE_API_KEY", inside)
    with pytest.raises(ConfigurationError) as caught:
        api._options()
    assert "KLAVIYO_PRIVATE_API_KEY" in str(caught.value)
    assert "abc123" not in str(caught.value) and "456" not in str(caught.value)


def test_the_client_takes_a_key_with_a_trailing_newline(emulator: Emulator) -> None:
    """Reported: requests raised InvalidHeader, and the traceback printed the whole key."""
    client = KlaviyoClient(emulator.url, PRIVATE_KEY + "\r\n", PUBLIC_KEY + "\n")
    assert client.call("get_profiles")["data"] == []


def test_the_client_refuses_a_key_with_a_newline_inside_without_showing_it() -> None:
    broken = PRIVATE_KEY[:10] + "\n" + PRIVATE_KEY[10:]
    with pytest.raises(ConfigurationError) as caught:
        KlaviyoClient("http://127.0.0.1:9", broken, None)
    assert PRIVATE_KEY[:10] not in str(caught.value) and PRIVATE_KEY[10:] not in str(caught.value)


# Redaction


def test_redact_catches_the_environments_keys_stripped(no_keys: pytest.MonkeyPatch) -> None:
    no_keys.setenv("KLAVIYO_PRIVATE_API_KEY", ODD_KEY + "\r\n")
    assert redact(f"a {ODD_KEY} b") == f"a {REDACTED} b"


def test_redact_replaces_the_longest_key_first(no_keys: pytest.MonkeyPatch) -> None:
    no_keys.setenv("KLAVIYO_PUBLIC_API_KEY", "Ab12Cd")
    no_keys.setenv("KLAVIYO_PRIVATE_API_KEY", "zz-Ab12Cd-zz-secret")
    assert redact("zz-Ab12Cd-zz-secret and Ab12Cd") == f"{REDACTED} and {REDACTED}"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("unknown key pk_live_0123456789abcdef in a message", "0123456789abcdef"),
        ("Authorization: Klaviyo-API-Key s3cr3t.token-value", "s3cr3t"),
        ('{"detail": "klaviyo-api-key  s3cr3t.token-value"}', "s3cr3t"),
        ("Authorization: Bearer eyJhbGciOi.s3cr3t.sig", "s3cr3t"),
    ],
)
def test_redact_catches_keys_it_was_not_told_of(
    no_keys: pytest.MonkeyPatch, text: str, secret: str
) -> None:
    cleaned = redact(text)
    assert secret not in cleaned and REDACTED in cleaned


def test_redact_takes_the_keys_it_is_given(no_keys: pytest.MonkeyPatch) -> None:
    assert redact(f"x{ODD_KEY}x", [ODD_KEY, None]) == f"x{REDACTED}x"
    assert redact(f"Klaviyo-API-Key {ODD_KEY}", [ODD_KEY]) == f"Klaviyo-API-Key {REDACTED}"


# Texts from outside are scrubbed where they come in


def test_every_text_of_an_error_body_is_scrubbed(no_keys: pytest.MonkeyPatch) -> None:
    error = {
        "status": "400",
        "code": ODD_KEY,
        "title": f"title {ODD_KEY}",
        "source": {"pointer": f"/data/{ODD_KEY}", "parameter": ODD_KEY},
        "meta": {ODD_KEY: [f"Bearer {ODD_KEY}"], "nested": {"k": ODD_KEY}},
    }
    [parsed] = _parse_errors(400, orjson.dumps({"errors": [error]}), (ODD_KEY, None))
    assert ODD_KEY not in repr(parsed)
    assert parsed.detail == f"title {REDACTED}"  # no detail: the title stands in
    assert parsed.status == 400


def test_a_body_that_is_not_json_is_scrubbed_before_it_is_cut_short() -> None:
    body = ("x" * 190 + f" {ODD_KEY} ").encode()
    [parsed] = _parse_errors(502, body, (ODD_KEY,))
    assert ODD_KEY[:6] not in parsed.detail
    assert len(parsed.detail) <= 200


def test_odd_errors_arrays_do_not_break_parsing() -> None:
    body = orjson.dumps({"errors": ["x", {"status": "abc", "source": "nowhere", "meta": [1]}]})
    [parsed] = _parse_errors(400, body, ())
    assert (parsed.status, parsed.pointer, parsed.meta) == (400, None, {})


def test_an_echoed_authorization_header_never_reaches_a_reject_reason(
    emulator: Emulator,
) -> None:
    """A server or proxy that echoes the Authorization header in a 400 body."""
    emulator.inject(kind="echo")
    client = KlaviyoClient(emulator.url, ODD_KEY, None)
    with pytest.raises(KlaviyoRejected) as caught:
        client.call("get_profiles")
    assert ODD_KEY not in str(caught.value)
    assert ODD_KEY not in repr(caught.value.errors)
    assert REDACTED in caught.value.detail


def test_a_refused_key_echoed_back_is_not_in_the_credentials_error(emulator: Emulator) -> None:
    body = orjson.dumps({"errors": [{"detail": f"key {ODD_KEY} is not valid"}]})
    emulator.inject(kind="raw", status=401, body=body)
    with pytest.raises(CredentialsError) as caught:
        KlaviyoClient(emulator.url, ODD_KEY, None).call("get_profiles")
    assert ODD_KEY not in str(caught.value)
