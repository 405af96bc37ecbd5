"""The emulator's own checks of an email address and a phone number, written from what
Klaviyo documents, not from the client's validators (dbt_klaviyo_sync.identifiers), so that
a mistake in those shows up as Klaviyo's 400 in the tests instead of being shared.

- Phone numbers: "This must be in E.164 format" (SPEC, `phone_number`), which Klaviyo
  enforces as sent: "the current API verifies that phone numbers are sent in E.164 format"
  (klaviyo-api-python#48). So `+`, a non-zero digit, at most 15 digits in all, and nothing
  else: no spaces, dashes or brackets, which the client must remove itself. Klaviyo also
  refuses numbers that cannot exist for their country code (`"+2345678900 is not a valid
  phone number."`, API.md §3); libphonenumber's metadata decides that here.
- Email addresses: the RFC 5322 `addr-spec` with a dot-atom local part (no quoted strings,
  no comments) and a domain of DNS host labels (no address literals), within RFC 5321's
  lengths: 64 characters before the `@`, 254 in all. ASCII only: RFC 5322 is ASCII, and
  Klaviyo does not document accepting internationalized (RFC 6531) addresses.
"""

from __future__ import annotations

import re

import phonenumbers

#: RFC 5322 `atext`: the characters of an unquoted local part, besides dots.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
#: A DNS host label: letters, digits and inner hyphens, at most 63 characters.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: A top-level domain: letters, or an internationalized one in its ASCII (`xn--`) form.
_TOP_LABEL = re.compile(r"[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59}")
_E164 = re.compile(r"\+[1-9][0-9]{0,14}")


class InvalidValue(ValueError):
    """A value Klaviyo refuses; the message says why."""


def checked_email(text: str) -> str:
    """The address, unchanged, if Klaviyo accepts it; else InvalidValue."""
    local, at, domain = text.rpartition("@")
    labels = domain.split(".")
    if not (
        at
        and text.isascii()
        and len(text) <= 254
        and 0 < len(local) <= 64
        and _DOT_ATOM.fullmatch(local)
        and len(labels) >= 2
        and all(_LABEL.fullmatch(label) for label in labels)
        and _TOP_LABEL.fullmatch(labels[-1])
    ):
        raise InvalidValue(f"{text} is not a valid email address.")
    return text


def e164(text: str) -> str:
    """The number, unchanged, if it is in E.164 form and exists for its country code;
    else InvalidValue."""
    if not _E164.fullmatch(text):
        raise InvalidValue(f"{text} is not a valid phone number.")
    try:
        number = phonenumbers.parse(text)
    except phonenumbers.NumberParseException:
        raise InvalidValue(f"{text} is not a valid phone number.") from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidValue(f"{text} is not a valid phone number.")
    return text
