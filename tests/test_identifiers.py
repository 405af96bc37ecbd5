"""The fast email check accepts only what email-validator accepts, and agrees on the rest."""

from __future__ import annotations

import random
import string

import pytest
from email_validator import EmailNotValidError, validate_email

from dbt_klaviyo_sync.identifiers import InvalidValue, checked_email, e164


def exact(text: str) -> bool:
    try:
        validate_email(text, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


def ours(text: str) -> bool:
    try:
        checked_email(text)
    except InvalidValue:
        return False
    return True


EDGES = [
    "a@example.com",
    "A.B+tag@Sub.Example.co.uk",
    "a..b@example.com",
    ".a@example.com",
    "a.@example.com",
    "a@-example.com",
    "a@example-.com",
    "a@example",
    "a@example.c",
    "a@example.123",
    "a@localhost",
    "a@printer.local",
    "a@x.test",
    "a@x.invalid",
    "a@x.onion",
    "a@x.arpa",
    "a@[127.0.0.1]",
    '"quoted"@example.com',
    "ä@example.com",
    "a@exämple.com",
    "a@xn--exmple-cua.com",
    "a" * 64 + "@example.com",
    "a" * 65 + "@example.com",
    "a@" + "b" * 63 + ".com",
    "a@" + "b" * 64 + ".com",
    "a@" + ".".join(["b" * 60] * 5) + ".com",
    "a b@example.com",
    "a@ex ample.com",
    "@example.com",
    "a@",
    "",
    " a@example.com ",
    "a@example.com.",
    "a@@example.com",
    "a@example..com",
    "x@a.b.c.d.e.f.g.h.com",
]


@pytest.mark.parametrize("text", EDGES)
def test_edges_agree_with_email_validator(text: str) -> None:
    assert ours(text) == exact(text.strip())


def test_random_addresses_agree_with_email_validator() -> None:
    rng = random.Random(20261129)
    alphabet = string.ascii_letters + string.digits + ".-_+@!#'`~" + "ä"
    for _ in range(3000):
        local = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        domain = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        tld = rng.choice(["com", "io", "c", "local", "x1", "museum", ""])
        text = f"{local}@{domain}.{tld}"
        assert ours(text) == exact(text), text


def test_phone_numbers_become_e164_or_are_refused() -> None:
    assert e164("+1 (415) 555-0123") == "+14155550123"
    with pytest.raises(InvalidValue, match=r"E\.164"):
        e164("415 555 0123")
    with pytest.raises(InvalidValue, match="not a valid phone number"):
        e164("+1415555012")


@pytest.mark.parametrize(
    "text", ["+14155550123", "+442071838750", "+390612345678", "+819012345678", "+1 415 555 0123"]
)
def test_the_shortcut_for_e164_input_agrees_with_the_full_parser(text: str) -> None:
    import phonenumbers

    full = phonenumbers.parse(text, None)
    assert e164(text) == phonenumbers.format_number(full, phonenumbers.PhoneNumberFormat.E164)


def test_a_possible_but_unassigned_number_passes_only_when_not_strict() -> None:
    assert e164("+15551234567", strict=False) == "+15551234567"
    with pytest.raises(InvalidValue):
        e164("+15551234567")


def test_the_lenient_shortcut_agrees_with_is_possible_number() -> None:
    import phonenumbers

    rng = random.Random(7)
    codes = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
    for _ in range(3000):
        text = f"+{rng.choice(codes)}{rng.randint(1, 9)}{rng.randint(0, 10 ** rng.randint(3, 11))}"
        try:
            full = phonenumbers.is_possible_number(phonenumbers.parse(text, None))
        except phonenumbers.NumberParseException:
            full = False
        try:
            ours = e164(text, strict=False) == text
        except InvalidValue:
            ours = False
        assert ours == full, text
