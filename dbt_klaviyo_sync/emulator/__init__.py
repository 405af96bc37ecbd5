"""A stand-in for Klaviyo's REST API on loopback, faithful to its documented behaviour.

Requests are validated against the bundled OpenAPI spec; profiles, lists, bulk import jobs,
events and profile deletions follow Klaviyo's semantics, in one or more accounts that each
request's key picks; per-account rate limits, faults, a request log and an injectable clock
are there for tests.
"""

from .server import Emulator, serve

__all__ = ["Emulator", "serve"]
