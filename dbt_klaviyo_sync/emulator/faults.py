"""Injected faults: what the next requests to an operation suffer instead of a clean answer.

A fault applies to the next `count` requests matching its operation (or any Klaviyo
request, when it names none), first injected first served, one fault per request. Besides
Klaviyo's own failures, some play a hostile server or proxy (`trickle`, `raw`, `echo`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

from werkzeug.wrappers import Response

from dbt_klaviyo_sync.klaviyo import openapi

from .errors import ApiError

FaultKind = Literal["status", "reset", "delay", "malformed", "job_stuck", "trickle", "raw", "echo"]
#: The only operation that creates the jobs `job_stuck` holds back.
JOB_OPERATION = "bulk_import_profiles"


@dataclass
class Fault:
    """One injected fault.

    - `status`: answer with that HTTP status and an errors body (a 429 carries
      `Retry-After: retry_after`).
    - `reset`: drop the TCP connection without answering.
    - `delay`: wait `seconds` before answering, to provoke client read timeouts.
    - `malformed`: answer 200 with a body that is not JSON.
    - `job_stuck`: the bulk job the request creates never leaves `processing`.
    - `trickle`: answer as usual, headers at once, but the body one byte every `seconds`
      (a client whose timeout applies per read never gives up).
    - `raw`: answer exactly `status` (any of 100-599, 2xx and 3xx included), `body` and
      `headers`: `Location` for a redirect, `Retry-After: soon` for a 429, an empty 202...
    - `echo`: a 400 whose error detail holds the request's Authorization header verbatim,
      as a misbehaving proxy might send back.

    With `after`, the request is processed for real first, and only the answer is lost.
    A `status` fault's error points at `pointer` when given (a record of a bulk request,
    say). With `body_contains`, the fault strikes only requests whose body contains that
    text: a record Klaviyo refuses whatever request it travels in.
    """

    kind: FaultKind
    operation: str | None
    remaining: int
    status: int = 0
    retry_after: int = 1
    seconds: float = 0.0
    after: bool = False
    pointer: str | None = None
    body_contains: bytes | None = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def raw_answer(self) -> Response:
        """A `raw` fault's answer, with no header but those given (and the server's own)."""
        response = Response(self.body, self.status, headers=self.headers)
        if not any(name.lower() == "content-type" for name in self.headers):
            del response.headers["Content-Type"]
        return response


def trickled(response: Response, seconds: float) -> Response:
    """`response`, its body sent one byte every `seconds`."""
    body = response.get_data()

    def drip() -> Iterator[bytes]:
        for index in range(len(body)):
            if index:
                time.sleep(seconds)
            yield body[index : index + 1]

    return Response(drip(), response.status_code, headers=response.headers)


def echoed(authorization: str) -> ApiError:
    """A 400 that repeats the request's Authorization header, as a careless proxy might."""
    return ApiError(
        400, "invalid", "Invalid input.", f"Bad request headers: Authorization: {authorization}"
    )


def make_fault(
    status: int | None = None,
    *,
    kind: FaultKind | None = None,
    count: int = 1,
    operation: str | None = None,
    retry_after: int = 1,
    seconds: float = 0.0,
    after: bool = False,
    pointer: str | None = None,
    body_contains: str | None = None,
    body: bytes | str = b"",
    headers: dict[str, str] | None = None,
) -> Fault:
    """Check the options of `Emulator.inject` and build the fault; ValueError if wrong."""
    if kind is None:
        if status is None:
            raise ValueError("give a status, or a kind of fault")
        kind = "status"
    if kind not in get_args(FaultKind):
        raise ValueError(f"fault kind must be one of {get_args(FaultKind)}, not {kind!r}")
    if kind == "status" and (status is None or not 400 <= status <= 599):
        raise ValueError(f"a status fault needs an error status (400-599), not {status!r}")
    if kind == "raw" and (status is None or not 100 <= status <= 599):
        raise ValueError(f"a raw fault needs a status (100-599), not {status!r}")
    if kind != "raw" and (body or headers):
        raise ValueError("only a raw fault takes a body and headers")
    if kind == "trickle" and seconds <= 0:
        raise ValueError("a trickle fault needs seconds between bytes")
    if kind == "job_stuck":
        if operation not in (None, JOB_OPERATION):
            raise ValueError(f"job_stuck applies only to {JOB_OPERATION}")
        operation = JOB_OPERATION
    if operation is not None and operation not in openapi.operations():
        raise ValueError(f"unknown operation {operation!r}")
    if count < 1 or retry_after < 0 or seconds < 0:
        raise ValueError("count must be positive, retry_after and seconds not negative")
    return Fault(
        kind,
        operation,
        count,
        status=status or 0,
        retry_after=retry_after,
        seconds=seconds,
        after=after,
        pointer=pointer,
        body_contains=body_contains.encode() if body_contains else None,
        body=body.encode() if isinstance(body, str) else body,
        headers={str(name): str(value) for name, value in (headers or {}).items()},
    )


class FaultQueue:
    """The faults waiting for their requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def take(self, operation_id: str, body: bytes) -> Fault | None:
        """The fault this request suffers, if any, using up one of its count."""
        with self._lock:
            for fault in self._faults:
                if fault.operation in (None, operation_id) and (
                    fault.body_contains is None or fault.body_contains in body
                ):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
            return None

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
