"""One HTTP session to Klaviyo: auth, the pinned revision, pacing, retries, typed errors.

Every request goes through `KlaviyoClient.call`, which waits for the endpoint's pacer,
retries passing failures (5xx, timeouts, dropped connections, unreadable answers) with
exponential backoff and jitter, and turns Klaviyo's answers into values or typed errors:
- 2xx: the parsed JSON body (or None for an empty one); `dig` reads it safely;
- 3xx: `RedirectRefused`: a redirect is never followed (a POST would turn into a GET, or
  its body and key would go wherever the redirect points), so the run stops;
- 401/403: `CredentialsError`, which stops the run;
- 429: pacing, not failure. The call waits as long as `Retry-After` says (never sending
  before), then sends again, without using up an attempt, as long as its waits for rate
  limits stay within `max_wait`; a wait beyond that raises `WaitTooLong` at once;
- other 4xx: `KlaviyoRejected`, carrying Klaviyo's errors, for the caller to reject records;
- anything passing, once retries are exhausted: `TransientApiError`.

Each attempt has a total deadline (the second element of `timeout`): a server that
trickles its answer is cut off when it passes. `stop()` makes every call and every wait
raise `Interrupted`. API keys live only in the session's headers and query; every text that
comes from outside is scrubbed of them at the boundary, and no message we build contains
a header value.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import requests
from tenacity import (
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
)
from tenacity.wait import wait_random_exponential

from dbt_klaviyo_sync.clock import Clock, RealClock
from dbt_klaviyo_sync.errors import (
    ConfigurationError,
    CredentialsError,
    Interrupted,
    RedirectRefused,
    TransientApiError,
    UnexpectedAnswer,
)
from dbt_klaviyo_sync.klaviyo.deadline import DeadlineAdapter, deadline
from dbt_klaviyo_sync.klaviyo.openapi import REVISION, Operation, operation
from dbt_klaviyo_sync.klaviyo.pacing import EndpointPacer, Pacer, WaitBudget, WaitTooLong
from dbt_klaviyo_sync.logs import checked_key, redact

log = logging.getLogger(__name__)

JSON_API = "application/vnd.api+json"
#: After this many requests in a row fail even with retries, Klaviyo is taken to be down:
#: the rest of the run fails fast, leaving its records pending for the next run.
#: (429s, waits beyond `max_wait` and interruptions are not failures of Klaviyo.)
MAX_FAILURES_IN_A_ROW = 3
#: The longest Retry-After we parse, so that absurd ones stay finite numbers.
_LONGEST_RETRY_AFTER = 10.0**9


@dataclass(frozen=True)
class ApiError:
    """One entry of Klaviyo's `errors` array, scrubbed of keys."""

    status: int
    code: str
    detail: str
    pointer: str | None = None
    parameter: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class KlaviyoRejected(Exception):
    """Klaviyo refused the request (a 4xx other than auth and rate limits)."""

    def __init__(self, operation_id: str, status: int, errors: list[ApiError]) -> None:
        self.status = status
        self.errors = errors
        super().__init__(f"{operation_id}: HTTP {status}: {self.detail}")

    @property
    def detail(self) -> str:
        return "; ".join(e.detail for e in self.errors) or f"HTTP {self.status}"


class _RateLimited(TransientApiError):
    """A 429: waited out within the call, never an attempt used up."""


def dig(
    answer: Any,
    *path: str | int,
    operation: str,
    expect: type | tuple[type, ...] | None = None,
) -> Any:
    """`answer[path[0]][path[1]]...`, e.g. `dig(created, "data", "id", operation=...)`; when
    a step is missing, or of the wrong kind, or the value is not an `expect`,
    `UnexpectedAnswer` naming the operation and the path. Senders read answers through it,
    so `{}`, `null`, an empty body or a list where an object belongs leave their records
    failed (sent again next run) instead of crashing the run."""
    value = answer
    for depth, step in enumerate(path):
        if not _has(value, step):
            where = _path(path[:depth]) or "the answer"
            raise _unexpected(operation, path, f"{where} is {_kind(value, step)}")
        value = value[step]
    if expect is not None and not isinstance(value, expect):
        raise _unexpected(operation, path, f"it is {_kind(value)}")
    return value


def _has(value: Any, step: str | int) -> bool:
    if isinstance(step, str):
        return isinstance(value, dict) and step in value
    return isinstance(value, list) and step in range(-len(value), len(value))


def _path(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)[1:]


def _kind(value: Any, step: str | int | None = None) -> str:
    """What a JSON value is, without its content (which might hold anything)."""
    if value is None:
        return "empty (null or no body)"
    if isinstance(value, dict):
        return f"an object without {step!r}" if step is not None else "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return {str: "a string", bool: "true or false"}.get(type(value), "a number")


