"""The emulator's HTTP face: a WSGI app in front of the accounts, served on a thread.

Each Klaviyo request goes through the same steps, in the order Klaviyo applies them:
route by the spec, fault injection, authentication (the key picks the account), revision
header, the account's rate limits, query parameters, body (content type, size, JSON,
schema), then the operation's handler. Control endpoints under `/__emulator__/` sit beside
it, unauthenticated and uncounted.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import date
from types import TracebackType
from typing import Any

import orjson
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from dbt_klaviyo_sync.klaviyo import openapi
from dbt_klaviyo_sync.klaviyo.openapi import Operation

from . import validation
from .accounts import Accounts, Hosted
from .api import ROUTES, Call, Route
from .errors import ApiError, SpecViolation, from_status, invalid, not_found
from .events import state as event_state
from .faults import Fault, FaultKind, FaultQueue, echoed, make_fault, trickled
from .profiles import RecordError
from .profiles import render as render_profile
from .store import Account, deletion_state
from .telemetry import LogEntry, Telemetry

CONTENT_TYPE = "application/vnd.api+json"
CONTROL_PREFIX = "/__emulator__/"
_REVISION = re.compile(r"(\d{4}-\d{2}-\d{2})(\.[A-Za-z0-9_-]+)?")
_KEY_SCHEME = "Klaviyo-API-Key"
_METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE")
#: How often the serving thread checks for `close()`: the most a close can take.
_SHUTDOWN_POLL_SECONDS = 0.02
#: An injected `malformed` answer: a JSON document cut off halfway.
MALFORMED_BODY = b'{"data": [{"type": "profile", "id": '


class App:
    """The WSGI application: Klaviyo accounts with their limits, plus faults and telemetry.

    It starts with one account, reached by `private_key` and `public_key` (None: any key).
    """

    def __init__(
        self,
        *,
        private_key: str | None,
        public_key: str | None,
        rate_limits: bool | float,
        job_seconds: float,
        validate: bool,
        clock: Callable[[], float],
        sink: bool = False,
    ) -> None:
        self.accounts = Accounts(
            job_seconds=job_seconds, clock=clock, sink=sink, rate_scale=_scale(rate_limits)
        )
        self.accounts.add(private_key, public_key)
        self.faults = FaultQueue()
        self.telemetry = Telemetry(clock)
        self._validate = validate
        if validate:
            validation.prepare(openapi.operation(operation_id) for operation_id in ROUTES)

    def reset(self) -> None:
        self.accounts.reset()
        self.faults.clear()
        self.telemetry.reset()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        response = (
            self._control(request)
            if request.path.startswith(CONTROL_PREFIX)
            else self._klaviyo(request)
        )
        if response is None:
            # An injected `reset`: werkzeug treats a ConnectionError as a dropped client.
            environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
            raise ConnectionResetError("connection dropped by an injected fault")
        served: Iterable[bytes] = response(environ, start_response)
        return served

    # Klaviyo requests

    def _klaviyo(self, request: Request) -> Response | None:
        path = request.path.rstrip("/") or "/"
        found = openapi.match(request.method, path)
        if found is None:
            refused = _error(_unrouted(request.method, path))
            self._log(request, None, refused.status_code)
            return refused
        operation, path_params = found
        operation_id = operation.operation_id
        self.telemetry.request(operation_id)
        caller = self._caller(request, operation)
        if caller is not None:
            caller.account.advance()
            if caller.limiter.arrived_early(operation_id):
                self.telemetry.count("retry_after_violations")
        fault = self.faults.take(operation_id, request.get_data(cache=True))
        answer = self._faulted(request, operation, path_params, fault)
        self._log(request, operation_id, None if answer is None else answer.status_code)
        retry_after = None if answer is None else answer.headers.get("Retry-After")
        if caller is not None and retry_after is not None and retry_after.isdecimal():
            # Whether the limiter or a fault sent it, the caller's account is to be waited for.
            caller.limiter.told_to_wait(operation_id, int(retry_after))
        return answer

    def _faulted(
        self,
        request: Request,
        operation: Operation,
        path_params: tuple[str, ...],
        fault: Fault | None,
    ) -> Response | None:
        """The answer, as the injected fault (if any) changes it; None drops the connection."""

        def answer(*, stuck: bool = False) -> Response:
            return self._answer(request, operation, path_params, stuck=stuck)

        if fault is None:
            return answer()
        if fault.kind == "job_stuck":
            return answer(stuck=True)
        if fault.kind == "delay":
            if not fault.after:
                time.sleep(fault.seconds)
            late = answer()
            if fault.after:
                time.sleep(fault.seconds)
            return late
        if fault.kind == "trickle":
            return trickled(answer(), fault.seconds)
        # The other kinds replace the answer; with `after`, only once the work is done.
        if fault.after:
            answer()
        if fault.kind == "reset":
            return None
        if fault.kind == "malformed":
            return Response(MALFORMED_BODY, 200, content_type=CONTENT_TYPE)
        if fault.kind == "raw":
            return fault.raw_answer()
        if fault.kind == "echo":
            return _error(echoed(request.headers.get("Authorization", "")))
        if fault.status == 429:
            return _error(self._throttled(operation, fault.retry_after))
        injected = from_status(fault.status, "Injected by the emulator.")
        return _error(replace(injected, pointer=fault.pointer) if fault.pointer else injected)

    def _answer(
        self,
        request: Request,
        operation: Operation,
        path_params: tuple[str, ...],
        *,
        stuck: bool,
    ) -> Response:
        route = ROUTES.get(operation.operation_id)
        if route is None:
            return _error(
                ApiError(
                    501,
                    "not_implemented",
                    "Not implemented.",
                    f"The emulator does not implement {operation.operation_id} yet.",
                )
            )
        decision = None
        try:
            caller = self._authenticate(request, operation)
            _check_revision(request)
            decision = caller.limiter.acquire(operation)
            if decision is not None and not decision.allowed:
                raise self._throttled(operation, decision.retry_after)
            query = request.args.to_dict(flat=False)
            params = validation.read_parameters(operation, query, strict=self._validate)
            _check_implemented(route, [name for name in query if name in params])
            body = self._body(request, operation, route)
            if operation.method != "GET":
                self.telemetry.count("writes")
            base_url = request.host_url.rstrip("/")
            call = Call(caller.account, path_params, params, body, request.url, base_url, stuck)
            reply = route.handler(call)
            if reply.document is None:
                response = Response(status=reply.status, content_type=CONTENT_TYPE)
            else:
                response = _json(reply.document, reply.status)
        except RecordError as error:
            response = _error(error.in_request())
        except ApiError as error:
            if isinstance(error, SpecViolation):
                self.telemetry.count("spec_violations")
            response = _error(error)
        if decision is not None and decision.allowed:
            response.headers.update(decision.headers())
        return response

    def _caller(self, request: Request, operation: Operation) -> Hosted | None:
        """The account the request's key reaches, if any."""
        if _is_client(operation):
            company_id = request.args.get("company_id", "")
            return self.accounts.by_public_key(company_id) if company_id else None
        scheme, key = _private_key(request)
        return self.accounts.by_private_key(key) if scheme == _KEY_SCHEME and key else None

    def _authenticate(self, request: Request, operation: Operation) -> Hosted:
        """The account the request acts on, or Klaviyo's error for a missing or wrong key."""
        caller = self._caller(request, operation)
        if caller is not None:
            return caller
        self.telemetry.count("auth_failures")
        if _is_client(operation):
            # Client operations carry the public key as company_id, and no Authorization.
            raise invalid(
                "A valid public API key is required as company_id.", parameter="company_id"
            )
        if _private_key(request)[0] != _KEY_SCHEME:
            raise ApiError(
                401,
                "not_authenticated",
                "Authentication credentials were not provided.",
                f"Missing or invalid authorization scheme. Please use {_KEY_SCHEME}.",
            )
        raise ApiError(
            401,
            "authentication_failed",
            "Incorrect authentication credentials.",
            "Incorrect authentication credentials.",
        )

    def _throttled(self, operation: Operation, retry_after: int) -> ApiError:
        """Klaviyo's 429 for `operation`; `_klaviyo` records the wait for the caller's account."""
        self.telemetry.count("throttled")
        unit = "second" if retry_after == 1 else "seconds"
        return ApiError(
            429,
            "throttled",
            "Request was throttled.",
            f"Request was throttled. Expected available in {retry_after} {unit}.",
            headers={"Retry-After": str(retry_after)},
        )

    def _body(self, request: Request, operation: Operation, route: Route) -> Any:
        if not validation.has_body(operation):
            return None
        if request.mimetype != CONTENT_TYPE:
            raise SpecViolation(
                415,
                "unsupported_media_type",
                "Unsupported media type.",
                f'Unsupported media type "{request.mimetype}" in request; use {CONTENT_TYPE}.',
            )
        raw = request.get_data()
        if route.max_body is not None and len(raw) > route.max_body:
            raise ApiError(
                413,
                "payload_too_large",
                "Payload too large.",
                f"The payload is {len(raw):,} bytes; at most {route.max_body:,} are allowed.",
            )
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise SpecViolation(
                400, "parse_error", "Malformed request.", "The request body is not valid JSON."
            ) from None
        if self._validate:
            validation.check_body(operation, body)
        return body

    def _log(self, request: Request, operation_id: str | None, status: int | None) -> None:
        self.telemetry.log(request.method, request.path, request.args, operation_id, status)

    # Control endpoints

    def stats(self) -> dict[str, Any]:
        """The request counters, and how many events arrived and were dropped as repeats,
        over all accounts."""
        accounts = [hosted.account for hosted in self.accounts]
        return {
            **self.telemetry.stats(),
            "events_received": sum(account.events_received for account in accounts),
            "events_repeated": sum(account.events_repeated for account in accounts),
            "events_lost": sum(account.events_lost for account in accounts),
        }

    def _control(self, request: Request) -> Response:
        name = request.path.removeprefix(CONTROL_PREFIX).strip("/")
        base_url = request.host_url.rstrip("/")
        try:
            match request.method, name:
                case "GET", "state":
                    account = self.accounts.get(request.args.get("account")).account
                    return _control_json(account.state(base_url))
                case "GET", "stats":
                    return _control_json(self.stats())
                case "GET", "requests":
                    return _control_json(self.telemetry.entries())
                case "POST", "faults":
                    self.faults.add(make_fault(**_control_body(request)))
                    return Response(status=204)
                case "POST", "lists":
                    body = _control_body(request)
                    account = self.accounts.get(body.get("account")).account
                    created = account.create_list(str(body["name"]), list_id=body.get("id"))
                    return _control_json({"id": created.id}, 201)
                case "POST", "accounts":
                    body = _control_body(request)
                    added = self.accounts.add(
                        str(body["private_key"]), body.get("public_key"), body.get("name")
                    )
                    return _control_json({"id": added.id}, 201)
                case "POST", "reset":
                    self.reset()
                    return Response(status=204)
        except (TypeError, ValueError, KeyError) as error:
            return _control_json({"error": str(error)}, 400)
        return _control_json({"error": f"no control endpoint {request.method} {name}"}, 404)


