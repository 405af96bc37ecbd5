"""Work done ahead of its use: `read_ahead`, a generator run on a thread of its own, ahead
of its consumer; and the units a sync journals ahead of its senders."""

from __future__ import annotations

import threading
from collections.abc import Generator
from concurrent import futures
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any
from unittest.mock import Mock

import pytest

from dbt_klaviyo_sync import runner
from dbt_klaviyo_sync.ahead import read_ahead
from dbt_klaviyo_sync.klaviyo.outcomes import Outcome, Unit
from dbt_klaviyo_sync.runner import SyncOptions


def test_items_come_in_order_and_end() -> None:
    with read_ahead((i for i in range(50)), depth=2) as items:
        assert list(items) == list(range(50))


def test_an_error_comes_in_its_turn() -> None:
    def failing() -> Generator[int, None, None]:
        yield 1
        yield 2
        raise ValueError("the warehouse went away")

    seen = []
    with pytest.raises(ValueError, match="went away"), read_ahead(failing(), depth=1) as items:
        for item in items:
            seen.append(item)
    assert seen == [1, 2]


def test_leaving_early_stops_the_thread_and_closes_the_source_on_it() -> None:
    closed_on: list[str] = []

    def endless() -> Generator[int, None, None]:
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed_on.append(threading.current_thread().name)

    with read_ahead(endless(), depth=1) as items:
        assert [next(items) for _ in range(3)] == [0, 1, 2]
    assert closed_on == ["klaviyo-shape"]
    assert not any(t.name == "klaviyo-shape" for t in threading.enumerate())


def test_an_error_in_the_block_stops_the_thread_too() -> None:
    closed = threading.Event()

    def endless() -> Generator[int, None, None]:
        try:
            while True:
                yield 0
        finally:
            closed.set()

    with pytest.raises(KeyError), read_ahead(endless(), depth=1) as items:
        next(items)
        raise KeyError("the consumer failed")
    assert closed.is_set()


def test_depth_zero_runs_the_source_here_and_closes_it() -> None:
    ran_on: list[str] = []

    def source() -> Generator[int, None, None]:
        try:
            ran_on.append(threading.current_thread().name)
            yield 1
            yield 2
        finally:
            ran_on.append(threading.current_thread().name)

    with read_ahead(source(), depth=0) as items:
        assert next(items) == 1
    assert ran_on == [threading.current_thread().name] * 2


class _Held:
    """A sender whose requests all wait until `release` is set, as the rate limit holds
    them; and a warehouse that journals units, commits nothing and says when it is idle."""

    journaled = True

    def __init__(self) -> None:
        self.release = threading.Event()
        self.units: list[str] = []  # journaled, in order
        self.idle_calls = 0

    def send(self, unit: Unit) -> Outcome:
        assert self.release.wait(timeout=20), "never released"
        return Outcome()

    # -- the warehouse --
    commit_records = 10**6
    values_until_commit = False

    def job_recorder(self, sid: str) -> Any:
        return Mock()  # called with each job's id; closed at the end

    def journal(self, sid: str, unit: str, rows: object) -> None:
        self.units.append(unit)

    def commit(self, *args: object) -> None:
        pass

    def idle(self) -> None:
        self.idle_calls += 1
        self.release.set()


def _send(held: _Held, units: int, *, quiet_for: float, concurrency: int = 3) -> None:
    """Send `units` empty units through a model's sync whose client says its requests
    waiting for the rate limit have `quiet_for` seconds left."""
    options = SyncOptions("http://127.0.0.1:1", None, None, concurrency=concurrency)
    spec = SimpleNamespace(model="customers", object="profile", behavior="upsert")
    client = SimpleNamespace(rate_limit_wait=0.0, quiet_for=lambda: quiet_for)
    sync = runner.ModelSync(held, client, spec, SimpleNamespace(sid="s"), options)  # type: ignore[arg-type]
    sync._send_units(held, iter([[] for _ in range(units)]))  # type: ignore[arg-type]


def test_a_sync_journals_units_ahead_while_klaviyo_holds_its_senders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While every sender waits (for Klaviyo's rate limit, say), the sync goes on preparing
    and journaling units, up to `READY_UNITS` beyond those being sent, before it waits for
    an answer: a stall of its own later is then absorbed instead of leaving slots of the
    limit unused. (It used to stop one unit ahead.)"""
    held = _Held()
    first_wait: list[tuple[int, int]] = []

    def watched(fs: set[Future[Outcome]], **kwargs: Any) -> tuple[set[Any], set[Any]]:
        if not first_wait:  # the sync's first wait for an answer: let the senders go
            first_wait.append((len(fs), len(held.units)))
            held.release.set()
        return futures.wait(fs, **kwargs)

    monkeypatch.setattr(runner, "wait", watched)
    _send(held, 60, quiet_for=0.0, concurrency=3)
    ahead = 3 + runner.READY_UNITS
    assert first_wait == [(ahead, ahead)]
    assert len(held.units) == 60


@pytest.mark.parametrize(
    ("quiet_for", "tidied"), [(runner.IDLE_SECONDS + 50, True), (0.9, False), (0.0, False)]
)
def test_the_state_is_tidied_while_the_rate_limit_holds_the_sync_for_a_while(
    quiet_for: float, tidied: bool
) -> None:
    """Waiting for answers while the requests waiting for the rate limit have a while left
    (a full steady window), the sync has the warehouse do its upkeep (`idle`: DuckDB then
    checkpoints its log, not inside a commit while the limit has room). Not while they wait
    out the 1-second burst window, nor when none waits (Klaviyo is working on them)."""
    held = _Held()
    if not tidied:
        threading.Timer(0.5, held.release.set).start()
    _send(held, 10, quiet_for=quiet_for)
    assert bool(held.idle_calls) == tidied
    assert len(held.units) == 10
