"""Time as the Klaviyo client sees it, injectable so that tests never sleep.

Everything in the client that waits (the pacer, retry backoff, a Retry-After, polling a
bulk job through `KlaviyoClient.sleep`) reads and waits on a `Clock` instead of `time`.
`RealClock` is the process's monotonic clock. `FakeClock` moves only when a test moves it,
so a test of "wait 2 s, then send" asserts what happened, not how long it took, and passes
on a machine of any speed. (The per-request network deadline is the exception: it guards
real sockets, so it runs on real time.)
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

#: The longest a `FakeClock` waiter sleeps in real time between two looks at the fake
#: time: a safety net only, since `advance` wakes waiters at once.
_FAKE_SAFETY_SECONDS = 60.0


class Clock(Protocol):
    """Monotonic seconds, and a timed wait on a condition, on one clock."""

    def now(self) -> float:
        """Seconds since an arbitrary origin; never goes back."""
        ...

    def wait(self, condition: threading.Condition, timeout: float) -> None:
        """Wait on `condition`, which the caller holds, until it is notified or `timeout`
        seconds of this clock have passed. It may return early: callers look again."""
        ...


class RealClock:
    """The process's monotonic clock."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, condition: threading.Condition, timeout: float) -> None:
        condition.wait(max(0.0, timeout))


class FakeClock:
    """A clock for tests: time stands still until `advance` moves it, from any thread.

    With `autojump`, a wait instead moves time on to its own end and returns at once: for
    a single thread whose waits are all the test wants to skip. (With several threads,
    each jump moves every thread's time, so use `advance` there.)
    """

    def __init__(self, start: float = 0.0, *, autojump: bool = False) -> None:
        self._now = start
        self._autojump = autojump
        self._lock = threading.Lock()
        self._waiters: list[tuple[float, threading.Condition]] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    @property
    def pending(self) -> list[float]:
        """When the waits now in progress end, soonest first: a test advances once the
        threads it expects to wait do."""
        with self._lock:
            return sorted(end for end, _ in self._waiters)

    def advance(self, seconds: float) -> None:
        """Move time on by `seconds` and wake every waiter whose wait has then ended."""
        with self._lock:
            self._now += seconds
            due = {id(c): c for end, c in self._waiters if end <= self._now}
        # Notified outside our lock: a waiter holds its condition while it takes ours.
        for condition in due.values():
            with condition:
                condition.notify_all()

    def wait(self, condition: threading.Condition, timeout: float) -> None:
        with self._lock:
            end = self._now + timeout
            if timeout <= 0 or self._autojump:
                self._now = max(self._now, end)
                return
            waiter = (end, condition)
            self._waiters.append(waiter)
        try:
            condition.wait(_FAKE_SAFETY_SECONDS)
        finally:
            with self._lock:
                self._waiters.remove(waiter)
