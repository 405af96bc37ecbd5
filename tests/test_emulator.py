"""The Klaviyo emulator over real HTTP: protocol, spec validation, accounts, rate limits,
faults, telemetry, and Klaviyo's semantics for profiles, bulk import jobs, filters and lists.

Time is a fake clock that a test advances: nothing sleeps, and what depends on time
(rate-limit headers, job progress, timestamps) is asserted exactly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson
import pytest
import requests
from openapi_schema_validator import OAS30Validator

from dbt_klaviyo_sync.emulator import Emulator, validation
from dbt_klaviyo_sync.emulator.api import ROUTES
from dbt_klaviyo_sync.emulator.errors import SpecViolation
from dbt_klaviyo_sync.klaviyo import openapi

# Recognisable, so a test can search everything the emulator exposes for them.
PRIVATE_KEY = "pk_SECRET_emulator_key_7f3a9c"
PUBLIC_KEY = "PubK3y"
# A second account's keys.
OTHER_KEY = "pk_SECRET_other_account_41d2e8"
OTHER_PUBLIC_KEY = "0thrPK"
JSONAPI = "application/vnd.api+json"
#: Where the fake clock starts: 2026-07-15T12:00:00Z.
START = datetime(2026, 7, 15, 12, tzinfo=UTC).timestamp()


class FakeClock:
    """The emulator's clock in tests: it moves only when the test advances it."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def at(seconds: float) -> str:
    """The timestamp Klaviyo shows `seconds` after START."""
    return datetime.fromtimestamp(START + seconds, UTC).isoformat(timespec="seconds")


def headers(key: str | None = PRIVATE_KEY) -> dict[str, str]:
    found = {"revision": openapi.REVISION, "Content-Type": JSONAPI, "Accept": JSONAPI}
    if key is not None:
        found["Authorization"] = f"Klaviyo-API-Key {key}"
    return found


