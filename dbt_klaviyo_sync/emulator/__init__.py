"""A stand-in for Klaviyo's REST API on loopback, faithful to its documented behaviour.

Requests are validated against the bundled OpenAPI spec; profiles, lists, bulk import jobs,
events and profile deletions follow Klaviyo's semantics, in one or more accounts that each
request's key picks; per-account rate limits, faults, a request log and an injectable clock
are there for tests.

The server loads when it is first named, so that the CLI, which registers the `emulator`
command from .command, does not load it for every other command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import Emulator, serve

__all__ = ["Emulator", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
