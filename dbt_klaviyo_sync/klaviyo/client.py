"""One HTTP session to Klaviyo: auth, the pinned revision, pacing, retries, typed errors.

Every request goes through `KlaviyoClient.call`, which waits for the endpoint's pacer,
retries passing failures (429, 5xx, timeouts, dropped connections) with exponential
backoff and jitter, never sends to an endpoint before its `Retry-After` has passed, and
turns Klaviyo's answers into values or typed errors:
- 2xx: the parsed JSON body (or None);
- 401/403: `CredentialsError`, which stops the run;
- other 4xx: `KlaviyoRejected`, carrying Klaviyo's errors, for the caller to reject records;
- anything passing, once retries are exhausted: `TransientApiError`.
API keys live only in the session headers; no message we build can contain them.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

from dbt_klaviyo_sync.errors import ConfigurationError, CredentialsError, TransientApiError
from dbt_klaviyo_sync.klaviyo.openapi import REVISION, operation
from dbt_klaviyo_sync.klaviyo.pacing import EndpointPacer, Pacer

log = logging.getLogger(__name__)

JSON_API = "application/vnd.api+json"
#: After this many requests in a row fail even with retries, Klaviyo is taken to be down:
#: the rest of the run fails fast, leaving its records pending for the next run.
MAX_FAILURES_IN_A_ROW = 3


@dataclass(frozen=True)
class ApiError:
    """One entry of Klaviyo's `errors` array."""

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


