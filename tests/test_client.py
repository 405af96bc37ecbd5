"""The Klaviyo client against the emulator over HTTP: typed answers and errors, retries,
429s as pacing within --max-wait, the total deadline per attempt, redirects refused,
stopping, answers that miss fields; and the emulator's hostile-server faults themselves.

Waits run on a fake clock (`client()` gives an autojump one), so nothing here sleeps for a
Retry-After or a backoff and no assertion depends on the machine's speed. The tests that
need real sockets and real time (deadlines, the emulator's own rate limits) assert on
outcomes, with deadlines far from the times that decide them.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
import requests

from dbt_klaviyo_sync.clock import Clock, FakeClock
from dbt_klaviyo_sync.emulator import Emulator
from dbt_klaviyo_sync.errors import (
    ConfigurationError,
    CredentialsError,
    Interrupted,
    RedirectRefused,
    TransientApiError,
    UnexpectedAnswer,
)
from dbt_klaviyo_sync.klaviyo import lists
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient, KlaviyoRejected, check_base_url, dig
from dbt_klaviyo_sync.klaviyo.client import _retry_after as retry_after
from dbt_klaviyo_sync.klaviyo.openapi import REVISION, operation
from dbt_klaviyo_sync.klaviyo.pacing import WaitTooLong
from dbt_klaviyo_sync.spec import FieldMap, SyncSpec
from tests.conftest import PRIVATE_KEY, PUBLIC_KEY
from tests.test_pacing import InThread, until


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(private_key=PRIVATE_KEY, public_key=PUBLIC_KEY) as emu:
        yield emu
        assert emu.stats()["spec_violations"] == 0


def client(emulator: Emulator, clock: Clock | None = None, **options: Any) -> KlaviyoClient:
    """A client whose waits jump a fake clock forward instead of sleeping."""
    return KlaviyoClient(
        emulator.url,
        PRIVATE_KEY,
        PUBLIC_KEY,
        clock=clock or FakeClock(autojump=True),
        **options,
    )


def profile(email: str, **attributes: object) -> bytes:
    return orjson.dumps({"data": {"type": "profile", "attributes": {"email": email, **attributes}}})


# Answers and errors


def test_a_created_profile_comes_back_with_its_id(emulator: Emulator) -> None:
    answer = client(emulator).call("create_or_update_profile", body=profile("a@example.com"))
    assert dig(answer, "data", "id", operation="x") == emulator.profiles()[0]["id"]


def test_a_refused_record_is_a_typed_rejection_with_klaviyos_detail(emulator: Emulator) -> None:
    with pytest.raises(KlaviyoRejected) as caught:
        client(emulator).call(
            "create_or_update_profile", body=profile("a@example.com", phone_number="+1555")
        )
    assert caught.value.status == 400
    assert "+1555" in caught.value.detail
    assert caught.value.errors[0].pointer == "/data/attributes/phone_number"


def test_a_wrong_key_stops_with_a_message_that_does_not_contain_it(emulator: Emulator) -> None:
    wrong = KlaviyoClient(emulator.url, "pk_wrong_key_123456", None)
    with pytest.raises(CredentialsError) as caught:
        wrong.call("get_profiles")
    assert "KLAVIYO_PRIVATE_API_KEY" in str(caught.value)
    assert "pk_wrong_key_123456" not in str(caught.value)


def test_the_client_endpoint_sends_the_public_key_and_never_the_private_one(
    emulator: Emulator,
) -> None:
    client(emulator).call("create_client_profile", body=profile("c@example.com"))
    assert emulator.profiles()[0]["attributes"]["email"] == "c@example.com"
    assert PRIVATE_KEY not in str(emulator.request_log())


def test_a_wrong_public_key_stops_the_run_instead_of_rejecting_every_record(
    emulator: Emulator,
) -> None:
    wrong = KlaviyoClient(emulator.url, None, "Wrong1")
    with pytest.raises(CredentialsError) as caught:
        wrong.call("create_client_profile", body=profile("c@example.com"))
    assert "KLAVIYO_PUBLIC_API_KEY" in str(caught.value) and "Wrong1" not in str(caught.value)


# Retries


def test_server_errors_resets_and_bad_bodies_are_retried(emulator: Emulator) -> None:
    emulator.inject(status=503, count=1, operation="get_profiles")
    emulator.inject(kind="reset", count=1, operation="get_profiles")
    emulator.inject(kind="malformed", count=1, operation="get_profiles")
    retried = client(emulator)
    assert retried.call("get_profiles")["data"] == []
    assert retried.requests_made == 4


def test_an_answer_that_never_reads_as_json_is_an_unexpected_answer(emulator: Emulator) -> None:
    emulator.inject(kind="malformed", count=2, operation="get_profiles")
    with pytest.raises(UnexpectedAnswer, match=r"get_profiles: .* not JSON"):
        client(emulator, max_attempts=2).call("get_profiles")


def test_a_read_timeout_is_retried(emulator: Emulator) -> None:
    emulator.inject(kind="delay", seconds=5.0, count=1, operation="get_profiles")
    impatient = client(emulator, timeout=(5.0, 1.0))
    assert impatient.call("get_profiles")["data"] == []
    assert impatient.requests_made == 2


def test_a_lost_answer_is_retried_without_harm(emulator: Emulator) -> None:
    emulator.inject(status=503, count=1, operation="create_or_update_profile", after=True)
    client(emulator).call("create_or_update_profile", body=profile("a@x.com"))
    assert len(emulator.profiles()) == 1


def test_retries_are_bounded(emulator: Emulator) -> None:
    emulator.inject(status=500, count=10, operation="get_profiles")
    bounded = client(emulator, max_attempts=3)
    with pytest.raises(TransientApiError):
        bounded.call("get_profiles")
    assert bounded.requests_made == 3


def test_retry_backoff_waits_on_the_clients_clock(emulator: Emulator) -> None:
    emulator.inject(status=500, count=2, operation="get_profiles")
    clock = FakeClock(autojump=True)
    client(emulator, clock, max_backoff=30.0).call("get_profiles")
    assert 0 < clock.now() <= 0.5 + 1.0  # two full-jitter backoffs, of at most 0.5 and 1 s


def test_after_three_failed_requests_the_rest_of_the_run_fails_fast(emulator: Emulator) -> None:
    emulator.inject(status=500, count=6, operation="get_profiles")
    flaky = client(emulator, max_attempts=2)
    for _ in range(3):
        with pytest.raises(TransientApiError):
            flaky.call("get_profiles")
    assert flaky.requests_made == 6
    with pytest.raises(TransientApiError, match="next run"):
        flaky.call("get_lists")
    assert flaky.requests_made == 6  # nothing more was sent


def test_a_success_resets_the_count_of_failures(emulator: Emulator) -> None:
    emulator.inject(status=500, count=6, operation="get_profiles")
    flaky = client(emulator, max_attempts=2)
    for _ in range(2):
        with pytest.raises(TransientApiError):
            flaky.call("get_profiles")
    flaky.call("get_lists")
    with pytest.raises(TransientApiError):
        flaky.call("get_profiles")
    assert flaky.call("get_profiles")["data"] == []


# Rate limits


#: Where a clock shared with the emulator starts: the emulator's clock is epoch seconds.
EPOCH = 1_784_000_000.0


@pytest.mark.parametrize(
    ("scale", "limits", "seconds"), [(5.0, (15, 300), 0.0), (0.2, (1, 12), 11.0)]
)
def test_the_client_paces_to_the_limits_the_account_answers_with(
    scale: float, limits: tuple[int, int], seconds: float
) -> None:
    """Deletion jobs are documented at 3/s and 60/m. An account with five times that is
    used at its pace; one with a fifth of it (1/s, 12/m) is not flooded with 429s. The
    emulator's limits run on the client's clock, so the pace is exact and nothing sleeps."""
    body = orjson.dumps(
        {
            "data": {
                "type": "data-privacy-deletion-job",
                "attributes": {
                    "profile": {
                        "data": {"type": "profile", "attributes": {"email": "a@example.com"}}
                    }
                },
            }
        }
    )
    clock = FakeClock(EPOCH, autojump=True)
    with Emulator(private_key=PRIVATE_KEY, rate_limits=scale, clock=clock.now) as emu:
        paced = client(emu, clock)
        for _ in range(12):
            paced.call("request_profile_deletion", body=body)
        stats = emu.stats()
    assert paced._pacer.endpoint(operation("request_profile_deletion")).limits == limits
    assert stats["throttled"] <= 1  # only before the first answer told us
    assert stats["retry_after_violations"] == 0
    assert clock.now() - EPOCH == pytest.approx(seconds)  # twelve at the burst limit


def test_retry_after_is_never_violated_under_a_429_storm() -> None:
    clock = FakeClock(EPOCH, autojump=True)
    with Emulator(private_key=PRIVATE_KEY, clock=clock.now) as emu:
        emu.set_rate_limit("get_profiles", burst=2, steady=6)
        emu.inject(status=429, count=3, operation="get_profiles", retry_after=1)
        c = client(emu, clock)
        for _ in range(5):
            c.call("get_profiles")
        stats = emu.stats()
    assert stats["throttled"] >= 3
    assert stats["retry_after_violations"] == 0


def test_429s_are_waited_out_and_never_use_up_an_attempt(emulator: Emulator) -> None:
    """Reported: six 429s in a row with Retry-After: 2 failed a deletion."""
    emulator.inject(kind="raw", status=429, headers={"Retry-After": "2"}, count=6)
    clock = FakeClock(autojump=True)
    patient = client(emulator, clock, max_attempts=2)
    assert patient.call("get_profiles")["data"] == []
    assert patient.requests_made == 7
    assert clock.now() >= 6 * 2  # each Retry-After waited out in full, on the clock
    assert patient.rate_limit_wait >= 6 * 2


def test_a_retry_after_beyond_max_wait_fails_the_call_at_once_without_counting(
    emulator: Emulator,
) -> None:
    """Reported: `Retry-After: 86400` slept a day."""
    emulator.inject(kind="raw", status=429, headers={"Retry-After": "86400"})
    clock = FakeClock(autojump=True)
    c = client(emulator, clock)
    for _ in range(3):  # the endpoint stays blocked: nothing more is sent to it
        with pytest.raises(WaitTooLong) as caught:
            c.call("get_profiles")
        assert str(caught.value) == (
            "get_profiles: Klaviyo asked to wait 86400 s, more than --max-wait (300 s) "
            "allows; sent again next run"
        )
    assert clock.now() == 0.0
    assert c.requests_made == 1
    assert c.call("get_lists")["data"] == []  # those were not failures of Klaviyo


def test_a_retry_after_date_is_a_wait_too(emulator: Emulator) -> None:
    tomorrow = email.utils.formatdate(time.time() + 86400, usegmt=True)
    emulator.inject(kind="raw", status=429, headers={"Retry-After": tomorrow})
    with pytest.raises(WaitTooLong, match=r"asked to wait 86\d\d\d s"):
        client(emulator, max_wait=3600).call("get_profiles")


def test_max_wait_bounds_the_waits_of_one_call_in_all(emulator: Emulator) -> None:
    emulator.inject(kind="raw", status=429, headers={"Retry-After": "40"}, count=3)
    clock = FakeClock(autojump=True)
    with pytest.raises(WaitTooLong, match=r"40 s after 80 s of waiting, more than --max-wait"):
        client(emulator, clock, max_wait=100).call("get_profiles")
    assert clock.now() == 80


@pytest.mark.parametrize("header", ["soon", "inf", "nan", "-5", "1.5", ""])
def test_a_retry_after_that_is_not_a_number_of_seconds_falls_back_to_backoff(
    emulator: Emulator, header: str
) -> None:
    emulator.inject(kind="raw", status=429, headers={"Retry-After": header}, count=2)
    clock = FakeClock(autojump=True)
    c = client(emulator, clock, max_backoff=8.0)
    assert c.call("get_profiles")["data"] == []
    assert c.requests_made == 3
    assert clock.now() == 1 + 2  # exponential: 1 s, then 2 s


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("0", 0.0),
        ("7", 7.0),
        (" 7 ", 7.0),
        ("9" * 400, 1e9),
        ("soon", None),
        ("inf", None),
        ("-1", None),
        ("1e3", None),
        ("\uff11\uff12", None),  # digits, but not ASCII ones
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: go now
        ("Wed, 99 Oct 2015 07:28:00 GMT", None),
        (None, None),
    ],
)
def test_retry_after_parsing_never_fails(header: str | None, seconds: float | None) -> None:
    assert retry_after(header) == seconds


# The total deadline of an attempt


def test_an_answer_trickled_past_the_deadline_is_cut_off_and_retried(emulator: Emulator) -> None:
    """Reported: `--timeout 5` did not stop a sync after 120 s, because a server sending
    a byte every 2 s never let a single read time out."""
    emulator.inject(kind="trickle", seconds=0.5, count=2, operation="get_profiles")
    c = client(emulator, timeout=(5.0, 1.5), max_attempts=2)
    with pytest.raises(TransientApiError) as caught:
        c.call("get_profiles")  # unbounded, this takes 2 x 30 s
    assert str(caught.value) == "get_profiles: no complete answer within 1.5 s"
    assert c.requests_made == 2
    assert c.call("get_profiles")["data"] == []  # the pool recovers


# Redirects


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_never_followed(emulator: Emulator, status: int) -> None:
    """Reported: a 301 turned a POST into a GET and every row was rejected; a 307 sent the
    body and the key wherever it pointed."""
    elsewhere = emulator.url.replace("127.0.0.1", "localhost")
    location = f"{elsewhere}/api/profile-import/?key={PRIVATE_KEY}"
    emulator.inject(kind="raw", status=status, headers={"Location": location})
    with pytest.raises(RedirectRefused) as caught:
        client(emulator).call("create_or_update_profile", body=profile("a@example.com"))
    message = str(caught.value)
    assert isinstance(caught.value, ConfigurationError)  # exit status 2
    assert f"HTTP {status}" in message and "http://localhost" in message
    assert "KLAVIYO_BASE_URL" in message
    assert "/api" not in message and PRIVATE_KEY not in message
    assert len(emulator.request_log()) == 1
    assert emulator.profiles() == []


# Stopping


def test_a_stopped_client_sends_nothing(emulator: Emulator) -> None:
    c = client(emulator)
    c.stop()
    with pytest.raises(Interrupted, match="get_profiles"):
        c.call("get_profiles")
    assert c.requests_made == 0
    assert emulator.request_log() == []


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"kind": "raw", "status": 429, "headers": {"Retry-After": "100"}}, id="429"),
        pytest.param({"status": 500}, id="backoff-after-a-500"),
    ],
)
def test_stop_wakes_a_call_that_waits(emulator: Emulator, fault: dict[str, Any]) -> None:
    """Waiting out a Retry-After (in the pacer) or a backoff (in `sleep`)."""
    emulator.inject(**fault)
    clock = FakeClock()
    c = client(emulator, clock)
    waiting = InThread(lambda: c.call("get_profiles"))
    until(lambda: len(clock.pending) == 1)
    c.stop()
    with pytest.raises(Interrupted, match="get_profiles"):
        waiting.result()
    assert c.requests_made == 1


def test_sleep_runs_on_the_clients_clock_and_ends_when_stopped(emulator: Emulator) -> None:
    clock = FakeClock()
    c = client(emulator, clock)
    sleeping = InThread(lambda: c.sleep(5))
    until(lambda: clock.pending == [5.0])
    clock.advance(5)
    sleeping.result()
    sleeping = InThread(lambda: c.sleep(3600))
    until(lambda: len(clock.pending) == 1)
    c.stop()
    with pytest.raises(Interrupted):
        sleeping.result()
    with pytest.raises(Interrupted):
        c.sleep(0)


# Answers that miss what the operation promises


@pytest.mark.parametrize(
    ("answer", "found"),
    [
        (None, "the answer is empty"),
        ({}, "the answer is an object without 'data'"),
        ({"data": None}, "data is empty"),
        ({"data": []}, "data is a list of 0"),
        ({"data": {"type": "profile"}}, "data is an object without 'id'"),
        ({"data": {"id": 7}}, "it is a number"),
    ],
)
def test_dig_names_the_operation_and_what_is_missing(answer: Any, found: str) -> None:
    with pytest.raises(UnexpectedAnswer) as caught:
        dig(answer, "data", "id", operation="create_list", expect=str)
    assert str(caught.value).startswith(
        "create_list: Klaviyo answered without the expected data.id"
    )
    assert found in str(caught.value)


def test_dig_reads_lists_and_objects() -> None:
    answer = {"data": [{"id": "a"}, {"id": "b"}]}
    assert dig(answer, "data", 1, "id", operation="x", expect=str) == "b"
    with pytest.raises(UnexpectedAnswer, match=r"data\[2\]\.id"):
        dig(answer, "data", 2, "id", operation="x")


@pytest.mark.parametrize(("status", "body"), [(200, b"{}"), (202, b""), (200, b"null")])
def test_a_2xx_without_what_was_asked_for_is_an_unexpected_answer(
    emulator: Emulator, status: int, body: bytes
) -> None:
    emulator.inject(kind="raw", status=status, body=body, operation="create_or_update_profile")
    created = client(emulator).call("create_or_update_profile", body=profile("a@example.com"))
    with pytest.raises(UnexpectedAnswer, match=r"create_or_update_profile: .* data\.id"):
        dig(created, "data", "id", operation="create_or_update_profile")


@pytest.mark.parametrize(
    "page",
    [
        b"null",
        b"{}",
        b'{"data": {}, "links": {}}',
        b'{"data": [1], "links": {}}',
        b'{"data": []}',
        b'{"data": [], "links": []}',
        b'{"data": [], "links": {"next": "https://a.klaviyo.com/api/profiles/?x=1"}}',
        b'{"data": [], "links": {"next": 7}}',
    ],
)
def test_a_page_without_data_and_links_is_an_unexpected_answer(
    emulator: Emulator, page: bytes
) -> None:
    emulator.inject(kind="raw", status=200, body=page, operation="get_profiles")
    with pytest.raises(UnexpectedAnswer, match="get_profiles"):
        list(client(emulator).pages("get_profiles", params={}))


# The emulator's hostile-server faults, seen from plain HTTP


def get(emulator: Emulator, path: str = "/api/profiles", **options: Any) -> requests.Response:
    authorization = {"Authorization": f"Klaviyo-API-Key {PRIVATE_KEY}", "revision": REVISION}
    return requests.get(emulator.url + path, headers=authorization, timeout=30, **options)


def test_a_raw_fault_answers_exactly_what_it_was_given(emulator: Emulator) -> None:
    emulator.inject(kind="raw", status=202, body=b"", operation="get_profiles")
    emulator.inject(kind="raw", status=301, headers={"Location": "http://evil.example/x"})
    emulator.inject(kind="raw", status=200, body="{}", headers={"Content-Type": "text/plain"})
    empty = get(emulator)
    assert (empty.status_code, empty.content, "Content-Type" in empty.headers) == (202, b"", False)
    moved = get(emulator, allow_redirects=False)
    assert (moved.status_code, moved.headers["Location"]) == (301, "http://evil.example/x")
    typed = get(emulator)
    assert (typed.content, typed.headers["Content-Type"]) == (b"{}", "text/plain")
    assert get(emulator).json()["data"] == []  # all used up


def test_a_raw_fault_after_processing_keeps_the_work_and_loses_the_answer(
    emulator: Emulator,
) -> None:
    emulator.inject(kind="raw", status=200, body=b"{}", after=True)
    answer = client(emulator).call("create_or_update_profile", body=profile("a@example.com"))
    assert answer == {}
    assert len(emulator.profiles()) == 1


def test_an_echo_fault_repeats_the_authorization_header(emulator: Emulator) -> None:
    emulator.inject(kind="echo")
    echoed = get(emulator)
    assert echoed.status_code == 400
    assert f"Klaviyo-API-Key {PRIVATE_KEY}" in echoed.json()["errors"][0]["detail"]


def test_a_trickle_fault_answers_as_usual_byte_by_byte(emulator: Emulator) -> None:
    emulator.inject(kind="trickle", seconds=0.01, operation="get_profiles")
    with get(emulator, stream=True) as trickled:
        assert trickled.status_code == 200
        first = trickled.raw.read(1)
        body = first + trickled.raw.read()
    assert len(first) == 1
    assert len(body) == int(trickled.headers["Content-Length"])
    assert orjson.loads(body) == get(emulator).json()


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "raw", "status": 600},
        {"kind": "raw"},
        {"kind": "status", "status": 500, "body": "x"},
        {"kind": "echo", "headers": {"Retry-After": "1"}},
        {"kind": "trickle"},
    ],
)
def test_bad_hostile_fault_options_are_refused(emulator: Emulator, fault: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        emulator.inject(**fault)


def test_a_raw_fault_can_be_injected_over_http(emulator: Emulator) -> None:
    fault = {"kind": "raw", "status": 429, "headers": {"Retry-After": "soon"}, "body": ""}
    control = requests.post(emulator.url + "/__emulator__/faults", json=fault, timeout=30)
    assert control.status_code == 204
    refused = get(emulator)
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, "soon")


# Configuration


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://a.klaviyo.com", True),
        ("http://127.0.0.1:8765", True),
        ("http://localhost:1", True),
        ("http://klaviyo.example.com", False),
        ("ftp://a.klaviyo.com", False),
    ],
)
def test_keys_are_only_sent_in_clear_to_this_machine(url: str, allowed: bool) -> None:
    if allowed:
        assert check_base_url(url, allow_insecure=False) == url
    else:
        with pytest.raises(ConfigurationError):
            check_base_url(url, allow_insecure=False)


def test_list_members_come_with_their_sync_keys_over_pages() -> None:
    """A member is read by its id and its key as the model writes keys; one without a value
    for the key's identifier has no key, so no row can be it."""
    with Emulator(private_key=PRIVATE_KEY, rate_limits=False) as emulator:
        read_members(emulator)
        assert emulator.stats()["spec_violations"] == 0


def read_members(emulator: Emulator) -> None:
    list_id = emulator.create_list("VIPs")
    reader = client(emulator)
    ids = [
        dig(reader.call("create_or_update_profile", body=body), "data", "id", operation="x")
        for body in [
            *(profile(f"M{i}@Example.com", external_id=f"x{i}") for i in range(150)),
            profile("no-id@example.com"),
        ]
    ]
    for at in range(0, len(ids), 100):
        members = orjson.dumps({"data": [{"type": "profile", "id": i} for i in ids[at : at + 100]]})
        reader.call("add_profiles_to_list", path_params=(list_id,), body=members)
    spec = SyncSpec(
        model="vips",
        unique_id="model.x.vips",
        relation="vips",
        object="list",
        behavior="mirror",
        key_column="email",
        key_field="external_id",
        fields=(FieldMap("customer_id", "external_id"),),
        list_id=list_id,
    )
    found = list(lists.members(reader, spec))
    assert found == [(ids[i], f"x{i}") for i in range(150)] + [(ids[150], None)]
    by_email = replace(spec, key_field="email")
    assert list(lists.members(reader, by_email))[3] == (ids[3], "m3@example.com")
    assert emulator.stats()["requests_by_operation"]["get_profiles_for_list"] == 4
