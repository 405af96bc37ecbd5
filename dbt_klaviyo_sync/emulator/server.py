"""The emulator's HTTP face: a WSGI app in front of the account, served on a thread.

Each Klaviyo request goes through the same steps, in the order Klaviyo applies them:
route by the spec, fault injection, authentication, revision header, rate limits, query
parameters, body (content type, size, JSON, schema), then the operation's handler.
Control endpoints under `/__emulator__/` sit beside it, unauthenticated and uncounted.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable
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
from .api import ROUTES, Call, Route
from .errors import ApiError, SpecViolation, from_status, invalid, not_found
from .events import state as event_state
from .faults import Fault, FaultKind, FaultQueue, make_fault
from .profiles import RecordError
from .profiles import render as render_profile
from .ratelimit import RateLimiter
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
    """The WSGI application: one Klaviyo account with its limits, faults and telemetry."""

    def __init__(
        self,
        *,
        private_key: str | None,
        public_key: str | None,
        rate_limits: bool | float,
        job_seconds: float,
        validate: bool,
        sink: bool = False,
    ) -> None:
        self.account = Account(job_seconds, sink=sink)
        self.limiter = RateLimiter(_scale(rate_limits))
        self.faults = FaultQueue()
        self.telemetry = Telemetry()
        self._private_key = private_key
        self._public_key = public_key
        self._validate = validate
        if validate:
            validation.prepare(openapi.operation(operation_id) for operation_id in ROUTES)

    def reset(self) -> None:
        self.account.reset()
        self.limiter.reset()
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
        self.account.advance()
        if self.limiter.arrived_early(operation_id):
            self.telemetry.count("retry_after_violations")
        fault = self.faults.take(operation_id, request.get_data(cache=True))
        answer = self._faulted(request, operation, path_params, fault)
        self._log(request, operation_id, None if answer is None else answer.status_code)
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
        # The other kinds replace the answer; with `after`, only once the work is done.
        if fault.after:
            answer()
        if fault.kind == "reset":
            return None
        if fault.kind == "malformed":
            return Response(MALFORMED_BODY, 200, content_type=CONTENT_TYPE)
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
            self._authenticate(request, operation)
            _check_revision(request)
            decision = self.limiter.acquire(operation)
            if decision is not None and not decision.allowed:
                raise self._throttled(operation, decision.retry_after)
            query = request.args.to_dict(flat=False)
            params = validation.read_parameters(operation, query, strict=self._validate)
            _check_implemented(route, [name for name in query if name in params])
            body = self._body(request, operation, route)
            if operation.method != "GET":
                self.telemetry.count("writes")
            base_url = request.host_url.rstrip("/")
            call = Call(self.account, path_params, params, body, request.url, base_url, stuck)
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

    def _authenticate(self, request: Request, operation: Operation) -> None:
        if operation.path.startswith("/client/"):
            # Client operations carry the public key as company_id, and no Authorization.
            company_id = request.args.get("company_id", "")
            if not company_id or not _same(company_id, self._public_key):
                self.telemetry.count("auth_failures")
                raise invalid(
                    "A valid public API key is required as company_id.", parameter="company_id"
                )
            return
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme != _KEY_SCHEME:
            self.telemetry.count("auth_failures")
            raise ApiError(
                401,
                "not_authenticated",
                "Authentication credentials were not provided.",
                f"Missing or invalid authorization scheme. Please use {_KEY_SCHEME}.",
            )
        if not key.strip() or not _same(key.strip(), self._private_key):
            self.telemetry.count("auth_failures")
            raise ApiError(
                401,
                "authentication_failed",
                "Incorrect authentication credentials.",
                "Incorrect authentication credentials.",
            )

    def _throttled(self, operation: Operation, retry_after: int) -> ApiError:
        self.telemetry.count("throttled")
        self.limiter.told_to_wait(operation.operation_id, retry_after)
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
        """The request counters, and how many events arrived and were dropped as repeats."""
        return {
            **self.telemetry.stats(),
            "events_received": self.account.events_received,
            "events_repeated": self.account.events_repeated,
        }

    def _control(self, request: Request) -> Response:
        name = request.path.removeprefix(CONTROL_PREFIX).strip("/")
        base_url = request.host_url.rstrip("/")
        try:
            match request.method, name:
                case "GET", "state":
                    return _control_json(self.account.state(base_url))
                case "GET", "stats":
                    return _control_json(self.stats())
                case "GET", "requests":
                    return _control_json(self.telemetry.entries())
                case "POST", "faults":
                    self.faults.add(make_fault(**_control_body(request)))
                    return Response(status=204)
                case "POST", "lists":
                    body = _control_body(request)
                    created = self.account.create_list(str(body["name"]), list_id=body.get("id"))
                    return _control_json({"id": created.id}, 201)
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
    ) -> None:
        self.app = App(
            private_key=private_key,
            public_key=public_key,
            rate_limits=rate_limits,
            job_seconds=job_seconds,
            validate=validate,
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

    # Test helpers: they talk to the account directly, not over HTTP.

    def create_list(self, name: str, list_id: str | None = None) -> str:
        """A list for tests; `list_id` fixes its id, so a model's annotation can name it."""
        return self.app.account.create_list(name, list_id=list_id).id

    def profiles(self) -> list[dict[str, Any]]:
        account = self.app.account
        return [render_profile(p, self.url) for p in account.profiles(account.profile_ids())]

    def list_members(self, list_id: str) -> set[str]:
        return set(self.app.account.members(list_id))

    def events(self) -> list[dict[str, Any]]:
        """The recorded events, in the order they were recorded."""
        return [event_state(event) for event in self.app.account.events()]

    def deletions(self) -> list[dict[str, Any]]:
        """Every deletion request, in the order made; `completed_at` is None until it ran."""
        return [deletion_state(deletion) for deletion in self.app.account.deletions()]

    def state(self) -> dict[str, Any]:
        return self.app.account.state(self.url)

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
            )
        )

    def set_rate_limit(
        self, operation: str, *, burst: int | None = None, steady: int | None = None
    ) -> None:
        """Override an operation's documented limits (per second / per minute)."""
        if operation not in openapi.operations():
            raise ValueError(f"unknown operation {operation!r}")
        self.app.limiter.override(operation, burst, steady)

    def reset(self) -> None:
        """Forget all data, stats, faults, rate-limit windows and overrides."""
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


def _same(given: str, expected: str | None) -> bool:
    """Whether a key matches; with no expected key configured, any non-empty key does."""
    return expected is None or secrets.compare_digest(given.encode(), expected.encode())


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