def _parse_errors(status: int, body: bytes) -> list[ApiError]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [ApiError(status, "unknown", body[:200].decode("utf-8", "replace"))]
    errors = payload.get("errors") if isinstance(payload, dict) else None
    return [
        ApiError(
            status=int(e.get("status") or status),
            code=str(e.get("code", "unknown")),
            detail=str(e.get("detail") or e.get("title") or ""),
            pointer=(e.get("source") or {}).get("pointer"),
            parameter=(e.get("source") or {}).get("parameter"),
            meta=e.get("meta") or {},
        )
        for e in errors or []
        if isinstance(e, dict)
    ] or [ApiError(status, "unknown", f"HTTP {status}")]


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: an integer, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())


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
    """A thread-safe client for the operations in the bundled spec."""

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
        allow_insecure: bool = False,
    ) -> None:
        self.base_url = check_base_url(base_url, allow_insecure)
        self._public_key = public_key
        self._has_private_key = bool(private_key)
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._backoff = wait_random_exponential(multiplier=0.5, max=max_backoff)
        self._pacer = Pacer(enabled=pace)
        self._session = requests.Session()
        self._session.mount(base_url, HTTPAdapter(pool_connections=4, pool_maxsize=32))
        self._session.headers.update(
            {"revision": REVISION, "Accept": JSON_API, "User-Agent": "dbt-klaviyo-sync"}
        )
        self._private_headers = (
            {"Authorization": f"Klaviyo-API-Key {private_key}"} if private_key else {}
        )
        self._requests = 0
        self._failures_in_a_row = 0
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KlaviyoClient({self.base_url!r})"

    @property
    def requests_made(self) -> int:
        return self._requests

    @property
    def rate_limit_wait(self) -> float:
        """Seconds (of the clock, not summed over threads) during which requests waited for
        a rate limit window or a Retry-After."""
        return self._pacer.clock.seconds

    def close(self) -> None:
        self._session.close()

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
        if self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise TransientApiError(
                f"{operation_id}: not sent, because Klaviyo failed {MAX_FAILURES_IN_A_ROW} "
                "requests in a row even after retries; it is sent on the next run"
            )
        retrying = Retrying(
            stop=stop_after_attempt(attempts or self._max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(TransientApiError),
            reraise=True,
        )
        try:
            answer = retrying(self._attempt, operation_id, op.method, path, params or {}, body)
        except TransientApiError:
            with self._count_lock:
                self._failures_in_a_row += 1
            raise
        self._failures_in_a_row = 0
        return answer

    def pages(
        self, operation_id: str, *, path_params: tuple[str, ...] = (), params: dict[str, str]
    ) -> Iterator[dict[str, Any]]:
        """Every item of a paginated collection, following `links.next` cursors."""
        params = dict(params)
        while True:
            page = self.call(operation_id, path_params=path_params, params=params)
            yield from page.get("data") or []
            following = (page.get("links") or {}).get("next")
            cursor = parse_qs(urlsplit(following).query).get("page[cursor]") if following else None
            if not cursor:
                return
            params["page[cursor]"] = cursor[0]

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with jitter; after a 429 the pacer holds the Retry-After,
        so only a little jitter is added to spread out the threads that waited."""
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, TransientApiError) and error.retry_after is not None:
            return random.uniform(0.0, 0.25)
        return float(self._backoff(state))

    def _attempt(
        self, operation_id: str, method: str, path: str, params: dict[str, str], body: bytes | None
    ) -> Any:
        headers = {"Content-Type": JSON_API} if body is not None else {}
        if path.startswith("/client/"):
            if not self._public_key:
                raise ConfigurationError(
                    "KLAVIYO_PUBLIC_API_KEY is not set; models with `api: client` need it"
                )
            params = {**params, "company_id": self._public_key}
        else:
            if not self._has_private_key:
                raise ConfigurationError(
                    "KLAVIYO_PRIVATE_API_KEY is not set; export your private key (pk_...)"
                )
            headers.update(self._private_headers)
        pacer = self._pacer.endpoint(operation(operation_id))
        with pacer.slot():
            with self._count_lock:
                self._requests += 1
            try:
                response = self._session.request(
                    method,
                    self.base_url + path,
                    params=params,
                    data=body,
                    headers=headers,
                    timeout=self._timeout,
                )
            except requests.Timeout:
                raise TransientApiError(f"{operation_id}: no answer within the timeout") from None
            except requests.ConnectionError as exc:
                raise TransientApiError(
                    f"{operation_id}: connection failed ({type(exc).__name__})"
                ) from None
        return self._answer(operation_id, response, pacer)

    def _answer(self, operation_id: str, response: requests.Response, pacer: EndpointPacer) -> Any:
        status = response.status_code
        if status == 429:
            wait = _retry_after(response.headers.get("Retry-After"))
            pacer.refused()
            if wait is not None:
                pacer.block(wait)
            raise TransientApiError(f"{operation_id}: rate limited (HTTP 429)", retry_after=wait)
        if status >= 500 and status not in (501, 505):  # those two will not pass
            raise TransientApiError(f"{operation_id}: Klaviyo answered HTTP {status}")
        if status in (401, 403):
            errors = _parse_errors(status, response.content)
            raise CredentialsError(
                f"Klaviyo refused the API key (HTTP {status}: {errors[0].detail}). Check "
                "KLAVIYO_PRIVATE_API_KEY (and KLAVIYO_PUBLIC_API_KEY for `api: client`) "
                "and the key's scopes (profiles:read/write, lists:read/write, events:write "
                "for events, data-privacy:write for deletions)."
            )
        if status >= 400:
            errors = _parse_errors(status, response.content)
            if any(e.parameter == "company_id" for e in errors):
                # A refused public key is the run's problem, not each record's.
                raise CredentialsError(
                    f"Klaviyo refused the public key ({errors[0].detail}). Check "
                    "KLAVIYO_PUBLIC_API_KEY: it is your 6-character site ID."
                )
            raise KlaviyoRejected(operation_id, status, errors)
        advertised = re.match(r"\s*(\d+)", response.headers.get("RateLimit-Limit", ""))
        if advertised:  # "150", or "150;w=60" in the IETF draft's form
            pacer.learn_steady_limit(int(advertised[1]))
        if response.headers.get("RateLimit-Remaining") == "0":
            pacer.block(_retry_after(response.headers.get("RateLimit-Reset")) or 1.0)
        if not response.content:
            return None
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise TransientApiError(
                f"{operation_id}: Klaviyo answered HTTP {status} with a body that is not JSON"
            ) from None
