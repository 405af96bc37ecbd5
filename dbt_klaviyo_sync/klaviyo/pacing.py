"""Pace requests per endpoint within Klaviyo's burst and steady limits.

Klaviyo limits each operation per account with a burst window (per second) and a steady
window (per minute). We keep a sliding log of send times per operation: a sliding window
never exceeds a fixed window of the same length, wherever the server aligns it. A
`Retry-After` blocks the operation until it has passed, for every thread, and the
`RateLimit-*` headers on successful answers pull us back when the server counts more
requests than we do (another process on the same account, say).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from dbt_klaviyo_sync.klaviyo.openapi import Operation

# A little slack on each window absorbs network jitter between our clock and the server's.
_BURST_WINDOW = 1.05
_STEADY_WINDOW = 60.5


@dataclass
class _Window:
    limit: int
    seconds: float
    sent: deque[float] = field(default_factory=deque)

    def wait(self, now: float) -> float:
        while self.sent and self.sent[0] <= now - self.seconds:
            self.sent.popleft()
        return 0.0 if len(self.sent) < self.limit else self.sent[0] + self.seconds - now


class EndpointPacer:
    """The pace of one operation; thread-safe."""

    def __init__(self, burst: int, steady: int) -> None:
        self._windows = (_Window(burst, _BURST_WINDOW), _Window(steady, _STEADY_WINDOW))
        self._blocked_until = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Wait for a free slot and take it; returns the seconds spent waiting."""
        waited = 0.0
        while True:
            with self._lock:
                now = time.monotonic()
                delay = max(self._blocked_until - now, *(w.wait(now) for w in self._windows))
                if delay <= 0:
                    for window in self._windows:
                        window.sent.append(now)
                    return waited
            time.sleep(delay)
            waited += delay

    def block(self, seconds: float) -> None:
        """No request before `seconds` from now (a Retry-After, or an exhausted window)."""
        with self._lock:
            self._blocked_until = max(self._blocked_until, time.monotonic() + seconds)


class Pacer:
    """One `EndpointPacer` per operation, seeded with the documented limits."""

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._pacers: dict[str, EndpointPacer] = {}
        self._lock = threading.Lock()

    def endpoint(self, op: Operation) -> EndpointPacer:
        with self._lock:
            pacer = self._pacers.get(op.operation_id)
            if pacer is None:
                limits = (
                    (op.burst_per_second, op.steady_per_minute) if self._enabled else (10**9, 10**9)
                )
                pacer = self._pacers[op.operation_id] = EndpointPacer(*limits)
            return pacer
