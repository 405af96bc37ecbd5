"""The pacer on a fake clock: windows, arrival margin, cautious mode, learned limits, blocks,
wait budgets, stopping, and the lost wake-up that once parked every thread for ever.

No test here sleeps or reads the wall clock: time moves only when a test (or an autojump
clock) moves it, so the assertions are exact and hold on a machine of any speed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack

import pytest

from dbt_klaviyo_sync.clock import FakeClock
from dbt_klaviyo_sync.errors import Interrupted
from dbt_klaviyo_sync.klaviyo.pacing import (
    ARRIVAL_MARGIN,
    RECHECK_SECONDS,
    EndpointPacer,
    WaitBudget,
    WaitMeter,
    WaitTooLong,
    _Window,
)


def until(condition: Callable[[], bool]) -> None:
    """Let other threads reach a state; a generous real bound only guards against a hang."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the other thread"
        time.sleep(0.001)


class InThread:
    """Run `target` on a thread; `result()` joins it (bounded) and re-raises its error."""

    def __init__(self, target: Callable[[], object]) -> None:
        self.value: object = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.value = target()
            except BaseException as error:
                self.error = error

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self) -> object:
        self.thread.join(30)
        assert not self.thread.is_alive(), "the thread is stuck"
        if self.error is not None:
            raise self.error
        return self.value


def send(pacer: EndpointPacer, clock: FakeClock, budget: WaitBudget | None = None) -> float:
    """One request that is answered at once; when it was sent."""
    with pacer.slot(budget):
        return clock.now()


def test_the_pacer_keeps_to_the_burst_limit() -> None:
    clock = FakeClock(autojump=True)
    pacer = EndpointPacer(burst=5, steady=1000, clock=clock)
    sent = [send(pacer, clock) for _ in range(11)]
    # 5 in the first window, 5 in the second, the 11th in the third.
    assert sent == [0.0] * 5 + [1.0] * 5 + [2.0]


def test_the_pacer_keeps_to_the_steady_limit() -> None:
    clock = FakeClock(autojump=True)
    pacer = EndpointPacer(burst=100, steady=3, clock=clock)
    assert [send(pacer, clock) for _ in range(4)] == [0.0, 0.0, 0.0, 60.0]


def test_the_pacer_counts_a_request_from_shortly_after_it_was_sent() -> None:
    """A slow answer does not hold the next request back: Klaviyo counted the request
    when it arrived, soon after it was sent."""
    clock = FakeClock(autojump=True)
    pacer = EndpointPacer(burst=1, steady=1000, clock=clock)
    with pacer.slot():
        clock.advance(0.5)  # a slow answer
    assert send(pacer, clock) == pytest.approx(1.0 + ARRIVAL_MARGIN)


def test_after_a_429_the_pacer_counts_a_request_until_a_window_after_its_answer() -> None:
    """Klaviyo counts a request when it arrives, which may be as late as our receipt of
    the answer: once it has refused one, the next window starts from there."""
    clock = FakeClock(autojump=True)
    pacer = EndpointPacer(burst=1, steady=1000, clock=clock)
    pacer.refused()
    with pacer.slot():
        clock.advance(0.5)  # a slow answer
    assert send(pacer, clock) == pytest.approx(1.5)


def test_requests_in_flight_hold_their_places() -> None:
    clock = FakeClock()
    pacer = EndpointPacer(burst=2, steady=1000, clock=clock)
    with ExitStack() as in_flight:
        in_flight.enter_context(pacer.slot())
        in_flight.enter_context(pacer.slot())
        third = InThread(lambda: send(pacer, clock))
        until(lambda: clock.pending == [RECHECK_SECONDS])  # waiting for an answer
        clock.advance(0.3)
    # Both answered at 0.3, counted from 0.05: the third waits until they are a window old.
    until(lambda: clock.pending == [pytest.approx(1.0 + ARRIVAL_MARGIN)])
    assert third.thread.is_alive()
    clock.advance(0.75)
    assert third.result() == pytest.approx(1.0 + ARRIVAL_MARGIN)


