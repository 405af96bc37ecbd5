"""A total deadline for each HTTP attempt: connection, request, headers and body together.

`requests` applies its read timeout to each socket read, so a server that trickles one
byte a second keeps a request alive for ever. Here an attempt runs inside `deadline(s)`;
the connection it uses (a urllib3 connection subclass that `DeadlineAdapter` mounts) hands
its socket to that deadline when it connects or sends; one watchdog thread shuts the
socket down once the deadline passes, which ends the blocked read at once with an error,
and the caller sees `Deadline.expired`. The watchdog runs on real time (time.monotonic):
it guards real sockets, whatever clock the caller waits on.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

#: The longest the watchdog sleeps with nothing to watch, before it looks again.
_IDLE_SECONDS = 60.0


class Deadline:
    """The end of one attempt, and the socket it is using."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._finished = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket) -> None:
        """The attempt uses `sock` from now on; past the deadline, it ends at once."""
        with self._lock:
            self._sock = sock
            if self.expired:
                _shut(sock)

    def expire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.expired = True
            if self._sock is not None:
                _shut(self._sock)

    def finish(self) -> None:
        """The attempt is over: its socket may serve another attempt, so leave it alone."""
        with self._lock:
            self._finished = True
            self._sock = None


def _shut(sock: socket.socket) -> None:
    """Shut the socket down under whatever reads it (TLS included: the plain socket's
    method, so the TLS object the reader holds is left as it is)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watchdog:
    """One daemon thread for the process, expiring deadlines in the order they fall."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: Deadline) -> None:
        with self._changed:
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="klaviyo-deadlines", daemon=True
                )
                self._thread.start()
            self._changed.notify()

    def _run(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    heapq.heappop(self._heap)[2].expire()
                self._changed.wait(self._heap[0][0] - now if self._heap else _IDLE_SECONDS)


_WATCHDOG = _Watchdog()
_current = threading.local()  # the Deadline of the attempt running on this thread, if any


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[Deadline]:
    """Run one attempt on this thread within `seconds`, all of it."""
    limit = Deadline(seconds)
    _WATCHDOG.watch(limit)
    _current.deadline = limit
    try:
        yield limit
    finally:
        _current.deadline = None
        limit.finish()


def _attach(sock: socket.socket | None) -> None:
    limit: Deadline | None = getattr(_current, "deadline", None)
    if limit is not None and sock is not None:
        limit.attach(sock)


class _WatchedHTTPConnection(HTTPConnection):
    """Hands its socket to this thread's deadline: when it connects, and when a kept-alive
    connection sends its next request."""

    def connect(self) -> None:
        super().connect()
        _attach(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self.sock)
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(_WatchedHTTPConnection, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class DeadlineAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections obey `deadline`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS brings pools of its own
            manager.pool_classes_by_scheme = _POOLS
        return manager
