"""Klaviyo's rules for the identifiers it checks: an email address and an E.164 phone.

`email-validator` is exact but costs about 0.2 ms an address, which adds up over millions of
rows. Almost every real address is plain ASCII of a shape that is certainly valid, so a
strict regular expression accepts those at once, and anything else (or anything close to
a rule's edge) goes to `email-validator` for the verdict. The expression only ever accepts
what `email-validator` accepts; tests/test_identifiers.py checks that.
"""

from __future__ import annotations

import re

import phonenumbers
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN_EMAIL = re.compile(rf"^({_ATOM}(?:\.{_ATOM})*)@((?:{_LABEL}\.)+([A-Za-z]{{2,63}}))$")
_SPECIAL_USE = frozenset(SPECIAL_USE_DOMAIN_NAMES)


class InvalidValue(ValueError):
    """A value Klaviyo would refuse; the message is the reason shown to the user."""


def checked_email(text: str) -> str:
    """The address, trimmed, or InvalidValue with the reason."""
    text = text.strip()
    plain = _PLAIN_EMAIL.match(text)
    if (
        plain
        and len(plain.group(1)) <= 64
        and len(text) <= 254
        and plain.group(3).lower() not in _SPECIAL_USE
    ):
        return text
    try:
        validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidValue(f"{text!r} is not a valid email address: {exc}") from exc
    return text


def e164(text: str) -> str:
    """A valid phone number in E.164 form, or InvalidValue with the reason."""
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidValue(
            f"{text!r} is not a phone number Klaviyo accepts: it must be in E.164 form, "
            "starting with + and the country code (e.g. +14155550123)"
        ) from exc
    if not phonenumbers.is_valid_number(number):
        raise InvalidValue(
            f"{text!r} is not a valid phone number for its country code; Klaviyo needs a "
            "valid number in E.164 form (e.g. +14155550123)"
        )
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