def test_an_endpoints_first_request_goes_alone_until_an_answer_tells_the_limits() -> None:
    """The documented limits may be above the account's, which only an answer's headers
    tell: until one came, requests go one at a time (several at once drew a 429 at the
    start of a sync, and a request already sent when it came violated its Retry-After)."""
    clock = FakeClock()
    pacer = EndpointPacer(burst=10, steady=150, clock=clock, heard=False)
    with pacer.slot():
        second = InThread(lambda: send(pacer, clock))
        until(lambda: clock.pending == [RECHECK_SECONDS])  # waiting for that answer
        pacer.heard()
        pacer.learn_steady_limit(15)  # the account's: 1 a second
    # Answered at once, so counted from 0: the second waits out the burst window.
    until(lambda: clock.pending == [pytest.approx(1.0)])
    clock.advance(1.0)
    assert second.result() == pytest.approx(1.0)
    # Once heard, several go at once within the limits.
    documented = EndpointPacer(burst=10, steady=150, clock=clock, heard=False)
    with documented.slot():
        documented.heard()
    with documented.slot(), documented.slot(), documented.slot():
        assert clock.pending == []


def test_the_pacer_holds_every_caller_until_a_block_passes() -> None:
    clock = FakeClock(autojump=True)
    pacer = EndpointPacer(burst=100, steady=1000, clock=clock)
    pacer.block(0.6)
    assert send(pacer, clock) == pytest.approx(0.6)


def test_rate_limit_waits_are_counted_on_the_clock_not_per_thread() -> None:
    """Two requests waiting the same second count one second, not two."""
    clock = FakeClock()
    meter = WaitMeter(clock)
    with meter.waiting():
        with meter.waiting():
            clock.advance(1.0)
        clock.advance(1.0)
    clock.advance(5.0)  # nobody waiting
    assert meter.seconds == 2.0


def test_the_pacer_reports_its_waits() -> None:
    clock = FakeClock(autojump=True)
    meter = WaitMeter(clock)
    pacer = EndpointPacer(burst=1, steady=1000, meter=meter, clock=clock)
    for _ in range(3):
        send(pacer, clock)
    assert meter.seconds == 2.0


def test_the_meter_says_how_long_the_waiting_requests_have_left() -> None:
    """`quiet_for`: how long before any waiting request may go, the time a sync has for
    upkeep. A request waiting out a full steady window leaves the rest of it; one waiting
    for answers to others may go any moment; none waiting, 0."""
    clock = FakeClock()
    meter = WaitMeter(clock)
    pacer = EndpointPacer(burst=100, steady=2, meter=meter, clock=clock)
    assert meter.quiet_for() == 0.0
    with ExitStack() as in_flight:
        in_flight.enter_context(pacer.slot())
        in_flight.enter_context(pacer.slot())
        waiting = InThread(lambda: send(pacer, clock))
        until(lambda: clock.pending == [RECHECK_SECONDS])  # for the answers in flight
        assert meter.quiet_for() == 0.0
        clock.advance(0.5)
    # Answered, both counted from 0.05: the window is full until 60.05 (looked at again
    # every RECHECK_SECONDS meanwhile).
    until(lambda: clock.pending == [pytest.approx(0.5 + RECHECK_SECONDS)])
    assert meter.quiet_for() == pytest.approx(59.55)
    clock.advance(20.0)
    assert meter.quiet_for() == pytest.approx(39.55)
    clock.advance(40.0)
    assert waiting.result() == pytest.approx(60.5)
    assert meter.quiet_for() == 0.0


def test_the_pacer_takes_the_accounts_limits_from_its_headers() -> None:
    pacer = EndpointPacer(burst=10, steady=150)
    pacer.learn_steady_limit(1500)
    assert pacer.limits == (100, 1500)
    pacer.learn_steady_limit(15)
    assert pacer.limits == (1, 15)


def test_429s_inside_the_steady_limit_make_the_pacer_cautious_then_halve_the_burst() -> None:
    pacer = EndpointPacer(burst=10, steady=150)
    pacer.refused()  # first: count requests from their answers
    assert pacer.limits == (10, 150)
    pacer.refused()
    pacer.refused()
    assert pacer.limits == (2, 150)


class DriftingClock(FakeClock):
    """Once `drifting`, a clock that moves on a little every time it is read, as a real one
    does: the window's oldest request expires between two readings that had to agree."""

    drifting = False

    def now(self) -> float:
        reading = super().now()
        if self.drifting:
            self.advance(0.004)
        return reading


