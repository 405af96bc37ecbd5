"""Klaviyo's rules for the identifiers it checks: an email address and an E.164 phone.

`email-validator` is exact but costs about 0.2 ms an address, which adds up over millions of
rows. Almost every real address is plain ASCII of a shape that is certainly valid, so a
strict regular expression accepts those at once, and anything else (or anything close to
a rule's edge) goes to `email-validator` for the verdict. The expression only ever accepts
what `email-validator` accepts; tests/test_identifiers.py checks that.
"""

from __future__ import annotations

import re
from functools import cache

import pyarrow as pa
import pyarrow.compute as pc

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# Plain ASCII addresses, valid for sure when the local part has at most 64 characters, the
# whole at most 254, and the top-level domain is not a special-use one (.test, .local, ...).
_PLAIN = rf"^(?:{_ATOM}(?:\.{_ATOM})*)@(?:{_LABEL}\.)+[A-Za-z]{{2,63}}$"
_SHORT_LOCAL = r"^[^@]{1,64}@"
_E164_SHAPE = re.compile(r"^\+[1-9][0-9]{6,14}$")


# email-validator and phonenumbers are imported at first use: a run with nothing to send
# (a no-op) checks no identifier, and their imports cost a tenth of a second.


@cache
def _checks() -> list[tuple[re.Pattern[str], bool]]:
    """The expressions of a certainly valid address: each must match (True) or not."""
    from email_validator import SPECIAL_USE_DOMAIN_NAMES

    special_use = r"(?i)\.(?:" + "|".join(SPECIAL_USE_DOMAIN_NAMES) + r")$"
    return [
        (re.compile(p), wanted)
        for p, wanted in ((_PLAIN, True), (_SHORT_LOCAL, True), (special_use, False))
    ]


@cache
def _country_codes() -> frozenset[int]:
    import phonenumbers

    return frozenset(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


class InvalidValue(ValueError):
    """A value Klaviyo would refuse; the message is the reason shown to the user."""


def checked_email(text: str) -> str:
    """The address, trimmed, or InvalidValue with the reason."""
    text = text.strip()
    if len(text) <= 254 and all(bool(p.search(text)) is wanted for p, wanted in _checks()):
        return text
    from email_validator import EmailNotValidError, validate_email

    try:
        validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidValue(f"{text!r} is not a valid email address: {exc}") from exc
    return text


def maybe_invalid_emails(emails: pa.Array) -> pa.Array:
    """For a whole column: False where the address is certainly valid, so only the rows
    left True need `checked_email` (Arrow's regular expressions run in C++)."""
    odd = pc.greater(pc.utf8_length(emails), 254)
    for pattern, wanted in _checks():
        matches = pc.match_substring_regex(emails, pattern.pattern)
        odd = pc.or_kleene(odd, matches if not wanted else pc.invert(matches))
    return pc.fill_null(odd, False)


def _split(text: str) -> tuple[int, str] | None:
    """(country code, national number) of a `+<digits>` string, when that is all it takes:
    country codes are prefix-free, and a leading zero (Italy) needs the full parser."""
    if _E164_SHAPE.match(text):
        for length in (1, 2, 3):
            country, national = int(text[1 : 1 + length]), text[1 + length :]
            if country in _country_codes() and national[:1] != "0":
                return country, national
    return None


def possible_e164(phones: pa.Array) -> pa.Array:
    """For a whole column: True where `e164(text, strict=False)` gives the text back as it
    is (E.164 already, of a possible length for its country). A number's answer depends
    only on its first five characters (the country code is up to three digits, and the
    digit after it) and its length, so the column is grouped by those, and each group is
    answered once in Python."""
    shaped = pc.fill_null(pc.match_substring_regex(phones, _E164_SHAPE.pattern), False)
    length = pc.cast(pc.utf8_length(phones), pa.string())
    head = pc.binary_join_element_wise(pc.utf8_slice_codeunits(phones, 0, 5), length, ":")
    heads = pc.unique(pc.filter(head, shaped)).to_pylist()
    possible = [h for h in heads if _head_possible(h)]
    return pc.and_(shaped, pc.is_in(head, value_set=pa.array(possible, pa.string())))


def _head_possible(head: str) -> bool:
    """Whether the E.164 numbers of this `first five characters:length` are possible: the
    answer for a number of those five characters and zeros after them."""
    start, length = head.split(":")
    split = _split(start + "0" * (int(length) - len(start)))
    return split is not None and _possible(split[0], len(split[1]))


@cache
def _possible(country: int, digits: int) -> bool:
    """Whether a national number of this many digits is possible in the country: all that
    `is_possible_number` looks at, so one answer per (country, length) serves every number."""
    import phonenumbers

    sample = phonenumbers.PhoneNumber(country_code=country, national_number=10 ** (digits - 1))
    return bool(phonenumbers.is_possible_number(sample))


def e164(text: str, *, strict: bool = True) -> str:
    """A phone number in E.164 form, or InvalidValue with the reason.

    `strict` also checks that the number is valid for its country, as Klaviyo does, which
    costs about 25 µs a number; without it the number must only be possible (its length
    fits the country), which for input already in E.164 form costs next to nothing, and
    Klaviyo has the last word on the rest.
    """
    split = _split(text)
    if split and not strict:
        if _possible(split[0], len(split[1])):
            return text
        raise _not_valid(text)
    import phonenumbers

    try:
        number = (
            phonenumbers.PhoneNumber(country_code=split[0], national_number=int(split[1]))
            if split
            else phonenumbers.parse(text, None)
        )
    except phonenumbers.NumberParseException as exc:
        raise InvalidValue(
            f"{text!r} is not a phone number Klaviyo accepts: it must be in E.164 form, "
            "starting with + and the country code (e.g. +14155550123)"
        ) from exc
    if number.extension:
        # E.164 has no extensions: sending the number without it would lose it unseen.
        raise InvalidValue(
            f"{text!r} has an extension ({number.extension}), which Klaviyo's E.164 phone "
            "numbers cannot hold; send the number without it (and the extension as a custom "
            "property if you need it)"
        )
    fits = phonenumbers.is_valid_number if strict else phonenumbers.is_possible_number
    if not fits(number):
        raise _not_valid(text)
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def _not_valid(text: str) -> InvalidValue:
    return InvalidValue(
        f"{text!r} is not a valid phone number for its country code; Klaviyo needs a "
        "valid number in E.164 form (e.g. +14155550123)"
    )