def _unexpected(operation_id: str, path: tuple[str | int, ...], found: str) -> UnexpectedAnswer:
    return UnexpectedAnswer(
        f"{operation_id}: Klaviyo answered without the expected {_path(path) or 'body'} "
        f"({found}); what became of the request is unknown, so it is sent again next run"
    )


def _parse_errors(status: int, body: bytes, keys: tuple[str | None, ...]) -> list[ApiError]:
    """Klaviyo's errors, every text in them scrubbed of keys: a server or proxy may echo
    the request's Authorization header back."""

    def clean(value: Any) -> str:
        return redact(str(value), keys)

    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        # Scrubbed before it is cut short, so a key cut in two cannot slip through.
        return [ApiError(status, "unknown", clean(body.decode("utf-8", "replace"))[:200])]
    errors = payload.get("errors") if isinstance(payload, dict) else None
    parsed = []
    for error in errors if isinstance(errors, list) else []:
        if not isinstance(error, dict):
            continue
        source = error.get("source")
        source = source if isinstance(source, dict) else {}
        own_status = str(error.get("status"))
        meta = error.get("meta")
        parsed.append(
            ApiError(
                status=int(own_status) if re.fullmatch(r"[1-5][0-9][0-9]", own_status) else status,
                code=clean(error.get("code") or "unknown"),
                detail=clean(error.get("detail") or error.get("title") or ""),
                pointer=clean(source["pointer"]) if source.get("pointer") else None,
                parameter=clean(source["parameter"]) if source.get("parameter") else None,
                meta=_scrubbed(meta, keys) if isinstance(meta, dict) else {},
            )
        )
    return parsed or [ApiError(status, "unknown", f"HTTP {status}")]


def _scrubbed(value: Any, keys: tuple[str | None, ...]) -> Any:
    """`value` with every string in it scrubbed of keys."""
    if isinstance(value, str):
        return redact(value, keys)
    if isinstance(value, dict):
        return {redact(str(k), keys): _scrubbed(v, keys) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v, keys) for v in value]
    return value


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delay-seconds (digits only) or an HTTP date.
    Anything else (`soon`, `inf`, `-1`, `1.5`, garbage) is None: ordinary backoff applies."""
    value = (value or "").strip()
    if re.fullmatch(r"[0-9]+", value):
        return min(float(value), _LONGEST_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, by RFC 5322
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, when.timestamp() - time.time()), _LONGEST_RETRY_AFTER)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str, allow_insecure: bool) -> str:
    """Refuse to send keys in clear text anywhere but this machine, unless told to."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"KLAVIYO_BASE_URL {base_url!r} is not an http(s) URL")
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname):
        raise ConfigurationError(
            f"KLAVIYO_BASE_URL {base_url!r} is plain HTTP to another machine, which would "
            "send the API key unencrypted; use https, or set "
            "DBT_KLAVIYO_ALLOW_INSECURE_HTTP=1 if you really mean it."
        )
    return base_url.rstrip("/")


