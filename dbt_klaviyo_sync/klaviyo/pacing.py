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
with scaled limits). Until an endpoint's first answer, its requests go one at a time, so
that several do not reach an account with lower limits at once. Every answer's
`RateLimit-Limit` gives the account's steady limit, and the burst is scaled with it; a 429
while our count said there was room halves the burst. So the pace adapts to the account
instead of sleeping a fixed time.

Waiting is bounded three ways. A place is taken, or the time until one frees up is worked
out, from one reading of the clock under the lock, so no window can empty between the two
and leave a thread waiting for a wake-up that never comes. Even a wait for another
request's answer looks again every `RECHECK_SECONDS`. And each call carries a `WaitBudget`
(the client's `max_wait`): a wait that would go beyond it raises `WaitTooLong` at once,
instead of sleeping through a `Retry-After: 86400`.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from dbt_klaviyo_sync.clock import Clock, RealClock
from dbt_klaviyo_sync.errors import Interrupted, TransientApiError
from dbt_klaviyo_sync.klaviyo.openapi import Operation

#: How long after it was sent a request is taken to reach Klaviyo, until a 429 says otherwise.
ARRIVAL_MARGIN = 0.05
#: The longest a request waits for other requests' answers before it looks at the windows
#: again. An answer wakes it at once; this bounds the wait should a wake-up be missed.
RECHECK_SECONDS = 1.0
#: The shortest wait, so a fake clock never spins on a wait too small to move it.
_MIN_WAIT = 0.001


class WaitTooLong(TransientApiError):
    """Waiting for the rate limit would take the call beyond its `max_wait`: its records
    are left for the next run rather than held for longer than the user allowed."""


@dataclass
class WaitBudget:
    """How long one call may wait for rate limits in all (`max_wait`), and has waited."""

    seconds: float
    spent: float = 0.0

    @property
    def left(self) -> float:
        return self.seconds - self.spent

    def exceeded(self, wait: float, asked: bool) -> WaitTooLong:
        """The error for a wait longer than is left (infinite: for answers that did not
        come in time); `asked`: Klaviyo asked for it (a Retry-After)."""
        if wait == math.inf:
            return WaitTooLong(
                f"the rate limit had no room within --max-wait ({self.seconds:g} s); "
                "sent again next run"
            )
        already = f" after {self.spent:.0f} s of waiting" if self.spent >= 1 else ""
        why = "Klaviyo asked to wait" if asked else "the rate limit has no room for"
        return WaitTooLong(
            f"{why} {wait:.0f} s{already}, more than --max-wait ({self.seconds:g} s) "
            "allows; sent again next run"
        )


class WaitMeter:
    """Seconds during which at least one request waited for a rate limit, so that four
    threads waiting the same second count one second, not four; and how long the requests
    waiting now have left to wait."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._until: dict[object, float] = {}  # each waiting request: when it may go
        self._since = 0.0
        self._total = 0.0

    @contextmanager
    def waiting(self) -> Iterator[Callable[[float], None]]:
        """Count a request's wait; it says, each time it works it out, how many seconds
        it has left (infinity: until answers to other requests come, any moment)."""
        request = object()

        def left(seconds: float) -> None:
            with self._lock:
                now = self._clock.now()
                self._until[request] = now if seconds == math.inf else now + seconds

        with self._lock:
            now = self._clock.now()
            if not self._until:
                self._since = now
            self._until[request] = now
        try:
            yield left
        finally:
            with self._lock:
                del self._until[request]
                if not self._until:
                    self._total += self._clock.now() - self._since

    def quiet_for(self) -> float:
        """Seconds before any request now waiting may go: 0 when none waits."""
        with self._lock:
            if not self._until:
                return 0.0
            return max(0.0, min(self._until.values()) - self._clock.now())

    @property
    def seconds(self) -> float:
        with self._lock:
            ongoing = self._clock.now() - self._since if self._until else 0.0
            return self._total + ongoing


@dataclass
class _Window:
    limit: int
    seconds: float
    counted: deque[float] = field(default_factory=deque)  # when requests counted, oldest first
    in_flight: int = 0

    def wait(self, now: float) -> float:
        """0 when a request may go at `now`; else seconds to wait (more than 0), or infinity
        when only answers to requests in flight can make room."""
        # One expression decides both expiry and the wait, so a full window never reports
        # a wait of 0 through rounding.
        while self.counted and self.counted[0] + self.seconds <= now:
            self.counted.popleft()
        if len(self.counted) + self.in_flight < self.limit:
            return 0.0
        return self.counted[0] + self.seconds - now if self.counted else math.inf


class EndpointPacer:
    """The pace of one operation; thread-safe."""

    def __init__(
        self,
        burst: int,
        steady: int,
        meter: WaitMeter | None = None,
        clock: Clock | None = None,
        *,
        heard: bool = True,
    ) -> None:
        self._clock = clock or RealClock()
        # Until an answer has come (`heard`), one request at a time: the limits are the
        # documented ones, and an account's may be lower (its first answer says).
        self._heard = heard
        self._meter = meter or WaitMeter(self._clock)
        self._documented = (burst, steady)
        self._windows = (_Window(burst, 1.0), _Window(steady, 60.0))
        self._blocked_until = -math.inf
        self._cautious = False  # count requests from their answers (after a surprise 429)
        self._stopped = False
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

    def heard(self) -> None:
        """An answer came: what it says of the account's limits is taken (before its
        request's place is given up), so requests no longer go one at a time."""
        with self._changed:
            self._heard = True

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

    def block(self, seconds: float) -> None:
        """No request before `seconds` from now (a Retry-After, or an exhausted window)."""
        with self._changed:
            self._blocked_until = max(self._blocked_until, self._clock.now() + seconds)

    def stop(self) -> None:
        """Wake every waiting request with `Interrupted`; refuse places from now on."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    @contextmanager
    def slot(self, budget: WaitBudget | None = None) -> Iterator[None]:
        """Hold a place in the windows for one request, waiting for one if need be, within
        `budget` (`WaitTooLong` beyond it); `Interrupted` once stopped."""
        self._acquire(budget or WaitBudget(math.inf))
        sent = self._clock.now()
        try:
            yield
        finally:
            with self._changed:
                now = self._clock.now()
                counted = now if self._cautious else min(now, sent + ARRIVAL_MARGIN)
                for window in self._windows:
                    window.in_flight -= 1
                    bisect.insort(window.counted, counted)
                self._changed.notify_all()

    def _acquire(self, budget: WaitBudget) -> None:
        with self._changed:
            now = self._clock.now()
            wait = self._take(now)
            if not wait:
                return
            with self._meter.waiting() as left:
                while wait:
                    left(wait)
                    # Answers in flight may make room any moment: wait for them while any
                    # budget is left; any other wait is known, and refused if too long.
                    patient = wait == math.inf and budget.left > 0
                    if wait > budget.left and not patient:
                        raise budget.exceeded(wait, asked=self._blocked_until > now)
                    self._clock.wait(
                        self._changed, max(_MIN_WAIT, min(wait, RECHECK_SECONDS, budget.left))
                    )
                    waited_from, now = now, self._clock.now()
                    budget.spent += now - waited_from
                    wait = self._take(now)

    def _take(self, now: float) -> float:
        """Take a place in both windows if they have room at `now` and return 0; else the
        seconds until one may free up (infinity: when an answer comes back). The lock is
        held, and `now` is the only reading of the clock, so the answer is consistent."""
        if self._stopped:
            raise Interrupted("the run is stopping")
        if self._blocked_until > now:
            return self._blocked_until - now
        if not self._heard and self._windows[0].in_flight:
            return math.inf
        wait = max(window.wait(now) for window in self._windows)
        if not wait:
            for window in self._windows:
                window.in_flight += 1
        return wait


class Pacer:
    """One `EndpointPacer` per operation, seeded with the documented limits."""

    def __init__(self, enabled: bool = True, clock: Clock | None = None) -> None:
        self._enabled = enabled
        self._clock = clock or RealClock()
        self.waits = WaitMeter(self._clock)
        self._pacers: dict[str, EndpointPacer] = {}
        self._stopped = False
        self._lock = threading.Lock()

    def endpoint(self, op: Operation) -> EndpointPacer:
        with self._lock:
            pacer = self._pacers.get(op.operation_id)
            if pacer is None:
                if self._enabled:
                    limits = (op.burst_per_second, op.steady_per_minute)
                else:
                    limits = (10**9, 10**9)
                pacer = EndpointPacer(*limits, self.waits, self._clock, heard=not self._enabled)
                if self._stopped:
                    pacer.stop()
                self._pacers[op.operation_id] = pacer
            return pacer

    def stop(self) -> None:
        """Wake every request waiting for a place, with `Interrupted`."""
        with self._lock:
            self._stopped = True
            pacers = list(self._pacers.values())
        for pacer in pacers:
            pacer.stop()
