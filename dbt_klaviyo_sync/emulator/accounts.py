"""The accounts one emulator hosts, each with its own keys, data and rate limits.

A Klaviyo private key belongs to exactly one account, and limits are per account; so the
key a request carries (`company_id`, on client endpoints) picks the account it acts on, and
a test can point a sync at a second account on the same URL.

The first account may accept any key, as the emulator always did when no key was given:
it then gets every request whose key names no other account. An account's id and its
made-up public key derive from its private key, so the same key reaches the same account
after the emulator restarts, as a real key does.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .ratelimit import RateLimiter
from .store import Account, Identity, derived_id


@dataclass(frozen=True)
class Hosted:
    """One account as the server serves it: its data and its own rate limits."""

    account: Account
    limiter: RateLimiter

    @property
    def id(self) -> str:
        return self.account.identity.id


class Accounts:
    """The hosted accounts in the order they were added; the first is the default."""

    def __init__(
        self,
        *,
        job_seconds: float,
        clock: Callable[[], float],
        sink: bool,
        rate_scale: float | None,
    ) -> None:
        self._job_seconds = job_seconds
        self._clock = clock
        self._sink = sink
        self._rate_scale = rate_scale
        self._lock = threading.Lock()
        # Replaced whole on `add`, so readers need no lock: a request sees all or nothing.
        self._hosted: tuple[Hosted, ...] = ()

    def add(
        self, private_key: str | None, public_key: str | None = None, name: str | None = None
    ) -> Hosted:
        """A new, empty account reached by these keys; ValueError if another has one of them.

        A None key accepts any key that names no other account, which only the first account
        may do. A later account without a public key gets one made up, shown by
        GET /api/accounts.
        """
        if private_key is not None and not private_key.strip():
            raise ValueError("a private key must not be empty")
        if public_key is not None and not public_key.strip():
            raise ValueError("a public key must not be empty")
        seed = private_key or ""
        account_id = derived_id("account:" + seed)
        with self._lock:
            if self._hosted and private_key is None:
                raise ValueError("only the first account may accept any private key")
            identity = Identity(
                id=account_id,
                name=name or f"Emulated account {account_id}",
                public_api_key=public_key or derived_id("public:" + seed),
                private_key=private_key,
                any_public_key=public_key is None and not self._hosted,
            )
            for other in self._hosted:
                _check_distinct(identity, other.account.identity)
            hosted = Hosted(
                Account(identity, self._job_seconds, self._clock, sink=self._sink),
                RateLimiter(self._rate_scale, self._clock),
            )
            self._hosted = (*self._hosted, hosted)
            return hosted

    def get(self, account_id: str | None = None) -> Hosted:
        """The account with this id; None: the first. ValueError naming the ids if unknown."""
        hosted = self._hosted
        if account_id is None:
            return hosted[0]
        for each in hosted:
            if each.id == account_id:
                return each
        raise ValueError(f"no account {account_id!r}; the accounts are {[h.id for h in hosted]}")

    def by_private_key(self, key: str) -> Hosted | None:
        """The account a private key reaches, if any."""
        return self._reached(key, lambda identity: identity.private_key is None, private=True)

    def by_public_key(self, company_id: str) -> Hosted | None:
        """The account a client request's `company_id` reaches, if any."""
        return self._reached(company_id, lambda identity: identity.any_public_key, private=False)

    def _reached(
        self, given: str, accepts_any: Callable[[Identity], bool], *, private: bool
    ) -> Hosted | None:
        """The account whose own key `given` is, else the one accepting any key, if any."""
        hosted = self._hosted
        for each in hosted:
            identity = each.account.identity
            own = identity.private_key if private else identity.public_api_key
            if own is not None and _same(given, own):
                return each
        return next((each for each in hosted if accepts_any(each.account.identity)), None)

    def __iter__(self) -> Iterator[Hosted]:
        return iter(self._hosted)

    def reset(self) -> None:
        """Empty every account and forget its rate-limit windows; the accounts stay."""
        for hosted in self._hosted:
            hosted.account.reset()
            hosted.limiter.reset()


def _check_distinct(new: Identity, old: Identity) -> None:
    """Refuse an account that another one would shadow, without ever naming the key."""
    if new.id == old.id:  # ids derive from private keys
        raise ValueError(f"account {old.id} already has this private key, or one of its id")
    if _same(new.public_api_key, old.public_api_key):
        raise ValueError(f"account {old.id} already has this public key")


def _same(given: str, expected: str) -> bool:
    return secrets.compare_digest(given.encode(), expected.encode())
