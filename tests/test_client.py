"""The Klaviyo client against the emulator over HTTP: pacing, retries, typed errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import orjson
import pytest

from dbt_klaviyo_sync.emulator import Emulator
from dbt_klaviyo_sync.errors import ConfigurationError, CredentialsError, TransientApiError
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient, KlaviyoRejected, check_base_url
from dbt_klaviyo_sync.klaviyo.pacing import ARRIVAL_MARGIN, EndpointPacer, WaitClock
from tests.conftest import PRIVATE_KEY, PUBLIC_KEY


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(private_key=PRIVATE_KEY, public_key=PUBLIC_KEY) as emu:
        yield emu
        assert emu.stats()["spec_violations"] == 0


def client(emulator: Emulator, **options: object) -> KlaviyoClient:
    return KlaviyoClient(emulator.url, PRIVATE_KEY, PUBLIC_KEY, **options)  # type: ignore[arg-type]


def profile(email: str, **attributes: object) -> bytes:
    return orjson.dumps({"data": {"type": "profile", "attributes": {"email": email, **attributes}}})


def test_the_pacer_keeps_to_the_burst_limit() -> None:
    pacer = EndpointPacer(burst=5, steady=1000)
    started = time.monotonic()
    for _ in range(11):
        with pacer.slot():
            pass
    # 5 in the first window, 5 in the second, the 11th in the third.
    assert time.monotonic() - started >= 2.0


def test_the_pacer_counts_a_request_from_shortly_after_it_was_sent() -> None:
    """A slow answer does not hold the next request back: Klaviyo counted the request
    when it arrived, soon after it was sent."""
    pacer = EndpointPacer(burst=1, steady=1000)
    sent = time.monotonic()
    with pacer.slot():
        time.sleep(0.5)  # a slow answer
    with pacer.slot():
        assert 1.0 <= time.monotonic() - sent < 1.0 + ARRIVAL_MARGIN + 0.1


def test_after_a_429_the_pacer_counts_a_request_until_a_window_after_its_answer() -> None:
    """Klaviyo counts a request when it arrives, which may be as late as our receipt of
    the answer: once it has refused one, the next window starts from there."""
    pacer = EndpointPacer(burst=1, steady=1000)
    pacer.refused()
    with pacer.slot():
        time.sleep(0.5)  # a slow answer
    answered = time.monotonic()
    with pacer.slot():
        assert time.monotonic() - answered >= 1.0


def test_requests_in_flight_hold_their_places() -> None:
    pacer = EndpointPacer(burst=2, steady=1000)
    entered = []

    def request() -> None:
        with pacer.slot():
            entered.append(time.monotonic())
            time.sleep(0.3)

    threads = [threading.Thread(target=request) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entered.sort()
    # The third waits until the first two are a window old.
    assert entered[2] - entered[0] >= 1.0


def test_the_pacer_holds_every_caller_until_a_block_passes() -> None:
    pacer = EndpointPacer(burst=100, steady=1000)
    pacer.block(0.6)
    started = time.monotonic()
    with pacer.slot():
        assert time.monotonic() - started >= 0.6


def test_rate_limit_waits_are_counted_on_the_clock_not_per_thread() -> None:
    """Three requests at a burst of one a second: the second waits about 1 s, the third
    about 2 s, at the same time; the progress bar should say 2 s, not 3."""
    clock = WaitClock()
    pacer = EndpointPacer(burst=1, steady=1000, clock=clock)

    def request() -> None:
        with pacer.slot():
            pass

    threads = [threading.Thread(target=request) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1.9 <= clock.seconds <= 2.6


def test_the_pacer_takes_the_accounts_limits_from_its_headers() -> None:
    pacer = EndpointPacer(burst=10, steady=150)
    pacer.learn_steady_limit(1500)
    assert pacer.limits == (100, 1500)
    pacer.learn_steady_limit(15)
    assert pacer.limits == (1, 15)


def test_429s_inside_the_steady_limit_make_the_pacer_cautious_then_halve_the_burst() -> None:
    pacer = EndpointPacer(burst=10, steady=150)
    pacer.refused()  # first: count requests from their answers
    assert pacer.limits == (10, 150)
    pacer.refused()
    pacer.refused()
    assert pacer.limits == (2, 150)


@pytest.mark.parametrize("scale", [5.0, 0.2])
def test_the_client_paces_to_the_limits_the_account_answers_with(scale: float) -> None:
    """Deletion jobs are documented at 3/s and 60/m. An account with five times that is
    used at its speed; one with a fifth of it (1/s, 12/m) is not flooded with 429s."""
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
    with Emulator(private_key=PRIVATE_KEY, rate_limits=scale) as emu:
        c = client(emu)
        started = time.monotonic()
        for _ in range(12):
            c.call("request_profile_deletion", body=body)
        seconds = time.monotonic() - started
        stats = emu.stats()
    assert stats["retry_after_violations"] == 0
    if scale > 1:
        assert seconds < 2.0  # at the documented 3/s, twelve take over 3 s
    else:
        assert stats["throttled"] <= 1  # only before the first answer told us
        assert seconds >= 10.0


def test_a_created_profile_comes_back_with_its_id(emulator: Emulator) -> None:
    answer = client(emulator).call("create_or_update_profile", body=profile("a@example.com"))
    assert answer["data"]["id"] == emulator.profiles()[0]["id"]


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


def test_server_errors_resets_and_bad_bodies_are_retried(emulator: Emulator) -> None:
    emulator.inject(status=503, count=1, operation="get_profiles")
    emulator.inject(kind="reset", count=1, operation="get_profiles")
    emulator.inject(kind="malformed", count=1, operation="get_profiles")
    fast = client(emulator, max_backoff=0.2)
    assert fast.call("get_profiles")["data"] == []
    assert fast.requests_made == 4


def test_a_read_timeout_is_retried(emulator: Emulator) -> None:
    emulator.inject(kind="delay", seconds=1.0, count=1, operation="get_profiles")
    impatient = client(emulator, timeout=(2.0, 0.3), max_backoff=0.1)
    assert impatient.call("get_profiles")["data"] == []
    assert impatient.requests_made == 2


def test_a_lost_answer_is_retried_without_harm(emulator: Emulator) -> None:
    emulator.inject(status=503, count=1, operation="create_or_update_profile", after=True)
    client(emulator, max_backoff=0.2).call("create_or_update_profile", body=profile("a@x.com"))
    assert len(emulator.profiles()) == 1


def test_retries_are_bounded(emulator: Emulator) -> None:
    emulator.inject(status=500, count=10, operation="get_profiles")
    bounded = client(emulator, max_attempts=3, max_backoff=0.1)
    with pytest.raises(TransientApiError):
        bounded.call("get_profiles")
    assert bounded.requests_made == 3


def test_after_three_failed_requests_the_rest_of_the_run_fails_fast(emulator: Emulator) -> None:
    emulator.inject(status=500, count=6, operation="get_profiles")
    flaky = client(emulator, max_attempts=2, max_backoff=0.05)
    for _ in range(3):
        with pytest.raises(TransientApiError):
            flaky.call("get_profiles")
    assert flaky.requests_made == 6
    with pytest.raises(TransientApiError, match="next run"):
        flaky.call("get_lists")
    assert flaky.requests_made == 6  # nothing more was sent


def test_a_success_resets_the_count_of_failures(emulator: Emulator) -> None:
    emulator.inject(status=500, count=6, operation="get_profiles")
    flaky = client(emulator, max_attempts=2, max_backoff=0.05)
    for _ in range(2):
        with pytest.raises(TransientApiError):
            flaky.call("get_profiles")
    flaky.call("get_lists")
    with pytest.raises(TransientApiError):
        flaky.call("get_profiles")
    assert flaky.call("get_profiles")["data"] == []


def test_retry_after_is_never_violated_under_a_429_storm(emulator: Emulator) -> None:
    emulator.set_rate_limit("get_profiles", burst=2, steady=6)
    emulator.inject(status=429, count=3, operation="get_profiles", retry_after=1)
    c = client(emulator)
    for _ in range(5):
        c.call("get_profiles")
    stats = emulator.stats()
    assert stats["throttled"] >= 3
    assert stats["retry_after_violations"] == 0


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
