"""`read_ahead`: a generator run on a thread of its own, ahead of its consumer."""

from __future__ import annotations

import threading
from collections.abc import Generator

import pytest

from dbt_klaviyo_sync.ahead import read_ahead


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