class KlaviyoClient:
    """A thread-safe client for the operations in the bundled spec.

    `timeout` is (connect, total): seconds to connect, and seconds one attempt may take in
    all, headers and body together. `max_attempts` bounds the tries of a call that fails
    (429s are not failures); `max_backoff` caps the wait between them. `max_wait` bounds the
    seconds one call may wait for rate limits (Retry-After and pacing) in all. `clock` is
    what every wait runs on (a `FakeClock` in tests).
    """

    def __init__(
        self,
        base_url: str,
        private_key: str | None,
        public_key: str | None,
        *,
        pace: bool = True,
        timeout: tuple[float, float] = (10.0, 60.0),
        max_attempts: int = 6,
        max_backoff: float = 30.0,
        max_wait: float = 300.0,
        allow_insecure: bool = False,
        clock: Clock | None = None,
    ) -> None:
        self.base_url = check_base_url(base_url, allow_insecure)
        private_key = checked_key("KLAVIYO_PRIVATE_API_KEY", private_key)
        self._public_key = checked_key("KLAVIYO_PUBLIC_API_KEY", public_key)
        self._keys = (private_key, self._public_key)
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._max_backoff = max_backoff
        self._max_wait = max_wait
        self._clock = clock or RealClock()
        self._pacer = Pacer(enabled=pace, clock=self._clock)
        self._session = requests.Session()
        self._session.mount(base_url, DeadlineAdapter(pool_connections=4, pool_maxsize=32))
        self._session.headers.update(
            {"revision": REVISION, "Accept": JSON_API, "User-Agent": "dbt-klaviyo-sync"}
        )
        self._private_headers = (
            {"Authorization": f"Klaviyo-API-Key {private_key}"} if private_key else {}
        )
        self._requests = 0
        self._failures_in_a_row = 0
        self._count_lock = threading.Lock()
        self._stopping = threading.Condition()
        self._stopped = False

    def __repr__(self) -> str:
        return f"KlaviyoClient({self.base_url!r})"

    @property
    def requests_made(self) -> int:
        return self._requests

    @property
    def rate_limit_wait(self) -> float:
        """Seconds (of the clock, not summed over threads) during which requests waited for
        a rate limit window or a Retry-After."""
        return self._pacer.waits.seconds

    def quiet_for(self) -> float:
        """Seconds before any request now waiting for a rate limit window or a Retry-After
        may go (0 when none waits): time the sync has for nothing else."""
        return self._pacer.waits.quiet_for()

    def close(self) -> None:
        self._session.close()

    def stop(self) -> None:
        """Stop sending (on SIGINT or SIGTERM): every `call` and `sleep` from now on, and
        every one waiting in the pacer, a backoff or a Retry-After, raises `Interrupted` at
        once. Requests already on the wire finish, within their deadline."""
        with self._stopping:
            self._stopped = True
            self._stopping.notify_all()
        self._pacer.stop()

    def sleep(self, seconds: float) -> None:
        """Sleep on the client's clock (to poll a job, say); `Interrupted` once stopped."""
        with self._stopping:
            end = self._clock.now() + seconds
            while not self._stopped:
                left = end - self._clock.now()
                if left <= 0:
                    return
                self._clock.wait(self._stopping, left)
        raise Interrupted("the run is stopping")

    def call(
        self,
        operation_id: str,
        *,
        path_params: tuple[str, ...] = (),
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        attempts: int | None = None,
    ) -> Any:
        """Send one request, with pacing and retries; return the parsed JSON body or None.
        `attempts` lowers the number of tries, for calls where waiting long is worse."""
        op = operation(operation_id)
        path = op.path
        for value in path_params:
            path = path.replace(path[path.index("{") : path.index("}") + 1], value, 1)
        retrying = Retrying(
            stop=stop_after_attempt(attempts or self._max_attempts),
            wait=wait_random_exponential(multiplier=0.5, max=self._max_backoff),
            retry=retry_if_exception_type(TransientApiError)
            & retry_if_not_exception_type((Interrupted, WaitTooLong)),
            sleep=self.sleep,
            reraise=True,
        )
        try:
            if self._stopped:
                raise Interrupted("the run is stopping")
            if self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise TransientApiError(
                    f"not sent, because Klaviyo failed {MAX_FAILURES_IN_A_ROW} requests in "
                    "a row even after retries; it is sent on the next run"
                )
            budget = WaitBudget(self._max_wait)
            answer = retrying(self._paced, op, path, params or {}, body, budget)
        except TransientApiError as error:
            if not isinstance(error, (Interrupted, WaitTooLong)):  # not Klaviyo failing
                with self._count_lock:
                    self._failures_in_a_row += 1
            raise type(error)(f"{operation_id}: {error}") from None
        self._failures_in_a_row = 0
        return answer

    def pages(
        self, operation_id: str, *, path_params: tuple[str, ...] = (), params: dict[str, str]
    ) -> Iterator[dict[str, Any]]:
        """Every item of a paginated collection, following `links.next` cursors;
        `UnexpectedAnswer` for a page without a list of objects or without links."""
        params = dict(params)
        while True:
            page = self.call(operation_id, path_params=path_params, params=params)
            items = dig(page, "data", operation=operation_id, expect=list)
            if not all(isinstance(item, dict) for item in items):
                raise _unexpected(operation_id, ("data",), "it holds more than objects")
            yield from items
            following = dig(page, "links", operation=operation_id, expect=dict).get("next")
            if following is None:
                return
            cursor = isinstance(following, str) and parse_qs(urlsplit(following).query).get(
                "page[cursor]"
            )
            if not cursor:
                raise _unexpected(operation_id, ("links", "next"), "it has no page[cursor]")
            params["page[cursor]"] = cursor[0]

    def _paced(
        self,
        op: Operation,
        path: str,
        params: dict[str, str],
        body: bytes | None,
        budget: WaitBudget,
    ) -> Any:
        """One attempt. A 429 is pacing: the endpoint is blocked for its Retry-After (or,
        without one above 0, an exponential backoff from 1 s), and the next slot waits that out
        within `budget`: a 429 never uses up an attempt, and every one spends some of the
        budget, so the loop ends."""
        pacer = self._pacer.endpoint(op)
        refusals = 0
        while True:
            try:
                return self._attempt(op, pacer, path, params, body, budget)
            except _RateLimited as limited:
                if not limited.retry_after:  # (one is waited out from the answer on)
                    pacer.block(max(1.0, min(self._max_backoff, 2.0 ** min(refusals, 30))))
                refusals += 1

    def _attempt(
        self,
        op: Operation,
        pacer: EndpointPacer,
        path: str,
        params: dict[str, str],
        body: bytes | None,
        budget: WaitBudget,
    ) -> Any:
        headers = {"Content-Type": JSON_API} if body is not None else {}
        if path.startswith("/client/"):
            if not self._public_key:
                raise ConfigurationError(
                    "KLAVIYO_PUBLIC_API_KEY is not set; models with `api: client` need it"
                )
            params = {**params, "company_id": self._public_key}
        else:
            if not self._private_headers:
                raise ConfigurationError(
                    "KLAVIYO_PRIVATE_API_KEY is not set; export your private key (pk_...)"
                )
            headers.update(self._private_headers)
        total = self._timeout[1]
        with pacer.slot(budget):
            if self._stopped:
                raise Interrupted("the run is stopping")
            with self._count_lock:
                self._requests += 1
            with deadline(total) as limit:
                try:
                    response = self._session.request(
                        op.method,
                        self.base_url + path,
                        params=params,
                        data=body,
                        headers=headers,
                        timeout=self._timeout,
                        allow_redirects=False,
                    )
                except requests.RequestException as exc:
                    if limit.expired:
                        raise TransientApiError(f"no complete answer within {total:g} s") from None
                    if isinstance(exc, requests.Timeout):
                        raise TransientApiError("no answer within the timeout") from None
                    raise TransientApiError(f"connection failed ({type(exc).__name__})") from None
            # Read before the place is given up: what the answer says of the limits (and a
            # Retry-After) binds the requests waiting for it.
            return self._answer(op.operation_id, response, pacer)

    def _answer(self, operation_id: str, response: requests.Response, pacer: EndpointPacer) -> Any:
        status = response.status_code
        pacer.heard()
        if status == 429:
            pacer.refused()
            wait = _retry_after(response.headers.get("Retry-After"))
            if wait:
                pacer.block(wait)
            raise _RateLimited("rate limited (HTTP 429)", retry_after=wait)
        if 300 <= status < 400:
            raise self._redirect(operation_id, status, response.headers.get("Location"))
        if status < 200 or (status >= 500 and status not in (501, 505)):  # those two persist
            raise TransientApiError(f"Klaviyo answered HTTP {status}")
        if status in (401, 403):
            errors = _parse_errors(status, response.content, self._keys)
            raise CredentialsError(
                f"Klaviyo refused the API key (HTTP {status}: {errors[0].detail}). Check "
                "KLAVIYO_PRIVATE_API_KEY (and KLAVIYO_PUBLIC_API_KEY for `api: client`) "
                "and the key's scopes (accounts:read, profiles:read/write, lists:read/write, "
                "events:write for events, data-privacy:write for deletions)."
            )
        if status >= 400:
            errors = _parse_errors(status, response.content, self._keys)
            if any(e.parameter == "company_id" for e in errors):
                # A refused public key is the run's problem, not each record's.
                raise CredentialsError(
                    f"Klaviyo refused the public key ({errors[0].detail}). Check "
                    "KLAVIYO_PUBLIC_API_KEY: it is your 6-character site ID."
                )
            raise KlaviyoRejected(operation_id, status, errors)
        advertised = re.match(r"\s*(\d{1,9})", response.headers.get("RateLimit-Limit", ""))
        if advertised:  # "150", or "150;w=60" in the IETF draft's form
            pacer.learn_steady_limit(int(advertised[1]))
        if response.headers.get("RateLimit-Remaining") == "0":
            pacer.block(_retry_after(response.headers.get("RateLimit-Reset")) or 1.0)
        if not response.content:
            return None
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise UnexpectedAnswer(
                f"Klaviyo answered HTTP {status} with a body that is not JSON"
            ) from None

    def _redirect(self, operation_id: str, status: int, location: str | None) -> RedirectRefused:
        """Where a redirect pointed, as scheme and host only (a path or query might hold
        anything), and what to do."""
        target, base = urlsplit(location or ""), urlsplit(self.base_url)
        where = (
            f"to {target.scheme or base.scheme}://{target.hostname or base.hostname}"
            if location
            else "without saying where to"
        )
        return RedirectRefused(
            redact(
                f"{operation_id}: Klaviyo's URL answered with a redirect (HTTP {status}) "
                f"{where}; a sync never "
                "follows redirects. Set KLAVIYO_BASE_URL to the API's own address "
                "(https://a.klaviyo.com, or your proxy's).",
                self._keys,
            )
        )