def call(
    emu: Emulator,
    method: str,
    path: str,
    body: Any = None,
    *,
    params: dict[str, Any] | None = None,
    key: str | None = PRIVATE_KEY,
    extra_headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> requests.Response:
    url = path if path.startswith("http") else emu.url + path
    return requests.request(
        method,
        url,
        json=body,
        params=params,
        headers={**headers(key), **(extra_headers or {})},
        timeout=timeout,
    )


def profile(**attributes: Any) -> dict[str, Any]:
    return {"data": {"type": "profile", "attributes": attributes}}


def upsert(emu: Emulator, **attributes: Any) -> requests.Response:
    return call(emu, "POST", "/api/profile-import", profile(**attributes))


def client_upsert(
    emu: Emulator, company_id: str = PUBLIC_KEY, **attributes: Any
) -> requests.Response:
    """POST /client/profiles: the public key as company_id, and no Authorization."""
    params = {"company_id": company_id}
    return call(emu, "POST", "/client/profiles", profile(**attributes), params=params, key=None)


def emails(emu: Emulator, account: str | None = None) -> list[str]:
    """The emails of an account's profiles (None: the first account)."""
    return [found["attributes"]["email"] for found in emu.profiles(account=account)]


def error_of(response: requests.Response) -> dict[str, Any]:
    errors = response.json()["errors"]
    assert len(errors) == 1
    error: dict[str, Any] = errors[0]
    assert set(error) == {"id", "status", "code", "title", "detail", "source", "links", "meta"}
    assert error["status"] == response.status_code
    return error


def _null_allowed(node: Any) -> Any:
    """OAS30Validator honours `nullable` only beside `type`; Klaviyo's spec also puts it
    beside `oneOf` (latitude) and `enum` (opt_in_process), so spell those out."""
    if isinstance(node, list):
        return [_null_allowed(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _null_allowed(value) for key, value in node.items()}
    if node.get("nullable") is True and "oneOf" in out:
        out["oneOf"] = [*out["oneOf"], {"enum": [None]}]
    if node.get("nullable") is True and "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


@cache
def _response_validator(operation_id: str, status: int) -> Any:
    op = openapi.operation(operation_id)
    responses = openapi.spec()["paths"][op.path][op.method.lower()]["responses"]
    ref = responses[str(status)]["content"][JSONAPI]["schema"]["$ref"]
    return OAS30Validator({"components": _null_allowed(openapi.spec()["components"]), "$ref": ref})


def assert_matches_spec(operation_id: str, response: requests.Response) -> None:
    """The response body has the shape the spec documents for its operation and status."""
    validator = _response_validator(operation_id, response.status_code)
    problems = [error.message for error in validator.iter_errors(response.json())]
    assert problems == []


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emu(clock: FakeClock) -> Iterator[Emulator]:
    with Emulator(private_key=PRIVATE_KEY, public_key=PUBLIC_KEY, clock=clock) as running:
        yield running


# Authentication and headers


def test_missing_authorization_is_not_authenticated(emu: Emulator) -> None:
    response = call(emu, "GET", "/api/profiles", key=None)
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/vnd.api+json"
    assert error_of(response)["code"] == "not_authenticated"
    assert emu.stats()["auth_failures"] == 1


def test_wrong_key_is_authentication_failed(emu: Emulator) -> None:
    response = call(emu, "POST", "/api/profile-import", profile(email="a@example.com"), key="pk_x")
    error = error_of(response)
    assert (response.status_code, error["code"]) == (401, "authentication_failed")
    assert error["title"] == "Incorrect authentication credentials."
    assert emu.profiles() == []
    assert emu.stats()["writes"] == 0


def test_any_key_is_accepted_when_none_is_configured() -> None:
    with Emulator() as open_emu:
        assert call(open_emu, "GET", "/api/profiles", key="pk_anything").status_code == 200
        assert call(open_emu, "GET", "/api/profiles", key=" ").status_code == 401


def test_client_endpoint_needs_the_public_key_not_the_private_one(emu: Emulator) -> None:
    body = profile(email="c@example.com")
    wrong = call(emu, "POST", "/client/profiles", body, params={"company_id": "nope"}, key=None)
    assert wrong.status_code == 400
    assert error_of(wrong)["source"] == {"parameter": "company_id"}
    right = call(emu, "POST", "/client/profiles", body, params={"company_id": PUBLIC_KEY}, key=None)
    assert (right.status_code, right.content) == (202, b"")
    assert [p["attributes"]["email"] for p in emu.profiles()] == ["c@example.com"]


@pytest.mark.parametrize("revision", [None, "2026-7-15", "2026-02-30", "latest"])
def test_revision_header_is_required_and_checked(emu: Emulator, revision: str | None) -> None:
    sent = headers()
    del sent["revision"]
    if revision is not None:
        sent["revision"] = revision
    response = requests.get(emu.url + "/api/profiles", headers=sent, timeout=5)
    assert response.status_code == 400
    assert error_of(response)["source"] == {"parameter": "revision"}


def test_revision_may_carry_a_suffix(emu: Emulator) -> None:
    extra = {"revision": "2026-07-15.pre"}
    assert call(emu, "GET", "/api/profiles", extra_headers=extra).status_code == 200


def test_json_bodies_need_the_jsonapi_content_type(emu: Emulator) -> None:
    extra = {"Content-Type": "application/json"}
    response = call(
        emu, "POST", "/api/profile-import", profile(email="a@example.com"), extra_headers=extra
    )
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"


def test_malformed_json_is_a_parse_error(emu: Emulator) -> None:
    response = requests.post(
        emu.url + "/api/profile-import", data=b"{not json", headers=headers(), timeout=5
    )
    assert (response.status_code, error_of(response)["code"]) == (400, "parse_error")


# Accounts


def test_get_accounts_shows_the_one_account_of_the_key(emu: Emulator, clock: FakeClock) -> None:
    response = call(emu, "GET", "/api/accounts")
    assert response.status_code == 200
    assert_matches_spec("get_accounts", response)
    (account,) = response.json()["data"]
    account_id = account["id"]
    assert re.fullmatch("[A-Za-z0-9]{6}", account_id)
    assert emu.account_ids() == [account_id]
    assert response.json()["links"] == {"self": emu.url + "/api/accounts"}
    assert account["links"] == {"self": f"{emu.url}/api/accounts/{account_id}/"}
    # Every attribute the spec documents, the optional ones too.
    schema = openapi.spec()["components"]["schemas"]["AccountResponseObjectResource"]
    attributes = account["attributes"]
    assert set(attributes) == set(schema["properties"]["attributes"]["properties"])
    assert attributes["public_api_key"] == PUBLIC_KEY
    name = attributes["contact_information"]["organization_name"]
    assert name == f"Emulated account {account_id}"
    # 1/s and 15/m, as documented.
    assert response.headers["RateLimit-Limit"] == "15"
    assert call(emu, "GET", "/api/accounts").status_code == 429
    clock.advance(1)
    sparse = call(emu, "GET", "/api/accounts", params={"fields[account]": "timezone"})
    assert sparse.status_code == 501
    assert error_of(sparse)["source"] == {"parameter": "fields[account]"}


def test_a_second_account_on_the_same_url_has_its_own_data(emu: Emulator) -> None:
    (first,) = emu.account_ids()
    second = emu.add_account(OTHER_KEY, OTHER_PUBLIC_KEY, name="Second Shop")
    assert emu.account_ids() == [first, second] and first != second
    upsert(emu, email="a@example.com", first_name="First")
    other = call(emu, "POST", "/api/profile-import", profile(email="a@example.com"), key=OTHER_KEY)
    assert other.status_code == 201  # the same email is another account's own profile
    assert client_upsert(emu, OTHER_PUBLIC_KEY, email="c@example.com").status_code == 202
    vips = emu.create_list("VIPs", account=second)
    members = {"data": [{"type": "profile", "id": other.json()["data"]["id"]}]}
    path = f"/api/lists/{vips}/relationships/profiles"
    assert call(emu, "POST", path, members).status_code == 404  # not the first account's list
    assert call(emu, "POST", path, members, key=OTHER_KEY).status_code == 204

    assert [p["attributes"]["first_name"] for p in emu.profiles()] == ["First"]
    assert emu.state()["lists"] == []
    assert emails(emu, second) == ["a@example.com", "c@example.com"]
    assert emu.list_members(vips, account=second) == {other.json()["data"]["id"]}
    assert emu.state(account=second)["lists"][0]["members"] == [other.json()["data"]["id"]]
    (shown,) = call(emu, "GET", "/api/accounts", key=OTHER_KEY).json()["data"]
    attributes = shown["attributes"]
    assert (shown["id"], attributes["public_api_key"]) == (second, OTHER_PUBLIC_KEY)
    assert attributes["contact_information"]["organization_name"] == "Second Shop"
    with pytest.raises(ValueError, match="no account 'nope00'"):
        emu.profiles(account="nope00")


def test_rate_limits_are_per_account(emu: Emulator) -> None:
    second = emu.add_account(OTHER_KEY)
    assert call(emu, "GET", "/api/accounts").status_code == 200
    assert call(emu, "GET", "/api/accounts").status_code == 429
    assert call(emu, "GET", "/api/accounts", key=OTHER_KEY).status_code == 200
    assert emu.stats()["retry_after_violations"] == 0  # the second account was not throttled
    emu.set_rate_limit("get_profiles", steady=1, account=second)
    assert [call(emu, "GET", "/api/profiles").status_code for _ in range(2)] == [200, 200]
    other = [call(emu, "GET", "/api/profiles", key=OTHER_KEY) for _ in range(2)]
    assert [response.status_code for response in other] == [200, 429]


def test_an_account_needs_keys_of_its_own(emu: Emulator) -> None:
    (first,) = emu.account_ids()
    with pytest.raises(ValueError, match=f"account {first} already has this private key") as taken:
        emu.add_account(PRIVATE_KEY)
    with pytest.raises(ValueError, match="public key"):
        emu.add_account(OTHER_KEY, PUBLIC_KEY)
    with pytest.raises(ValueError, match="must not be empty"):
        emu.add_account(" ")
    assert PRIVATE_KEY not in str(taken.value)
    assert emu.account_ids() == [first]
    second = emu.add_account(OTHER_KEY)
    # A made-up public key reaches the account, like a real one; other ones reach nothing.
    made_up = call(emu, "GET", "/api/accounts", key=OTHER_KEY).json()["data"][0]
    public = made_up["attributes"]["public_api_key"]
    assert re.fullmatch("[A-Za-z0-9]{6}", public)
    assert client_upsert(emu, public, email="c@example.com").status_code == 202
    assert client_upsert(emu, "nope", email="c@example.com").status_code == 400
    assert len(emu.profiles(account=second)) == 1
    assert call(emu, "GET", "/api/profiles", key="pk_nobodys").status_code == 401
    assert PRIVATE_KEY not in repr([hosted.account.identity for hosted in emu.app.accounts])


def test_an_open_first_account_takes_every_key_no_other_account_has() -> None:
    with Emulator(clock=FakeClock()) as emu:
        second = emu.add_account(OTHER_KEY, OTHER_PUBLIC_KEY)
        assert upsert(emu, email="a@example.com").status_code == 201  # any other key: the first
        body = profile(email="b@example.com")
        assert call(emu, "POST", "/api/profile-import", body, key=OTHER_KEY).status_code == 201
        assert client_upsert(emu, "any123", email="c@example.com").status_code == 202
        assert (emails(emu), emails(emu, second)) == (
            ["a@example.com", "c@example.com"],
            ["b@example.com"],
        )
        with pytest.raises(ValueError, match="only the first account"):
            emu.app.accounts.add(None)


def test_the_same_private_key_is_the_same_account_after_a_restart() -> None:
    ids = []
    for key in (PRIVATE_KEY, PRIVATE_KEY, OTHER_KEY):
        with Emulator(key) as emu:
            ids.append(call(emu, "GET", "/api/accounts", key=key).json()["data"][0]["id"])
    assert ids[0] == ids[1] != ids[2]


def test_every_operation_in_the_spec_is_routed_and_served_or_answers_501(emu: Emulator) -> None:
    unimplemented = []
    for operation in openapi.operations().values():
        path = re.sub("{[^}]+}", "x1", operation.path)
        assert openapi.match(operation.method, path) == (operation, ("x1",) * path.count("x1"))
        if operation.operation_id in ROUTES:
            continue
        unimplemented.append(operation.operation_id)
        response = call(emu, operation.method, path, {"data": {}})
        assert (response.status_code, error_of(response)["code"]) == (501, "not_implemented")
    assert unimplemented == []


# Validation against the spec


def test_unknown_attribute_is_refused_like_klaviyo(emu: Emulator) -> None:
    response = upsert(emu, email="a@example.com", foo="bar")
    error = error_of(response)
    assert response.status_code == 400
    assert error["code"] == "invalid"
    assert error["detail"] == "'foo' is not a valid field for the resource 'profile'."
    assert error["source"] == {"pointer": "/data/attributes/foo"}
    assert emu.stats()["spec_violations"] == 1
    assert emu.profiles() == []


def test_unknown_field_inside_a_bulk_record_points_at_the_record(emu: Emulator) -> None:
    records = [
        {"type": "profile", "attributes": {"email": "a@example.com"}},
        {"type": "profile", "attributes": {"email": "b@example.com", "last_nam": "x"}},
    ]
    body = {
        "data": {
            "type": "profile-bulk-import-job",
            "attributes": {"profiles": {"data": records}},
        }
    }
    error = error_of(call(emu, "POST", "/api/profile-bulk-import-jobs", body))
    assert error["source"] == {"pointer": "/data/attributes/profiles/data/1/attributes/last_nam"}


def test_wrong_type_is_refused_with_a_pointer(emu: Emulator) -> None:
    response = upsert(emu, email=42)
    assert response.status_code == 400
    assert error_of(response)["source"] == {"pointer": "/data/attributes/email"}


def test_nullable_and_free_form_fields_are_accepted(emu: Emulator) -> None:
    response = upsert(
        emu,
        email="a@example.com",
        location=None,
        properties={"nested": {"any": ["shape", 1, None]}, "free": True},
    )
    assert response.status_code == 201
    assert response.json()["data"]["attributes"]["properties"]["nested"] == {
        "any": ["shape", 1, None]
    }


@pytest.mark.parametrize(
    ("path", "size"), [("/api/profiles", 101), ("/api/profiles", 0), ("/api/lists", 11)]
)
def test_page_size_outside_the_documented_range_is_refused(
    emu: Emulator, path: str, size: int
) -> None:
    response = call(emu, "GET", path, params={"page[size]": size})
    assert response.status_code == 400
    assert error_of(response)["source"] == {"parameter": "page[size]"}
    assert emu.stats()["spec_violations"] == 1


def test_unknown_query_parameter_is_refused(emu: Emulator) -> None:
    response = call(emu, "GET", "/api/profiles", params={"pagesize": 5})
    assert response.status_code == 400
    assert error_of(response)["source"] == {"parameter": "pagesize"}


def test_validation_can_be_switched_off() -> None:
    with Emulator(validate=False) as loose:
        assert upsert(loose, email="a@example.com", foo="bar").status_code == 201


def test_operations_and_parameters_not_implemented_answer_501(emu: Emulator) -> None:
    whole_list = {
        "data": {
            "type": "profile-suppression-bulk-create-job",
            "attributes": {},
            "relationships": {"list": {"data": {"type": "list", "id": "VipLst"}}},
        }
    }
    suppress = call(emu, "POST", "/api/profile-suppression-bulk-create-jobs", whole_list)
    assert (suppress.status_code, error_of(suppress)["code"]) == (501, "not_implemented")
    sort = call(emu, "GET", "/api/profiles", params={"sort": "email"})
    assert sort.status_code == 501
    assert error_of(sort)["source"] == {"parameter": "sort"}


def test_unknown_path_and_wrong_method(emu: Emulator) -> None:
    assert call(emu, "GET", "/api/nothing-here").status_code == 404
    assert error_of(call(emu, "PUT", "/api/profiles"))["code"] == "method_not_allowed"


def test_a_10000_profile_bulk_import_validates() -> None:
    # How fast is the benchmark's business: a time limit here fails on a loaded machine.
    records = [
        {
            "type": "profile",
            "attributes": {
                "email": f"user{i}@example.com",
                "phone_number": "+12025550143",
                "external_id": f"ext-{i}",
                "first_name": "Sarah",
                "last_name": "Mason",
                "location": {"city": "New York", "zip": "10017", "latitude": 40.7},
                "properties": {"ltv": i * 1.5, "tier": "gold", "notes": "x" * 200},
            },
        }
        for i in range(10_000)
    ]
    body = {
        "data": {
            "type": "profile-bulk-import-job",
            "attributes": {"profiles": {"data": records}},
        }
    }
    raw = orjson.dumps(body)
    assert 3_000_000 < len(raw) < 5 * 1024 * 1024
    operation = openapi.operation("bulk_import_profiles")
    validation.prepare([operation])
    validation.check_body(operation, orjson.loads(raw))
    records[9_999]["attributes"]["nickname"] = "x"
    with pytest.raises(SpecViolation) as refused:
        validation.check_body(operation, body)
    assert refused.value.pointer == "/data/attributes/profiles/data/9999/attributes/nickname"


# Rate limits


def test_throttled_request_gets_retry_after_and_no_ratelimit_headers(
    emu: Emulator, clock: FakeClock
) -> None:
    emu.set_rate_limit("get_profiles", burst=100, steady=2)
    first = call(emu, "GET", "/api/profiles")
    clock.advance(10)
    second = call(emu, "GET", "/api/profiles")
    clock.advance(5.5)
    third = call(emu, "GET", "/api/profiles")
    assert [first.status_code, second.status_code] == [200, 200]
    assert [first.headers["RateLimit-Limit"], second.headers["RateLimit-Limit"]] == ["2", "2"]
    assert [first.headers["RateLimit-Remaining"], second.headers["RateLimit-Remaining"]] == [
        "1",
        "0",
    ]
    assert [first.headers["RateLimit-Reset"], second.headers["RateLimit-Reset"]] == ["60", "50"]
    assert (third.status_code, third.headers["Retry-After"]) == (429, "45")  # 44.5 s, rounded up
    assert not any(name.startswith("RateLimit") for name in third.headers)
    assert error_of(third)["code"] == "throttled"
    assert emu.stats()["throttled"] == 1


def test_a_window_never_says_it_lasts_longer_than_it_does() -> None:
    # At this reading, `opened + 60 - now` rounds to 60.00000000000001: it said 61.
    with Emulator(clock=FakeClock(52.66704452974954)) as emu:
        emu.set_rate_limit("get_profiles", burst=100, steady=1)
        allowed, throttled = call(emu, "GET", "/api/profiles"), call(emu, "GET", "/api/profiles")
        assert allowed.headers["RateLimit-Reset"] == "60"
        assert throttled.headers["Retry-After"] == "60"


def test_retrying_before_retry_after_is_a_violation(emu: Emulator) -> None:
    emu.set_rate_limit("get_profiles", burst=100, steady=1)
    call(emu, "GET", "/api/profiles")
    assert call(emu, "GET", "/api/profiles").status_code == 429
    call(emu, "GET", "/api/profiles")  # retried at once, ignoring Retry-After
    assert emu.stats()["retry_after_violations"] == 1


def test_waiting_for_retry_after_is_not_a_violation(emu: Emulator, clock: FakeClock) -> None:
    emu.inject(status=429, count=1, operation="get_profiles", retry_after=3)
    assert call(emu, "GET", "/api/profiles").headers["Retry-After"] == "3"
    clock.advance(2.5)
    assert call(emu, "GET", "/api/profiles").status_code == 200  # early: a violation
    clock.advance(0.5)
    assert call(emu, "GET", "/api/profiles").status_code == 200
    assert emu.stats()["retry_after_violations"] == 1


def test_steady_window_limits_too(emu: Emulator, clock: FakeClock) -> None:
    emu.set_rate_limit("get_lists", burst=100, steady=3)
    statuses = [call(emu, "GET", "/api/lists").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    clock.advance(59)
    assert call(emu, "GET", "/api/lists").headers["Retry-After"] == "1"
    clock.advance(1)
    reopened = call(emu, "GET", "/api/lists")
    assert (reopened.status_code, reopened.headers["RateLimit-Remaining"]) == (200, "2")


def test_documented_limits_apply_by_default_and_scale() -> None:
    # create_list is documented at 10/s; a scale of 0.2 leaves 2 per second.
    clock = FakeClock()
    with Emulator(rate_limits=0.2, clock=clock) as scaled:
        body = {"data": {"type": "list", "attributes": {"name": "L"}}}
        statuses = [call(scaled, "POST", "/api/lists", body).status_code for _ in range(3)]
        assert statuses == [201, 201, 429]
        clock.advance(1)
        assert call(scaled, "POST", "/api/lists", body).status_code == 201


def test_rate_limits_can_be_disabled() -> None:
    with Emulator(rate_limits=False) as unlimited:
        body = {"data": {"type": "list", "attributes": {"name": "L"}}}
        responses = [call(unlimited, "POST", "/api/lists", body) for _ in range(15)]
        assert {response.status_code for response in responses} == {201}
        assert "RateLimit-Limit" not in responses[0].headers


# Faults


def test_status_fault_hits_the_next_matching_requests_only(emu: Emulator) -> None:
    emu.inject(status=503, count=2, operation="create_or_update_profile")
    assert call(emu, "GET", "/api/profiles").status_code == 200
    first = upsert(emu, email="a@example.com")
    assert (first.status_code, error_of(first)["code"]) == (503, "service_unavailable")
    assert upsert(emu, email="a@example.com").status_code == 503
    assert emu.profiles() == []
    assert upsert(emu, email="a@example.com").status_code == 201


def test_a_fault_can_strike_only_requests_carrying_a_record_and_point_at_it(
    emu: Emulator,
) -> None:
    emu.inject(
        status=400, count=2, body_contains="poison@example.com", pointer="/data/attributes/email"
    )
    assert upsert(emu, email="fine@example.com").status_code == 201
    refused = upsert(emu, email="poison@example.com")
    assert refused.status_code == 400
    assert error_of(refused)["source"] == {"pointer": "/data/attributes/email"}
    assert upsert(emu, email="poison@example.com").status_code == 400
    assert upsert(emu, email="poison@example.com").status_code == 201  # count used up


def test_injected_429_carries_retry_after_and_counts(emu: Emulator) -> None:
    emu.inject(status=429, retry_after=3)
    response = call(emu, "GET", "/api/profiles")
    assert (response.status_code, response.headers["Retry-After"]) == (429, "3")
    call(emu, "GET", "/api/profiles")
    assert emu.stats()["throttled"] == 1
    assert emu.stats()["retry_after_violations"] == 1


def test_reset_drops_the_connection_without_processing(emu: Emulator) -> None:
    emu.inject(kind="reset", operation="create_or_update_profile")
    with pytest.raises(requests.ConnectionError):
        upsert(emu, email="a@example.com")
    assert emu.profiles() == []
    assert emu.request_log()[-1]["status"] is None
    assert upsert(emu, email="a@example.com").status_code == 201


def test_reset_after_processing_loses_only_the_answer(emu: Emulator) -> None:
    emu.inject(kind="reset", after=True)
    with pytest.raises(requests.ConnectionError):
        upsert(emu, email="a@example.com")
    assert [p["attributes"]["email"] for p in emu.profiles()] == ["a@example.com"]
    assert emu.stats()["writes"] == 1
    # The client's retry is an update of the same profile, not a duplicate.
    assert upsert(emu, email="a@example.com").status_code == 200


def test_status_fault_after_processing(emu: Emulator) -> None:
    emu.inject(status=500, after=True, operation="create_or_update_profile")
    assert upsert(emu, email="a@example.com").status_code == 500
    assert len(emu.profiles()) == 1


def test_delay_provokes_a_read_timeout(emu: Emulator) -> None:
    emu.inject(kind="delay", seconds=0.6, operation="get_profiles")
    with pytest.raises(requests.ReadTimeout):
        call(emu, "GET", "/api/profiles", timeout=0.2)
    assert call(emu, "GET", "/api/profiles", timeout=0.5).status_code == 200


def test_delay_after_processing_applies_the_write(emu: Emulator) -> None:
    emu.inject(kind="delay", seconds=0.6, after=True)
    with pytest.raises(requests.ReadTimeout):
        call(emu, "POST", "/api/profile-import", profile(email="a@example.com"), timeout=0.3)
    assert len(emu.profiles()) == 1


def test_malformed_answer_is_not_json(emu: Emulator) -> None:
    emu.inject(kind="malformed", operation="get_profiles")
    response = call(emu, "GET", "/api/profiles")
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def test_stuck_job_never_leaves_processing() -> None:
    clock = FakeClock()
    with Emulator(job_seconds=0.1, clock=clock) as emu:
        emu.inject(kind="job_stuck")
        body = {
            "data": {
                "type": "profile-bulk-import-job",
                "attributes": {"profiles": {"data": [profile(email="a@example.com")["data"]]}},
            }
        }
        stuck = call(emu, "POST", "/api/profile-bulk-import-jobs", body).json()["data"]["id"]
        healthy = call(emu, "POST", "/api/profile-bulk-import-jobs", body).json()["data"]["id"]
        clock.advance(24 * 3600)
        job = call(emu, "GET", f"/api/profile-bulk-import-jobs/{stuck}").json()["data"]
        assert job["attributes"]["status"] == "processing"
        done = call(emu, "GET", f"/api/profile-bulk-import-jobs/{healthy}").json()["data"]
        assert done["attributes"]["status"] == "complete"


def test_bad_fault_options_are_refused(emu: Emulator) -> None:
    with pytest.raises(ValueError):
        emu.inject(status=200)
    with pytest.raises(ValueError):
        emu.inject(status=503, operation="no_such_operation")
    with pytest.raises(ValueError):
        emu.inject(kind="job_stuck", operation="get_profiles")


# Telemetry and control endpoints


def test_the_log_and_state_never_show_the_keys(emu: Emulator) -> None:
    upsert(emu, email="a@example.com")
    call(emu, "GET", "/api/profiles", key=PRIVATE_KEY + "x")
    call(
        emu,
        "POST",
        "/client/profiles",
        profile(email="b@example.com"),
        params={"company_id": PUBLIC_KEY},
        key=None,
    )
    control = requests.get(emu.url + "/__emulator__/requests", timeout=5).text
    exposed = json.dumps([emu.request_log(), emu.state(), emu.stats()]) + control
    assert PRIVATE_KEY not in exposed
    assert PUBLIC_KEY not in exposed
    paths = [entry["path"] for entry in emu.request_log()]
    assert paths[-1] == "/client/profiles?company_id=%5Bredacted%5D"
    assert [entry["status"] for entry in emu.request_log()] == [201, 401, 202]


def test_stats_count_requests_and_writes_by_operation(emu: Emulator) -> None:
    upsert(emu, email="a@example.com")
    upsert(emu, email="b@example.com")
    call(emu, "GET", "/api/profiles")
    requests.get(emu.url + "/__emulator__/stats", timeout=5)
    stats = emu.stats()
    assert stats["requests_by_operation"] == {"create_or_update_profile": 2, "get_profiles": 1}
    assert stats["writes"] == 2


def test_control_endpoints(emu: Emulator) -> None:
    control = emu.url + "/__emulator__"
    created = requests.post(control + "/lists", json={"name": "VIPs"}, timeout=5)
    list_id = created.json()["id"]
    assert created.status_code == 201
    state = requests.get(control + "/state", timeout=5).json()
    assert state["lists"] == [
        {"id": list_id, "name": "VIPs", "opt_in_process": None, "members": []}
    ]
    fault = {"status": 502, "operation": "get_list"}
    assert requests.post(control + "/faults", json=fault, timeout=5).status_code == 204
    assert call(emu, "GET", f"/api/lists/{list_id}").status_code == 502
    bad = requests.post(control + "/faults", json={"kind": "nonsense"}, timeout=5)
    assert bad.status_code == 400
    account = {"private_key": OTHER_KEY, "name": "Other"}
    added = requests.post(control + "/accounts", json=account, timeout=5)
    other = added.json()["id"]
    assert (added.status_code, emu.account_ids()[1]) == (201, other)
    assert requests.post(control + "/accounts", json=account, timeout=5).status_code == 400
    theirs = requests.post(control + "/lists", json={"name": "Theirs", "account": other}, timeout=5)
    assert emu.list_members(theirs.json()["id"], account=other) == set()
    state = requests.get(control + "/state", params={"account": other}, timeout=5).json()
    assert [item["name"] for item in state["lists"]] == ["Theirs"]
    assert (
        requests.get(control + "/state", params={"account": "nope00"}, timeout=5).status_code == 400
    )
    assert requests.post(control + "/reset", timeout=5).status_code == 204
    assert emu.state()["lists"] == []
    assert emu.state(account=other)["lists"] == []  # the account stays, emptied
    assert emu.stats()["requests_by_operation"] == {}


def test_module_entry_point_serves_until_stopped() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "dbt_klaviyo_sync.emulator", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:")
        response = requests.get(url + "/api/profiles", headers=headers(), timeout=5)
        assert response.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=5)


# Klaviyo semantics


def attributes_of(response: requests.Response) -> dict[str, Any]:
    found: dict[str, Any] = response.json()["data"]["attributes"]
    return found


def only_profile(emu: Emulator) -> dict[str, Any]:
    (found,) = emu.profiles()
    return found


# POST /api/profile-import


def test_upsert_creates_with_201_then_updates_with_200(emu: Emulator) -> None:
    created = upsert(emu, email="sarah@example.com", first_name="Sarah")
    assert created.status_code == 201
    assert_matches_spec("create_or_update_profile", created)
    updated = upsert(emu, email="sarah@example.com", last_name="Mason")
    assert updated.status_code == 200
    assert updated.json()["data"]["id"] == created.json()["data"]["id"]
    assert attributes_of(updated)["first_name"] == "Sarah"
    assert attributes_of(updated)["last_name"] == "Mason"
    assert len(emu.profiles()) == 1


def test_emails_match_whatever_their_case(emu: Emulator) -> None:
    upsert(emu, email="Sarah@Example.com")
    assert upsert(emu, email="sarah@example.COM").status_code == 200
    assert len(emu.profiles()) == 1


def test_null_clears_and_omitted_keeps(emu: Emulator) -> None:
    upsert(
        emu,
        external_id="u1",
        first_name="Sarah",
        last_name="Mason",
        location={"city": "New York", "zip": "10017"},
    )
    upsert(emu, external_id="u1", last_name=None, location={"zip": "10018", "city": None})
    attributes = only_profile(emu)["attributes"]
    assert attributes["first_name"] == "Sarah"
    assert attributes["last_name"] is None
    assert attributes["location"]["zip"] == "10018"
    assert attributes["location"]["city"] is None
    upsert(emu, external_id="u1", location=None)
    assert set(only_profile(emu)["attributes"]["location"].values()) == {None}


def test_an_unchanged_resend_keeps_updated(emu: Emulator, clock: FakeClock) -> None:
    first = attributes_of(upsert(emu, external_id="u1", first_name="A"))
    clock.advance(1)
    again = attributes_of(upsert(emu, external_id="u1", first_name="A"))
    clock.advance(1)
    changed = attributes_of(upsert(emu, external_id="u1", first_name="B"))
    assert [first["updated"], again["updated"], changed["updated"]] == [at(0), at(0), at(2)]
    assert changed["created"] == at(0)


def test_properties_merge_key_by_key_and_unset_removes(emu: Emulator) -> None:
    upsert(emu, external_id="u1", properties={"a": 1, "b": 2, "c": 3, "d": 4})
    upsert(emu, external_id="u1", properties={"a": 10, "e": None})
    assert only_profile(emu)["attributes"]["properties"] == {
        "a": 10,
        "b": 2,
        "c": 3,
        "d": 4,
        "e": None,
    }
    one = profile(external_id="u1")
    one["data"]["meta"] = {"patch_properties": {"unset": "b"}}
    call(emu, "POST", "/api/profile-import", one)
    several = profile(external_id="u1")
    several["data"]["meta"] = {"patch_properties": {"unset": ["c", "d"]}}
    call(emu, "POST", "/api/profile-import", several)
    assert only_profile(emu)["attributes"]["properties"] == {"a": 10, "e": None}


def test_append_and_unappend_edit_array_properties(emu: Emulator) -> None:
    upsert(emu, external_id="u1", properties={"skus": ["1"]})
    body = profile(external_id="u1")
    body["data"]["meta"] = {"patch_properties": {"append": {"skus": ["2", "3"], "new": "x"}}}
    call(emu, "POST", "/api/profile-import", body)
    body["data"]["meta"] = {"patch_properties": {"unappend": {"skus": "2"}}}
    call(emu, "POST", "/api/profile-import", body)
    assert only_profile(emu)["attributes"]["properties"] == {"skus": ["1", "3"], "new": ["x"]}


def test_identifiers_of_two_profiles_conflict_with_409(emu: Emulator) -> None:
    upsert(emu, email="a@example.com")
    other = upsert(emu, phone_number="+12025550143").json()["data"]["id"]
    response = upsert(emu, email="a@example.com", phone_number="+12025550143", first_name="X")
    assert response.status_code == 409
    error = error_of(response)
    assert {key: error[key] for key in ("status", "code", "title", "detail", "source", "meta")} == {
        "status": 409,
        "code": "duplicate_profile",
        "title": "Conflict.",
        "detail": "A profile already exists with one of these identifiers.",
        "source": {"pointer": "/data/attributes"},
        "meta": {"duplicate_profile_id": other},
    }
    assert {p["attributes"]["first_name"] for p in emu.profiles()} == {None}


def test_an_unowned_identifier_is_set_on_the_matched_profile(emu: Emulator) -> None:
    upsert(emu, external_id="u1", email="old@example.com")
    response = upsert(emu, external_id="u1", email="new@example.com", phone_number="+12025550143")
    assert response.status_code == 200
    attributes = attributes_of(response)
    assert (attributes["email"], attributes["phone_number"]) == (
        "new@example.com",
        "+12025550143",
    )
    # The old email is free again: it now creates a profile of its own.
    assert upsert(emu, email="old@example.com").status_code == 201


def test_upsert_by_klaviyo_id(emu: Emulator) -> None:
    profile_id = upsert(emu, external_id="u1").json()["data"]["id"]
    body = profile(email="set@example.com")
    body["data"]["id"] = profile_id
    assert call(emu, "POST", "/api/profile-import", body).status_code == 200
    assert only_profile(emu)["attributes"]["email"] == "set@example.com"
    body["data"]["id"] = "01UNKNOWN0000000000000000"
    missing = call(emu, "POST", "/api/profile-import", body)
    assert (missing.status_code, error_of(missing)["source"]) == (404, {"pointer": "/data/id"})


def test_upsert_by_id_with_another_profiles_email_is_404(emu: Emulator) -> None:
    # API.md §5: reported as 404 not_found, not 409, when the id is given.
    profile_id = upsert(emu, external_id="u1").json()["data"]["id"]
    upsert(emu, email="taken@example.com")
    body = profile(email="taken@example.com")
    body["data"]["id"] = profile_id
    response = call(emu, "POST", "/api/profile-import", body)
    assert (response.status_code, error_of(response)["code"]) == (404, "not_found")


@pytest.mark.parametrize(
    ("attributes", "pointer", "detail"),
    [
        ({"email": "not-an-email"}, "/data/attributes/email", None),
        (
            {"phone_number": "+1555"},
            "/data/attributes/phone_number",
            "+1555 is not a valid phone number.",
        ),
        ({"phone_number": "2025550143"}, "/data/attributes/phone_number", None),
        # Klaviyo verifies that numbers are *sent* in E.164 (klaviyo-api-python#48).
        ({"phone_number": "+1 202 555 0143"}, "/data/attributes/phone_number", None),
        ({"phone_number": "+2345678900"}, "/data/attributes/phone_number", None),
        ({"email": " a@example.com"}, "/data/attributes/email", None),
        ({"first_name": "No identifier"}, "/data/attributes", None),
    ],
)
def test_invalid_records_are_refused(
    emu: Emulator, attributes: dict[str, Any], pointer: str, detail: str | None
) -> None:
    response = upsert(emu, **attributes)
    error = error_of(response)
    assert (response.status_code, error["code"], error["source"]) == (
        400,
        "invalid",
        {"pointer": pointer},
    )
    if detail is not None:
        assert error["detail"] == detail
    assert emu.profiles() == []


def test_phone_numbers_are_stored_as_sent(emu: Emulator) -> None:
    upsert(emu, phone_number="+12025550143")
    assert only_profile(emu)["attributes"]["phone_number"] == "+12025550143"


def test_a_body_over_100kb_is_refused(emu: Emulator) -> None:
    response = upsert(emu, email="a@example.com", properties={"blob": "x" * 110_000})
    assert response.status_code == 413
    assert emu.profiles() == []


# POST /client/profiles


def test_client_upsert_does_not_change_existing_identifiers(emu: Emulator) -> None:
    upsert(emu, external_id="u1", email="old@example.com")
    response = client_upsert(
        emu, external_id="u1", email="new@example.com", phone_number="+12025550143", title="CEO"
    )
    assert (response.status_code, response.content) == (202, b"")
    attributes = only_profile(emu)["attributes"]
    assert attributes["email"] == "old@example.com"  # an existing identifier stays
    assert attributes["phone_number"] == "+12025550143"  # an empty one is filled in
    assert attributes["title"] == "CEO"


def test_client_upsert_accepts_conflicts_without_applying_them(emu: Emulator) -> None:
    """Klaviyo answers 202 and does not apply the identifier (API.md §2.3), where it
    answers profile-import with 409: the conflict cannot be seen from the answer."""
    first = upsert(emu, email="a@example.com").json()["data"]["id"]
    upsert(emu, external_id="u2")
    response = client_upsert(emu, email="a@example.com", external_id="u2", title="CEO")
    assert (response.status_code, response.content) == (202, b"")
    by_id = {found["id"]: found["attributes"] for found in emu.profiles()}
    assert (by_id[first]["external_id"], by_id[first]["title"]) == (None, "CEO")
    assert sorted(a["external_id"] or "" for a in by_id.values()) == ["", "u2"]
    # A resource id that names no profile changes nothing, with a 202 all the same.
    body = profile(email="z@example.com")
    body["data"]["id"] = "01NOSUCHPROFILE0000000000"
    lost = call(emu, "POST", "/client/profiles", body, params={"company_id": PUBLIC_KEY}, key=None)
    assert lost.status_code == 202
    assert "z@example.com" not in emails(emu)


def test_client_upsert_refuses_bad_records_at_once(emu: Emulator) -> None:
    for attributes in ({"email": "nope"}, {"phone_number": "+1 202 555 0143"}, {"title": "x"}):
        assert client_upsert(emu, **attributes).status_code == 400
    assert emu.profiles() == []


# PATCH /api/profiles/{id}


def patch(emu: Emulator, profile_id: str, **attributes: Any) -> requests.Response:
    body = {"data": {"type": "profile", "id": profile_id, "attributes": attributes}}
    return call(emu, "PATCH", f"/api/profiles/{profile_id}", body)


def test_patch_updates_by_id(emu: Emulator) -> None:
    profile_id = upsert(emu, email="a@example.com", first_name="A").json()["data"]["id"]
    response = patch(emu, profile_id, email="b@example.com", first_name=None)
    assert response.status_code == 200
    assert_matches_spec("update_profile", response)
    assert (attributes_of(response)["email"], attributes_of(response)["first_name"]) == (
        "b@example.com",
        None,
    )


def test_patch_errors(emu: Emulator) -> None:
    first = upsert(emu, email="a@example.com").json()["data"]["id"]
    upsert(emu, email="b@example.com")
    conflict = patch(emu, first, email="b@example.com")
    assert conflict.status_code == 409
    assert error_of(conflict)["code"] == "duplicate_profile"
    assert patch(emu, "01NOPE00000000000000000000", first_name="x").status_code == 404
    body = {"data": {"type": "profile", "id": "other", "attributes": {}}}
    assert call(emu, "PATCH", f"/api/profiles/{first}", body).status_code == 400


# GET /api/profiles


def test_filters_equals_and_any(emu: Emulator) -> None:
    for i in range(5):
        upsert(emu, email=f"u{i}@example.com", external_id=f"e{i}")
    found = call(
        emu,
        "GET",
        "/api/profiles",
        params={"filter": 'any(email,["u1@example.com","u3@example.com"])'},
    )
    assert_matches_spec("get_profiles", found)
    assert sorted(p["attributes"]["external_id"] for p in found.json()["data"]) == ["e1", "e3"]
    one = call(emu, "GET", "/api/profiles", params={"filter": 'equals(external_id,"e4")'})
    (match,) = one.json()["data"]
    by_id = call(emu, "GET", "/api/profiles", params={"filter": f'equals(id,"{match["id"]}")'})
    assert [p["id"] for p in by_id.json()["data"]] == [match["id"]]
    both = 'equals(email,"u2@example.com"),equals(external_id,"e3")'
    assert call(emu, "GET", "/api/profiles", params={"filter": both}).json()["data"] == []


@pytest.mark.parametrize(
    "bad",
    ['equals(first_name,"A")', 'greater-than(created,"2024-01-01")', "equals(email,", "email"],
)
def test_unsupported_or_malformed_filters_are_refused(emu: Emulator, bad: str) -> None:
    response = call(emu, "GET", "/api/profiles", params={"filter": bad})
    assert response.status_code == 400
    assert error_of(response)["source"] == {"parameter": "filter"}


def test_cursor_pagination_through_next_links(emu: Emulator) -> None:
    for i in range(25):
        upsert(emu, external_id=f"e{i}")
    seen: list[str] = []
    url: str | None = "/api/profiles?page%5Bsize%5D=10"
    pages = 0
    while url is not None:
        document = call(emu, "GET", url).json()
        seen += [p["attributes"]["external_id"] for p in document["data"]]
        url = document["links"].get("next")
        pages += 1
    assert pages == 3
    assert seen == [f"e{i}" for i in range(25)]
    default = call(emu, "GET", "/api/profiles").json()
    assert len(default["data"]) == 20
    assert default["links"]["next"].startswith(emu.url + "/api/profiles?")
    bad = call(emu, "GET", "/api/profiles", params={"page[cursor]": "garbage"})
    assert bad.status_code == 400


# Bulk import jobs


def job_body(records: list[dict[str, Any]], list_id: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": "profile-bulk-import-job",
        "attributes": {
            "profiles": {"data": [{"type": "profile", "attributes": r} for r in records]}
        },
    }
    if list_id is not None:
        data["relationships"] = {"lists": {"data": [{"type": "list", "id": list_id}]}}
    return {"data": data}


def job_status(emu: Emulator, job_id: str) -> dict[str, Any]:
    return attributes_of(call(emu, "GET", f"/api/profile-bulk-import-jobs/{job_id}"))


def test_bulk_job_lifecycle_errors_and_list(clock: FakeClock) -> None:
    with Emulator(rate_limits=False, job_seconds=2.0, clock=clock) as emu:
        vips = emu.create_list("VIPs")
        upsert(emu, email="taken@example.com")
        upsert(emu, external_id="taken")
        records: list[dict[str, Any]] = [
            {"email": "a@example.com", "properties": {"tier": "gold"}},
            {"email": "c@example.com"},
            {"email": "taken@example.com", "external_id": "taken"},
        ]
        created = call(emu, "POST", "/api/profile-bulk-import-jobs", job_body(records, vips))
        assert created.status_code == 202
        assert_matches_spec("bulk_import_profiles", created)
        job_id = created.json()["data"]["id"]
        assert attributes_of(created)["status"] == "queued"
        clock.advance(0.75)
        assert job_status(emu, job_id)["status"] == "queued"
        clock.advance(0.25)  # half-way: processing, nothing imported yet
        assert job_status(emu, job_id)["status"] == "processing"
        assert len(emu.profiles()) == 2
        clock.advance(0.75)
        assert job_status(emu, job_id)["status"] == "processing"
        clock.advance(0.25)
        done = job_status(emu, job_id)
        assert {
            k: done[k] for k in ("status", "total_count", "completed_count", "failed_count")
        } == {
            "status": "complete",
            "total_count": 3,
            "completed_count": 2,
            "failed_count": 1,
        }
        assert [done["created_at"], done["started_at"], done["completed_at"]] == [
            at(0),
            at(1),
            at(2),
        ]

        errors = call(emu, "GET", f"/api/profile-bulk-import-jobs/{job_id}/import-errors")
        assert_matches_spec("get_errors_for_bulk_import_profiles_job", errors)
        found = [e["attributes"] for e in errors.json()["data"]]
        assert [(e["code"], e["source"]["pointer"]) for e in found] == [
            ("duplicate_profile", "/data/attributes/profiles/data/2/attributes"),
        ]
        assert found[0]["original_payload"] == records[2]

        job_profiles = call(emu, "GET", f"/api/profile-bulk-import-jobs/{job_id}/profiles")
        emails = sorted(p["attributes"]["email"] for p in job_profiles.json()["data"])
        assert emails == ["a@example.com", "c@example.com"]
        ids = call(
            emu, "GET", f"/api/profile-bulk-import-jobs/{job_id}/relationships/profiles"
        ).json()["data"]
        assert emu.list_members(vips) == {item["id"] for item in ids}
        by_email = {p["attributes"]["email"]: p for p in emu.profiles()}
        assert by_email["a@example.com"]["attributes"]["properties"] == {"tier": "gold"}


def test_import_errors_are_paginated() -> None:
    with Emulator(rate_limits=False) as emu:
        for i in range(3):
            upsert(emu, email=f"u{i}@example.com")
            upsert(emu, external_id=f"u{i}")
        records = [{"email": f"u{i}@example.com", "external_id": f"u{i}"} for i in range(3)]
        created = call(emu, "POST", "/api/profile-bulk-import-jobs", job_body(records))
        job_id = created.json()["data"]["id"]
        first = call(
            emu,
            "GET",
            f"/api/profile-bulk-import-jobs/{job_id}/import-errors",
            params={"page[size]": 2},
        ).json()
        second = call(emu, "GET", first["links"]["next"]).json()
        pointers = [e["attributes"]["source"]["pointer"] for e in first["data"] + second["data"]]
        assert pointers == [f"/data/attributes/profiles/data/{i}/attributes" for i in range(3)]
        assert "next" not in second["links"]


def test_a_job_completes_without_being_polled(clock: FakeClock) -> None:
    with Emulator(rate_limits=False, job_seconds=0.2, clock=clock) as emu:
        records = [{"external_id": f"e{i}"} for i in range(3)]
        call(emu, "POST", "/api/profile-bulk-import-jobs", job_body(records))
        assert emu.profiles() == []
        clock.advance(0.2)
        assert len(emu.profiles()) == 3
        assert emu.state()["bulk_jobs"][0]["status"] == "complete"


def test_a_job_with_invalid_profiles_is_refused_at_once_pointing_at_each(emu: Emulator) -> None:
    """Klaviyo validates a job when it is created: a 400 whose pointers name the bad
    profiles, and nothing imported, instead of import errors later (API.md §3)."""
    records: list[dict[str, Any]] = [
        {"external_id": "ok"},
        {"external_id": "big", "properties": {"blob": "x" * 103_000}},
        {"email": "not-an-email"},
        {"phone_number": "+1555"},
        {"first_name": "No identifier"},
    ]
    response = call(emu, "POST", "/api/profile-bulk-import-jobs", job_body(records))
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert [(e["code"], e["source"]["pointer"]) for e in errors] == [
        ("invalid", "/data/attributes/profiles/data/1"),
        ("invalid", "/data/attributes/profiles/data/2/attributes/email"),
        ("invalid", "/data/attributes/profiles/data/3/attributes/phone_number"),
        ("invalid", "/data/attributes/profiles/data/4/attributes"),
    ]
    assert errors[2]["detail"] == "+1555 is not a valid phone number."
    assert (emu.state()["bulk_jobs"], emu.profiles()) == ([], [])


def test_more_than_10000_profiles_are_refused(emu: Emulator) -> None:
    records = [{"external_id": str(i)} for i in range(10_001)]
    response = call(emu, "POST", "/api/profile-bulk-import-jobs", job_body(records))
    assert response.status_code == 400
    assert error_of(response)["source"] == {"pointer": "/data/attributes/profiles/data"}
    assert emu.state()["bulk_jobs"] == []


def test_more_than_5mb_is_refused(emu: Emulator) -> None:
    records = [{"external_id": str(i), "properties": {"blob": "x" * 90_000}} for i in range(60)]
    assert call(emu, "POST", "/api/profile-bulk-import-jobs", job_body(records)).status_code == 413


def test_bulk_job_to_an_unknown_list_is_refused(emu: Emulator) -> None:
    records = [{"external_id": "u1"}]
    response = call(emu, "POST", "/api/profile-bulk-import-jobs", job_body(records, "NoSuch"))
    assert response.status_code == 404
    assert emu.state()["bulk_jobs"] == []


def test_unknown_job_is_404(emu: Emulator) -> None:
    assert call(emu, "GET", "/api/profile-bulk-import-jobs/nope").status_code == 404


# Lists


def test_lists_create_read_and_filter(emu: Emulator) -> None:
    created = call(
        emu, "POST", "/api/lists", {"data": {"type": "list", "attributes": {"name": "VIPs"}}}
    )
    assert created.status_code == 201
    assert_matches_spec("create_list", created)
    list_id = created.json()["data"]["id"]
    emu.create_list("Other")
    fetched = call(emu, "GET", f"/api/lists/{list_id}")
    assert fetched.json()["data"]["attributes"]["name"] == "VIPs"
    named = call(emu, "GET", "/api/lists", params={"filter": 'equals(name,"VIPs")'}).json()
    assert [item["id"] for item in named["data"]] == [list_id]
    assert call(emu, "GET", "/api/lists/NoSuch").status_code == 404


def test_list_membership_add_remove_and_read(emu: Emulator) -> None:
    list_id = emu.create_list("VIPs")
    ids = [upsert(emu, external_id=f"e{i}").json()["data"]["id"] for i in range(3)]
    members = {"data": [{"type": "profile", "id": i} for i in ids]}
    added = call(emu, "POST", f"/api/lists/{list_id}/relationships/profiles", members)
    assert (added.status_code, added.content) == (204, b"")
    assert emu.list_members(list_id) == set(ids)
    one = {"data": [{"type": "profile", "id": ids[0]}]}
    removed = call(emu, "DELETE", f"/api/lists/{list_id}/relationships/profiles", one)
    assert removed.status_code == 204
    assert emu.list_members(list_id) == set(ids[1:])
    listed = call(emu, "GET", f"/api/lists/{list_id}/relationships/profiles").json()["data"]
    assert [item["id"] for item in listed] == ids[1:]
    assert emu.state()["lists"][0]["members"] == ids[1:]


def test_list_members_as_profiles_page_filter_and_sparse_fields(
    emu: Emulator, clock: FakeClock
) -> None:
    list_id = emu.create_list("VIPs")
    ids = [upsert(emu, email=f"m{i}@example.com").json()["data"]["id"] for i in range(5)]
    path = f"/api/lists/{list_id}/relationships/profiles"
    for i in ids:
        call(emu, "POST", path, {"data": [{"type": "profile", "id": i}]})
        clock.advance(1)
    call(emu, "POST", path, {"data": [{"type": "profile", "id": ids[0]}]})  # joined already

    first = call(emu, "GET", f"/api/lists/{list_id}/profiles", params={"page[size]": 2})
    assert first.status_code == 200
    assert_matches_spec("get_profiles_for_list", first)
    page = first.json()
    assert [p["id"] for p in page["data"]] == ids[:2]
    assert [p["attributes"]["joined_group_at"] for p in page["data"]] == [at(0), at(1)]
    seen = [p["id"] for p in page["data"]]
    while "next" in page["links"]:
        page = call(emu, "GET", page["links"]["next"]).json()
        seen += [p["id"] for p in page["data"]]
    assert seen == ids

    sparse = call(
        emu,
        "GET",
        f"/api/lists/{list_id}/profiles",
        params={"fields[profile]": "email,location.city", "page[size]": 100},
    ).json()["data"]
    assert sparse[0]["attributes"] == {"email": "m0@example.com", "location": {"city": None}}
    found = call(
        emu,
        "GET",
        f"/api/lists/{list_id}/profiles",
        params={"filter": 'any(email,["M3@example.com","nobody@example.com"])'},
    ).json()["data"]
    assert [p["id"] for p in found] == [ids[3]]
    too_big = call(emu, "GET", f"/api/lists/{list_id}/profiles", params={"page[size]": 101})
    assert too_big.status_code == 400
    assert call(emu, "GET", "/api/lists/NoSuch/profiles").status_code == 404


def test_list_membership_limits_and_unknowns(emu: Emulator) -> None:
    list_id = emu.create_list("VIPs")
    known = upsert(emu, external_id="e").json()["data"]["id"]
    path = f"/api/lists/{list_id}/relationships/profiles"
    too_many = {"data": [{"type": "profile", "id": known}] * 1001}
    response = call(emu, "POST", path, too_many)
    assert (response.status_code, error_of(response)["source"]) == (400, {"pointer": "/data"})
    unknown_profile = {"data": [{"type": "profile", "id": known}, {"type": "profile", "id": "x"}]}
    response = call(emu, "POST", path, unknown_profile)
    assert (response.status_code, error_of(response)["source"]) == (404, {"pointer": "/data/1/id"})
    assert emu.list_members(list_id) == set()
    members = {"data": [{"type": "profile", "id": known}]}
    assert call(emu, "POST", "/api/lists/NoSuch/relationships/profiles", members).status_code == 404
