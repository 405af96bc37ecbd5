"""Pace requests per endpoint within Klaviyo's burst and steady limits.

Klaviyo limits each operation per account with a burst window (per second) and a steady
window (per minute), counting requests when they arrive. We cannot see arrival times, but
each one lies between our send and our receipt of the answer. A request counts in a window
from the moment it is sent until a full window after it arrived, taken to be 50 ms after it
was sent. Should Klaviyo refuse one all the same (it counted a request later than that),
the endpoint turns cautious for the rest of the run: a request then counts until a full
window after its answer came back, so that however late the previous requests arrived, at
most the limit can land in any window. (Cautious from the start, a sync bound by a 1-a-second
burst would lose a round trip every second.) A `Retry-After` blocks the operation for every
thread until it has passed.

The documented limits are only a starting point: accounts differ (and so does an emulator
with scaled limits). Every answer's `RateLimit-Limit` gives the account's steady limit,
and the burst is scaled with it; a 429 while our count said there was room halves the
burst. So the pace adapts to the account instead of sleeping a fixed time.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from dbt_klaviyo_sync.klaviyo.openapi import Operation

#: How long after it was sent a request is taken to reach Klaviyo, until a 429 says otherwise.
ARRIVAL_MARGIN = 0.05


class WaitClock:
    """Wall-clock seconds during which at least one request waited for a rate limit, so
    that four threads waiting the same second count one second, not four."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting = 0
        self._since = 0.0
        self._total = 0.0

    @contextmanager
    def waiting(self) -> Iterator[None]:
        with self._lock:
            if self._waiting == 0:
                self._since = time.monotonic()
            self._waiting += 1
        try:
            yield
        finally:
            with self._lock:
                self._waiting -= 1
                if self._waiting == 0:
                    self._total += time.monotonic() - self._since

    @property
    def seconds(self) -> float:
        with self._lock:
            ongoing = time.monotonic() - self._since if self._waiting else 0.0
            return self._total + ongoing


@dataclass
class _Window:
    limit: int
    seconds: float
    counted: deque[float] = field(default_factory=deque)  # when requests counted, oldest first
    in_flight: int = 0

    def wait(self, now: float) -> float | None:
        """0 when a request may go now; else seconds to wait, or None to wait for an answer."""
        while self.counted and self.counted[0] <= now - self.seconds:
            self.counted.popleft()
        if len(self.counted) + self.in_flight < self.limit:
            return 0.0
        return self.counted[0] + self.seconds - now if self.counted else None


class EndpointPacer:
    """The pace of one operation; thread-safe."""

    def __init__(self, burst: int, steady: int, clock: WaitClock | None = None) -> None:
        self._clock = clock or WaitClock()
        self._documented = (burst, steady)
        self._windows = (_Window(burst, 1.0), _Window(steady, 60.0))
        self._blocked_until = 0.0
        self._cautious = False  # count requests from their answers (after a surprise 429)
        self._changed = threading.Condition()

    @property
    def limits(self) -> tuple[int, int]:
        """The burst and steady limits now kept to."""
        return self._windows[0].limit, self._windows[1].limit

    def learn_steady_limit(self, advertised: int) -> None:
        """The account's steady limit, from a `RateLimit-Limit` header; the burst follows
        in the documented proportion."""
        burst, steady = self._windows
        if advertised < 1 or advertised == steady.limit:
            return
        documented_burst, documented_steady = self._documented
        with self._changed:
            steady.limit = advertised
            burst.limit = max(1, documented_burst * advertised // documented_steady)
            self._changed.notify_all()

    def refused(self) -> None:
        """A 429. The first turns the endpoint cautious: Klaviyo counted a request later
        than we took it to. After that, when our steady count had room, the burst we
        assumed was too high."""
        burst, steady = self._windows
        with self._changed:
            if not self._cautious:
                self._cautious = True
            elif len(steady.counted) + steady.in_flight <= steady.limit:
                burst.limit = max(1, burst.limit // 2)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold a place in the windows for one request, waiting for one if need be."""
        self._acquire()
        sent = time.monotonic()
        try:
            yield
        finally:
            with self._changed:
                now = time.monotonic()
                counted = now if self._cautious else min(now, sent + ARRIVAL_MARGIN)
                for window in self._windows:
                    window.in_flight -= 1
                    bisect.insort(window.counted, counted)
                self._changed.notify_all()

    def _acquire(self) -> None:
        with self._changed:
            if self._take():
                return
            with self._clock.waiting():
                while not self._take():
                    now = time.monotonic()
                    waits = [w.wait(now) for w in self._windows]
                    blocked = self._blocked_until - now
                    known = [w for w in waits if w] + ([blocked] if blocked > 0 else [])
                    # With only answers to wait for, a release wakes us; else sleep until due.
                    self._changed.wait(max(known) if known else None)

    def _take(self) -> bool:
        """Take a place in both windows if they have room now (the lock is held)."""
        now = time.monotonic()
        if self._blocked_until > now or any(w.wait(now) != 0 for w in self._windows):
            return False
        for window in self._windows:
            window.in_flight += 1
        return True

    def block(self, seconds: float) -> None:
        """No request before `seconds` from now (a Retry-After, or an exhausted window)."""
        with self._changed:
            self._blocked_until = max(self._blocked_until, time.monotonic() + seconds)


class Pacer:
    """One `EndpointPacer` per operation, seeded with the documented limits."""

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self.clock = WaitClock()
        self._pacers: dict[str, EndpointPacer] = {}
        self._lock = threading.Lock()

    def endpoint(self, op: Operation) -> EndpointPacer:
        with self._lock:
            pacer = self._pacers.get(op.operation_id)
            if pacer is None:
                if self._enabled:
                    limits = (op.burst_per_second, op.steady_per_minute)
                else:
                    limits = (10**9, 10**9)
                pacer = self._pacers[op.operation_id] = EndpointPacer(*limits, self.clock)
            return pacer
