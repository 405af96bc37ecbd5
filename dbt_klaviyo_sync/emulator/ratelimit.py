"""Klaviyo's rate limits: a burst window (1 s) and a steady window (60 s) per operation.

Both are fixed windows that open with the first request after the previous window ended.
Each account has its own limiter, as each Klaviyo account has its own limits. The limits
default to each operation's documented `x-klaviyo-ratelimit`, scaled by a factor, and can
be overridden per operation.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

from dbt_klaviyo_sync.klaviyo.openapi import Operation

BURST_SECONDS = 1.0
STEADY_SECONDS = 60.0


@dataclass
class _Window:
    seconds: float
    limit: int
    opened: float = -math.inf
    used: int = 0

    def roll(self, now: float) -> None:
        if now - self.opened >= self.seconds:
            self.opened, self.used = now, 0

    def full(self) -> bool:
        return self.used >= self.limit

    def left(self, now: float) -> float:
        """Seconds until this window closes, never more than its length: `opened + seconds
        - now` can round to a hair over it, and a 60 s window then says 61."""
        return self.seconds - (now - self.opened)


@dataclass(frozen=True)
class Decision:
    """The limiter's answer: allowed (with the steady window's headers) or a Retry-After."""

    allowed: bool
    retry_after: int = 0
    limit: int = 0
    remaining: int = 0
    reset: int = 0

    def headers(self) -> dict[str, str]:
        """`RateLimit-*` for an allowed request; DOCS-RL: not sent with a 429."""
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
        }


class RateLimiter:
    """Fixed windows per operation, plus the Retry-After each operation was last told."""

    def __init__(self, scale: float | None, clock: Callable[[], float]) -> None:
        """`scale` multiplies the documented limits; None disables rate limiting, except for
        operations given an `override`. `clock` gives the time in seconds."""
        self._scale = scale
        self._clock = clock
        self._lock = threading.Lock()
        self._overrides: dict[str, tuple[int | None, int | None]] = {}
        self._clear()

    def _clear(self) -> None:
        self._windows: dict[str, tuple[_Window, _Window]] = {}
        self._retry_at: dict[str, float] = {}

    def reset(self) -> None:
        """Forget the windows, the Retry-After deadlines and the overrides."""
        with self._lock:
            self._clear()
            self._overrides.clear()

    def override(self, operation_id: str, burst: int | None, steady: int | None) -> None:
        """Replace an operation's limits (None keeps the scaled documented one)."""
        with self._lock:
            self._overrides[operation_id] = (burst, steady)
            self._windows.pop(operation_id, None)

    def acquire(self, operation: Operation) -> Decision | None:
        """Count one request against both windows, or refuse it. None when not limited."""
        with self._lock:
            if self._scale is None and operation.operation_id not in self._overrides:
                return None
            now = self._clock()
            burst, steady = self._windows_for(operation)
            burst.roll(now)
            steady.roll(now)
            full = [window for window in (burst, steady) if window.full()]
            if full:
                wait = max(window.left(now) for window in full)
                return Decision(allowed=False, retry_after=max(1, math.ceil(wait)))
            burst.used += 1
            steady.used += 1
            return Decision(
                allowed=True,
                limit=steady.limit,
                remaining=steady.limit - steady.used,
                reset=max(0, math.ceil(steady.left(now))),
            )

    def told_to_wait(self, operation_id: str, seconds: int) -> None:
        """A 429 with `Retry-After: seconds` was just sent for this operation."""
        with self._lock:
            deadline = self._clock() + seconds
            self._retry_at[operation_id] = max(deadline, self._retry_at.get(operation_id, 0.0))

    def arrived_early(self, operation_id: str) -> bool:
        """Whether a request comes before the Retry-After last sent for its operation."""
        with self._lock:
            return self._clock() < self._retry_at.get(operation_id, -math.inf)

    def _windows_for(self, operation: Operation) -> tuple[_Window, _Window]:
        found = self._windows.get(operation.operation_id)
        if found is None:
            burst, steady = self._overrides.get(operation.operation_id, (None, None))
            found = (
                _Window(BURST_SECONDS, self._limit(burst, operation.burst_per_second)),
                _Window(STEADY_SECONDS, self._limit(steady, operation.steady_per_minute)),
            )
            self._windows[operation.operation_id] = found
        return found

    def _limit(self, override: int | None, documented: int) -> int:
        if override is not None:
            return override
        return max(1, math.floor(documented * (self._scale or 1.0)))
