"""What the emulator saw: counters for assertions, and a request log safe to print.

The log keeps method, path, query, operation and status only. Headers are never recorded,
so the Authorization key cannot leak; `company_id` (the public key) is redacted from queries.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict, get_args
from urllib.parse import urlencode

from werkzeug.datastructures import MultiDict

REDACTED = "[redacted]"
_SECRET_PARAMETERS = frozenset({"company_id"})

Counted = Literal[
    "writes",  # POST, PATCH and DELETE requests that reached the account
    "throttled",  # 429s sent, by the rate limiter or by an injected fault
    "retry_after_violations",  # requests sent before the Retry-After of their operation
    "spec_violations",  # requests refused by OpenAPI validation
    "auth_failures",  # wrong or missing keys
]


class LogEntry(TypedDict):
    time: str
    method: str
    path: str
    operation_id: str | None
    status: int | None  # None: the connection was dropped without an answer


class Telemetry:
    def __init__(self, clock: Callable[[], float]) -> None:
        """`clock` gives seconds since the epoch, for the time of each log entry."""
        self._clock = clock
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._by_operation: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._log: list[LogEntry] = []

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def request(self, operation_id: str) -> None:
        with self._lock:
            self._by_operation[operation_id] += 1

    def count(self, name: Counted) -> None:
        with self._lock:
            self._counts[name] += 1

    def log(
        self,
        method: str,
        path: str,
        query: MultiDict[str, str],
        operation_id: str | None,
        status: int | None,
    ) -> None:
        safe = [
            (name, REDACTED if name in _SECRET_PARAMETERS else value)
            for name, value in query.items(multi=True)
        ]
        entry: LogEntry = {
            "time": datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds"),
            "method": method,
            "path": f"{path}?{urlencode(safe)}" if safe else path,
            "operation_id": operation_id,
            "status": status,
        }
        with self._lock:
            self._log.append(entry)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests_by_operation": dict(self._by_operation),
                **{name: self._counts[name] for name in get_args(Counted)},
            }

    def entries(self) -> list[LogEntry]:
        with self._lock:
            return list(self._log)
