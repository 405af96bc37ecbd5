"""Klaviyo's error responses: one exception that carries everything the error body needs.

Every layer (validation, store, handlers) raises `ApiError`; only the server turns it into a
response, so the JSON:API error shape is written in exactly one place.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

#: Klaviyo names this pointer when an error has no more precise source.
DEFAULT_POINTER = "/data/"


@dataclass(eq=False)
class ApiError(Exception):
    """An error response: `{"errors": [{id, status, code, title, detail, source, links, meta}]}`."""

    status: int
    code: str
    title: str
    detail: str
    pointer: str | None = None
    parameter: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    #: Further errors of the same answer, e.g. every invalid profile of a bulk import job.
    more: tuple[ApiError, ...] = ()

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.detail}"

    def document(self) -> dict[str, Any]:
        return {"errors": [error.entry() for error in (self, *self.more)]}

    def entry(self) -> dict[str, Any]:
        """This error as one entry of `errors`."""
        if self.parameter is not None:
            source = {"parameter": self.parameter}
        else:
            source = {"pointer": self.pointer or DEFAULT_POINTER}
        return {
            "id": str(uuid.uuid4()),
            "status": self.status,
            "code": self.code,
            "title": self.title,
            "detail": self.detail,
            "source": source,
            "links": {},
            "meta": self.meta,
        }


class SpecViolation(ApiError):
    """A request the bundled OpenAPI spec refuses; counted apart so tests can assert on it."""


def invalid(detail: str, *, pointer: str | None = None, parameter: str | None = None) -> ApiError:
    return ApiError(400, "invalid", "Invalid input.", detail, pointer=pointer, parameter=parameter)


def spec_violation(
    detail: str, *, pointer: str | None = None, parameter: str | None = None
) -> SpecViolation:
    return SpecViolation(
        400, "invalid", "Invalid input.", detail, pointer=pointer, parameter=parameter
    )


def not_found(detail: str = "Not found.", *, pointer: str | None = None) -> ApiError:
    return ApiError(404, "not_found", "Not found.", detail, pointer=pointer)


def from_status(status: int, detail: str | None = None) -> ApiError:
    """A generic error for `status`, titled and coded after its HTTP reason phrase."""
    phrase = HTTPStatus(status).phrase
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    return ApiError(status, code, f"{phrase}.", detail or f"{phrase}.")