class _QuietHandler(WSGIRequestHandler):
    """Werkzeug prints every request; the emulator keeps its own log instead."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class Emulator:
    """Klaviyo's REST API on loopback, for tests and CI.

    The socket is bound on construction (so `url` is known at once); `start()` or `with`
    serves it on a background thread until `close()`. With `sink`, bulk import jobs count
    their profiles and complete without storing them: for benchmarks of the client alone,
    where a million stored profiles would make the emulator the thing measured.

    It holds one account, reached by `private_key` and `public_key` (None: any key), and
    more with `add_account`. `clock` (seconds since the epoch) is the emulator's only time:
    rate-limit windows, job and deletion timing, timestamps; a test injects a fake one and
    advances it instead of sleeping.
    """

    def __init__(
        self,
        private_key: str | None = None,
        public_key: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limits: bool | float = True,
        job_seconds: float = 0.0,
        validate: bool = True,
        sink: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = App(
            private_key=private_key,
            public_key=public_key,
            rate_limits=rate_limits,
            job_seconds=job_seconds,
            validate=validate,
            clock=clock,
            sink=sink,
        )
        self._server = make_server(
            host, port, self.app, threaded=True, request_handler=_QuietHandler
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self._server.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self._server.server_port}"

    def start(self) -> Emulator:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": _SHUTDOWN_POLL_SECONDS},
                name="klaviyo-emulator",
                daemon=True,
            )
            self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # Test helpers: they talk to the accounts directly, not over HTTP. `account` is an
    # account id, as `add_account` returns it; None is the first account.

    def add_account(
        self, private_key: str, public_key: str | None = None, *, name: str | None = None
    ) -> str:
        """Another empty account on the same URL, with its own data and rate limits; its id.

        Requests with `private_key` (client requests with `public_key` as company_id) act on
        it; without a public key it gets one made up, which GET /api/accounts shows. `name`
        is its organization name. ValueError if another account has one of these keys.
        """
        return self.app.accounts.add(private_key, public_key, name).id

    def account_ids(self) -> list[str]:
        """The accounts' ids, the first account's first (6 letters and digits, as Klaviyo's)."""
        return [hosted.id for hosted in self.app.accounts]

    def create_list(
        self, name: str, list_id: str | None = None, *, account: str | None = None
    ) -> str:
        """A list for tests; `list_id` fixes its id, so a model's annotation can name it."""
        return self._account(account).create_list(name, list_id=list_id).id

    def profiles(self, *, account: str | None = None) -> list[dict[str, Any]]:
        found = self._account(account)
        return [render_profile(p, self.url) for p in found.profiles(found.profile_ids())]

    def list_members(self, list_id: str, *, account: str | None = None) -> set[str]:
        return set(self._account(account).members(list_id))

    def consent(self, *, account: str | None = None) -> list[dict[str, Any]]:
        """Every profile with consent or a suppression: `email`, `phone_number`, `channels`
        (per channel: global `status`, `lists` (list id: status), `consented_at`,
        `historical_import`, `custom_source`) and `suppression` (a reason, or None)."""
        return self._account(account).consent()

    def global_unsubscribes(self, *, account: str | None = None) -> list[dict[str, Any]]:
        """Every global unsubscribe, as (profile_id, channel, list_id given)."""
        return self._account(account).global_unsubscribes()

    def events(self, *, account: str | None = None) -> list[dict[str, Any]]:
        """The recorded events, in the order they were recorded."""
        return [event_state(event) for event in self._account(account).events()]

    def flow_triggers(self, *, account: str | None = None) -> dict[str, int]:
        """How many times each metric's flow fired (every metric has one here): once per
        event recorded without Klaviyo's `backfill` flag."""
        return self._account(account).flow_triggers()

    def deletions(self, *, account: str | None = None) -> list[dict[str, Any]]:
        """Every deletion request, in the order made; `completed_at` is None until it ran."""
        return [deletion_state(deletion) for deletion in self._account(account).deletions()]

    def state(self, *, account: str | None = None) -> dict[str, Any]:
        return self._account(account).state(self.url)

    def _account(self, account: str | None) -> Account:
        return self.app.accounts.get(account).account

    def stats(self) -> dict[str, Any]:
        return self.app.stats()

    def request_log(self) -> list[LogEntry]:
        return self.app.telemetry.entries()

    def inject(
        self,
        status: int | None = None,
        *,
        kind: FaultKind | None = None,
        count: int = 1,
        operation: str | None = None,
        retry_after: int = 1,
        seconds: float = 0.0,
        after: bool = False,
        pointer: str | None = None,
        body_contains: str | None = None,
        body: bytes | str = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Make the next `count` requests to `operation` (None: any) fail; see `Fault`."""
        self.app.faults.add(
            make_fault(
                status,
                kind=kind,
                count=count,
                operation=operation,
                retry_after=retry_after,
                seconds=seconds,
                after=after,
                pointer=pointer,
                body_contains=body_contains,
                body=body,
                headers=headers,
            )
        )

    def set_rate_limit(
        self,
        operation: str,
        *,
        burst: int | None = None,
        steady: int | None = None,
        account: str | None = None,
    ) -> None:
        """Override an operation's documented limits (per second / per minute) in one
        account (None: the first)."""
        if operation not in openapi.operations():
            raise ValueError(f"unknown operation {operation!r}")
        self.app.accounts.get(account).limiter.override(operation, burst, steady)

    def reset(self) -> None:
        """Forget all data, stats, faults, rate-limit windows and overrides. The accounts
        stay, empty."""
        self.app.reset()


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    private_key: str | None = None,
    public_key: str | None = None,
    rate_limits: bool | float = True,
    job_seconds: float = 0.0,
    validate: bool = True,
) -> None:
    """Run an emulator in the foreground until interrupted (Ctrl-C)."""
    emulator = Emulator(
        private_key,
        public_key,
        host=host,
        port=port,
        rate_limits=rate_limits,
        job_seconds=job_seconds,
        validate=validate,
    )
    print(f"Klaviyo emulator listening on {emulator.url}", flush=True)
    with emulator, contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


def _scale(rate_limits: bool | float) -> float | None:
    if rate_limits is True:
        return 1.0
    if rate_limits is False or rate_limits <= 0:
        return None
    return float(rate_limits)


def _is_client(operation: Operation) -> bool:
    return operation.path.startswith("/client/")


def _private_key(request: Request) -> tuple[str, str]:
    """The Authorization header's scheme and key."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return scheme, key.strip()


def _check_revision(request: Request) -> None:
    value = request.headers.get("revision")
    found = _REVISION.fullmatch(value or "")
    if found is not None:
        try:
            date.fromisoformat(found.group(1))
            return
        except ValueError:
            pass
    detail = (
        "The revision header is required, as YYYY-MM-DD[.suffix]."
        if value is None
        else f"Invalid revision {value!r}: use YYYY-MM-DD[.suffix]."
    )
    raise SpecViolation(400, "invalid", "Invalid input.", detail, parameter="revision")


def _check_implemented(route: Route, given: Iterable[str]) -> None:
    """A documented parameter the emulator ignores would hide a gap: refuse it with 501."""
    for name in given:
        if name not in route.params:
            raise ApiError(
                501,
                "not_implemented",
                "Not implemented.",
                f"The emulator does not implement the '{name}' parameter here yet.",
                parameter=name,
            )


def _unrouted(method: str, path: str) -> ApiError:
    if any(openapi.match(other, path) for other in _METHODS if other != method):
        return ApiError(
            405, "method_not_allowed", "Method not allowed.", f'Method "{method}" not allowed.'
        )
    return not_found(f"No Klaviyo operation at {path}.")


def _json(document: Any, status: int) -> Response:
    return Response(orjson.dumps(document), status, content_type=CONTENT_TYPE)


def _error(error: ApiError) -> Response:
    response = _json(error.document(), error.status)
    response.headers.update(error.headers)
    return response


def _control_json(document: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(document), status, content_type="application/json")


def _control_body(request: Request) -> dict[str, Any]:
    body = orjson.loads(request.get_data() or b"{}")
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body
