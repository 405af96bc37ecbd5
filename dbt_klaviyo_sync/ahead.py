"""Work done ahead of its consumer, on a thread of its own.

A sync shapes each batch of changed rows (Arrow's kernels, the warehouse's read) and then
journals and commits it (DuckDB or the warehouse's driver). Those calls release Python's
GIL, so with the shaping on a thread of its own the two overlap on a second core instead
of taking turns, and a first full sync is bound less by the client's CPU.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from contextlib import closing, contextmanager
from typing import TypeVar

T = TypeVar("T")

#: How long the worker waits for room before it looks again whether it was stopped.
_POLL_SECONDS = 0.1


@contextmanager
def read_ahead(source: Generator[T, None, None], depth: int) -> Iterator[Iterator[T]]:
    """`source`'s items, produced on another thread up to `depth` ahead of their use. When
    the block ends, early or not, the thread stops and `source` is closed on it before
    the block is left, so nothing it reads is in use after; an error it raised is raised
    here, when its turn comes. With `depth` 0, `source` itself, on the caller's thread."""
    if depth == 0:
        with closing(source):
            yield source
        return
    items: queue.Queue[tuple[bool, T | BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, T | BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            with closing(source):
                for item in source:
                    if not put((True, item)):
                        return
        except BaseException as exc:  # handed to the consumer, whatever it is
            put((False, exc))
            return
        put((False, None))

    def consume() -> Iterator[T]:
        while True:
            produced, value = items.get()
            if produced:
                yield value  # type: ignore[misc]
            elif value is None:
                return
            else:
                raise value  # type: ignore[misc]

    worker = threading.Thread(target=run, name="klaviyo-shape", daemon=True)
    worker.start()
    try:
        yield consume()
    finally:
        stop.set()
        worker.join()