def test_a_window_that_empties_between_two_readings_of_the_clock_still_wakes_the_request() -> None:
    """D2: `_take` failed at one reading, the wait was worked out at a later one where the
    window had emptied, so there was nothing to wait for but an answer, and with nothing
    in flight the request waited for ever. One reading now decides both."""
    clock = DriftingClock(autojump=True)
    pacer = EndpointPacer(burst=1, steady=1000, clock=clock)
    with pacer.slot():
        clock.advance(0.5)  # counted at 0.05: the window has room again at 1.05
    clock.advance(0.54)
    clock.drifting = True  # read at 1.04, 1.044, 1.048 (no room yet), 1.052 (room)
    second = InThread(lambda: send(pacer, clock))
    # Sent as soon as the window had room, not a safety-net recheck later.
    assert second.result() < 1.0 + RECHECK_SECONDS


@pytest.mark.parametrize(
    ("counted", "now"),
    [
        (491.58097634750544, 551.5809763475054),
        (16359.360132900469, 16419.360132900467),
        (0.05, 60.05),
    ],
)
def test_a_full_window_never_reports_a_wait_of_zero(counted: float, now: float) -> None:
    """`counted + 60 - now` can round to 0.0 while `counted <= now - 60` is false: a full
    window then said "no wait", and a request waited for a wake-up that never came."""
    window = _Window(limit=1, seconds=60.0, counted=deque([counted]))
    wait = window.wait(now)
    assert wait > 0 or not window.counted  # a wait, or room because the request expired


def test_a_block_beyond_the_budget_is_refused_at_once() -> None:
    clock = FakeClock(autojump=True)
    pacer = EndpointPacer(burst=100, steady=1000, clock=clock)
    pacer.block(86400)
    with pytest.raises(WaitTooLong, match=r"Klaviyo asked to wait 86400 s, more than --max"):
        send(pacer, clock, WaitBudget(300))
    assert clock.now() == 0.0  # nothing was slept


def test_a_window_wait_beyond_what_is_left_of_the_budget_is_refused() -> None:
    clock = FakeClock(autojump=True)
    pacer = EndpointPacer(burst=100, steady=2, clock=clock)
    budget = WaitBudget(70)
    pacer.block(20)
    send(pacer, clock, budget)
    send(pacer, clock, budget)
    assert budget.spent == 20
    with pytest.raises(WaitTooLong, match="the rate limit has no room for 60 s after 20 s"):
        send(pacer, clock, budget)


def test_a_wait_for_answers_ends_when_the_budget_does() -> None:
    clock = FakeClock(autojump=True)
    pacer = EndpointPacer(burst=1, steady=1000, clock=clock)
    in_flight = pacer.slot()  # never answered within the test
    with in_flight, pytest.raises(WaitTooLong, match=r"no room within --max-wait \(2.5 s\)"):
        send(pacer, clock, WaitBudget(2.5))
    assert clock.now() == 2.5


def test_stopping_wakes_every_waiting_request_and_refuses_new_ones() -> None:
    clock = FakeClock()
    pacer = EndpointPacer(burst=100, steady=1000, clock=clock)
    pacer.block(3600)
    waiting = [InThread(lambda: send(pacer, clock)) for _ in range(2)]
    until(lambda: len(clock.pending) == 2)
    pacer.stop()
    for request in waiting:
        with pytest.raises(Interrupted):
            request.result()
    with pytest.raises(Interrupted):
        send(pacer, clock)
    assert clock.now() == 0.0


def test_the_fake_clock_wakes_a_waiter_when_advanced_past_its_end() -> None:
    clock = FakeClock()
    changed = threading.Condition()

    def wait_two_seconds() -> float:
        with changed:
            while clock.now() < 2.0:
                clock.wait(changed, 2.0 - clock.now())
        return clock.now()

    waiter = InThread(wait_two_seconds)
    until(lambda: clock.pending == [2.0])
    clock.advance(1.5)
    until(lambda: clock.pending == [2.0])
    assert waiter.thread.is_alive()
    clock.advance(0.5)
    assert waiter.result() == 2.0
