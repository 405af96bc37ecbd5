"""Consent and suppression: the emulator as strict as Klaviyo's documentation (API.md §2.8,
§2.12, §2.14), the bodies we send checked against the spec, and the senders' handling of
Klaviyo's answers, over HTTP to the emulator."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa
import pytest

from dbt_klaviyo_sync import payloads
from dbt_klaviyo_sync.changeset import Record
from dbt_klaviyo_sync.clock import FakeClock
from dbt_klaviyo_sync.emulator import Emulator, validation
from dbt_klaviyo_sync.klaviyo import openapi
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient, KlaviyoRejected
from dbt_klaviyo_sync.klaviyo.consent import (
    ConsentRemover,
    ConsentSender,
    Suppressor,
    _job,
)
from dbt_klaviyo_sync.klaviyo.outcomes import Outcome, Sender, Unit
from dbt_klaviyo_sync.payloads import consent_resource
from dbt_klaviyo_sync.spec import FieldMap, SyncSpec
from tests.conftest import PRIVATE_KEY, PUBLIC_KEY

LIST_ID = "NwsLtr"
PROFILES = "/data/attributes/profiles/data"


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(private_key=PRIVATE_KEY, public_key=PUBLIC_KEY) as emu:
        emu.create_list("Newsletter", list_id=LIST_ID)
        yield emu
        assert emu.stats()["spec_violations"] == 0


@pytest.fixture
def client(emulator: Emulator) -> KlaviyoClient:
    return KlaviyoClient(emulator.url, PRIVATE_KEY, PUBLIC_KEY, clock=FakeClock(autojump=True))


def subscription(channels: tuple[str, ...] = ("email_marketing",), **extra: Any) -> SyncSpec:
    return SyncSpec(
        model="consent",
        unique_id="model.x.consent",
        relation='"wh"."main"."consent"',
        object="subscription",
        behavior=extra.pop("behavior", "mirror"),
        key_column="email",
        key_field="email",
        fields=(
            FieldMap("email", "email"),
            FieldMap("phone", "phone_number"),
            FieldMap("ok", "consent"),
            FieldMap("at", "consented_at"),
        ),
        list_id=LIST_ID,
        channels=channels,
        **extra,
    )


SUPPRESSION = replace(
    subscription(),
    object="suppression",
    fields=(FieldMap("email", "email"), FieldMap("gone", "suppressed")),
    list_id=None,
    channels=(),
)


def row(email: str, consent: bool | None = True, phone: str | None = None, **values: Any) -> Record:
    fields = {"email": email, "phone_number": phone, "consent": consent, **values}
    return Record(email, 1, "add", False, None, fields)


def send(sender: Sender, records: list[Record]) -> Outcome:
    """Prepare, group and send records as the runner does; every answer merged."""
    ready, rejected = sender.prepare(records)
    outcome = Outcome(rejected=rejected)
    for items in sender.units(ready):
        outcome.merge(sender.send(Unit("u", items)))
    return outcome


def job(kind: str, profiles: list[dict[str, Any]], **attributes: Any) -> bytes:
    parts = [orjson.dumps(p) for p in profiles]
    return _job(kind, parts, attributes, LIST_ID if "subscription" in kind else None)


SUBSCRIBE = "profile-subscription-bulk-create-job"
UNSUBSCRIBE = "profile-subscription-bulk-delete-job"


def consent(email: str, *channels: str, phone: str | None = None, at: str | None = None) -> Any:
    return consent_resource(channels or ("email_marketing",), "SUBSCRIBED", email, phone, at)


def by_email(emulator: Emulator) -> dict[str, dict[str, Any]]:
    return {c["email"]: c for c in emulator.consent()}


def refusal(client: KlaviyoClient, operation: str, body: bytes) -> tuple[str | None, str]:
    with pytest.raises(KlaviyoRejected) as refused:
        client.call(operation, body=body)
    assert refused.value.status == 400
    [error] = refused.value.errors
    return error.pointer, error.detail


# -- what we send, against the spec ---------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "kind", "resource", "attributes"),
    [
        (
            "bulk_subscribe_profiles",
            SUBSCRIBE,
            consent_resource(
                ("email_marketing", "sms_marketing", "sms_transactional"),
                "SUBSCRIBED",
                "a@example.com",
                "+12025550101",
                "2024-01-01T00:00:00+00:00",
            ),
            {"historical_import": True, "custom_source": "dbt"},
        ),
        (
            "bulk_unsubscribe_profiles",
            UNSUBSCRIBE,
            consent_resource(
                ("email_marketing", "sms_marketing"), "UNSUBSCRIBED", "a@example.com", "+1202555"
            ),
            {},
        ),
        (
            "bulk_suppress_profiles",
            "profile-suppression-bulk-create-job",
            {"type": "profile", "attributes": {"email": "a@example.com"}},
            {},
        ),
        (
            "bulk_unsuppress_profiles",
            "profile-suppression-bulk-delete-job",
            {"type": "profile", "attributes": {"email": "a@example.com"}},
            {},
        ),
    ],
)
def test_the_bodies_we_send_validate_against_the_spec(
    operation: str, kind: str, resource: Any, attributes: dict[str, Any]
) -> None:
    body = orjson.loads(job(kind, [resource], **attributes))
    spec_operation = openapi.operation(operation)
    validation.prepare([spec_operation])
    validation.check_body(spec_operation, body)
    if "subscription" in kind:
        assert body["data"]["relationships"] == {"list": {"data": {"type": "list", "id": LIST_ID}}}


def test_a_consent_resource_holds_only_the_channels_its_identifiers_allow() -> None:
    both = ("email_marketing", "sms_marketing")
    assert consent_resource(both, "UNSUBSCRIBED", "a@example.com", None) == {
        "type": "profile",
        "attributes": {
            "email": "a@example.com",
            "subscriptions": {"email": {"marketing": {"consent": "UNSUBSCRIBED"}}},
        },
    }
    assert consent_resource(("sms_marketing",), "UNSUBSCRIBED", "a@example.com", None) is None


# -- the emulator, as strict as Klaviyo ------------------------------------------------------


def test_sms_consent_without_a_phone_is_a_400_pointing_at_the_profile(
    client: KlaviyoClient,
) -> None:
    body = job(
        SUBSCRIBE,
        [
            consent("a@example.com"),
            {
                "type": "profile",
                "attributes": {
                    "email": "b@example.com",
                    "subscriptions": {"sms": {"marketing": {"consent": "SUBSCRIBED"}}},
                },
            },
        ],
    )
    pointer, detail = refusal(client, "bulk_subscribe_profiles", body)
    assert pointer == f"{PROFILES}/1/attributes/phone_number"
    assert detail == (
        "'phone_number' must not be empty when the sms channel is included in 'subscriptions'."
    )


def test_consented_at_goes_only_with_historical_import_and_only_in_the_past(
    client: KlaviyoClient, emulator: Emulator
) -> None:
    dated = consent("a@example.com", at="2024-01-01T00:00:00+00:00")
    pointer, _ = refusal(client, "bulk_subscribe_profiles", job(SUBSCRIBE, [dated]))
    assert pointer == f"{PROFILES}/0/attributes/subscriptions/email/marketing/consented_at"
    undated = job(SUBSCRIBE, [consent("a@example.com")], historical_import=True)
    assert "required" in refusal(client, "bulk_subscribe_profiles", undated)[1]
    future = consent("a@example.com", at="2999-01-01T00:00:00+00:00")
    ahead = job(SUBSCRIBE, [future], historical_import=True)
    assert "past" in refusal(client, "bulk_subscribe_profiles", ahead)[1]
    assert emulator.consent() == []  # nothing of a refused job was applied

    assert (
        client.call("bulk_subscribe_profiles", body=job(SUBSCRIBE, [dated], historical_import=True))
        is None
    )
    held = by_email(emulator)["a@example.com"]["channels"]["email_marketing"]
    assert (held["status"], held["historical_import"]) == ("SUBSCRIBED", True)


def test_batches_beyond_klaviyos_maxima_are_refused(client: KlaviyoClient) -> None:
    many = [consent(f"p{i}@example.com") for i in range(1001)]
    assert refusal(client, "bulk_subscribe_profiles", job(SUBSCRIBE, many))[0] == PROFILES
    gone = [
        consent_resource(("email_marketing",), "UNSUBSCRIBED", f"p{i}@example.com", None)
        for i in range(101)
    ]
    assert refusal(client, "bulk_unsubscribe_profiles", job(UNSUBSCRIBE, gone))[0] == PROFILES
    emails = [{"type": "profile", "attributes": {"email": f"p{i}@example.com"}} for i in range(101)]
    kind = "profile-suppression-bulk-create-job"
    assert refusal(client, "bulk_suppress_profiles", job(kind, emails))[0] == PROFILES


def test_unsubscribing_a_member_is_list_scoped_and_a_non_member_global(
    client: KlaviyoClient, emulator: Emulator
) -> None:
    client.call("bulk_subscribe_profiles", body=job(SUBSCRIBE, [consent("a@example.com")]))
    leave = [
        consent_resource(("email_marketing",), "UNSUBSCRIBED", email, None)
        for email in ("a@example.com", "b@example.com")
    ]
    assert client.call("bulk_unsubscribe_profiles", body=job(UNSUBSCRIBE, leave)) is None
    held = by_email(emulator)
    member = held["a@example.com"]["channels"]["email_marketing"]
    assert (member["status"], member["lists"]) == ("SUBSCRIBED", {LIST_ID: "UNSUBSCRIBED"})
    assert emulator.list_members(LIST_ID) == set()
    # b was in no list: Klaviyo created the profile and unsubscribed it globally.
    [stray] = emulator.global_unsubscribes()
    assert stray["profile_id"] == held["b@example.com"]["id"]
    assert held["b@example.com"]["suppression"] == "UNSUBSCRIBE"


def test_subscribing_lifts_suppressions_and_unsuppress_lifts_only_its_own(
    client: KlaviyoClient, emulator: Emulator
) -> None:
    kind = "profile-suppression-bulk-create-job"
    emails = [{"type": "profile", "attributes": {"email": e}} for e in ("s@example.com",)]
    created = client.call("bulk_suppress_profiles", body=job(kind, emails))
    assert created["data"]["attributes"]["status"] == "queued"
    status = client.call("get_bulk_suppress_profiles_job", path_params=(created["data"]["id"],))
    assert status["data"]["attributes"]["status"] == "complete"  # no job_seconds here
    assert by_email(emulator)["s@example.com"]["suppression"] == "USER_SUPPRESSED"
    client.call("bulk_subscribe_profiles", body=job(SUBSCRIBE, [consent("s@example.com")]))
    assert by_email(emulator)["s@example.com"]["suppression"] is None

    unsubscribed = consent_resource(("email_marketing",), "UNSUBSCRIBED", "u@example.com", None)
    client.call("bulk_unsubscribe_profiles", body=job(UNSUBSCRIBE, [unsubscribed]))
    lift = [{"type": "profile", "attributes": {"email": e}} for e in ("u@example.com", "x@y.io")]
    done = client.call(
        "bulk_unsuppress_profiles", body=job("profile-suppression-bulk-delete-job", lift)
    )
    status = client.call("get_bulk_unsuppress_profiles_job", path_params=(done["data"]["id"],))
    assert status["data"]["attributes"]["skipped_count"] == 1  # x@y.io: no such profile
    assert by_email(emulator)["u@example.com"]["suppression"] == "UNSUBSCRIBE"
    assert "x@y.io" not in {p["attributes"]["email"] for p in emulator.profiles()}


def test_list_members_are_filtered_by_email(client: KlaviyoClient) -> None:
    client.call("bulk_subscribe_profiles", body=job(SUBSCRIBE, [consent("a@example.com")]))
    client.call(
        "create_or_update_profile",
        body=orjson.dumps({"data": {"type": "profile", "attributes": {"email": "b@example.com"}}}),
    )
    params = {"filter": 'any(email,["a@example.com","b@example.com"])', "page[size]": "100"}
    found = list(client.pages("get_profiles_for_list", path_params=(LIST_ID,), params=params))
    assert [p["attributes"]["email"] for p in found] == ["a@example.com"]


# -- the senders, against Klaviyo's answers --------------------------------------------------


def test_subscribe_and_unsubscribe_jobs_keep_to_the_batch_maxima(
    client: KlaviyoClient, emulator: Emulator
) -> None:
    sender = ConsentSender(client, subscription())
    people = [row(f"p{i:04d}@example.com") for i in range(2100)]
    dated = [row(f"h{i}@example.com", consented_at="2024-01-01T00:00:00+00:00") for i in range(3)]
    outcome = send(sender, people + dated)
    assert len(outcome.accepted) == 2103
    calls = emulator.stats()["requests_by_operation"]
    assert calls["bulk_subscribe_profiles"] == 4  # 1000 + 1000 + 100, and the historical job
    withdrawn = [replace(r, values={**r.values, "consent": False}) for r in people[:250]]
    assert len(send(sender, withdrawn).accepted) == 250
    assert emulator.stats()["requests_by_operation"]["bulk_unsubscribe_profiles"] == 3
    assert emulator.global_unsubscribes() == []


def test_non_members_are_never_sent_to_unsubscribe(
    client: KlaviyoClient, emulator: Emulator
) -> None:
    sender = ConsentSender(client, subscription())
    send(sender, [row("in@example.com")])
    client.call(
        "create_or_update_profile",
        body=orjson.dumps(
            {"data": {"type": "profile", "attributes": {"email": "out@example.com"}}}
        ),
    )
    removed = send(
        ConsentRemover(client, subscription()),
        [row("in@example.com"), row("out@example.com"), row("new@example.com")],
    )
    assert sorted(r.key for r in removed.removed) == [
        "in@example.com",
        "new@example.com",
        "out@example.com",
    ]
    log = emulator.request_log()
    assert [e["operation_id"] for e in log].count("bulk_unsubscribe_profiles") == 1
    assert emulator.global_unsubscribes() == []
    assert by_email(emulator)["in@example.com"]["channels"]["email_marketing"]["lists"] == {
        LIST_ID: "UNSUBSCRIBED"
    }


def test_a_subscribe_model_sends_nothing_for_withdrawn_consent(
    client: KlaviyoClient, emulator: Emulator
) -> None:
    outcome = send(
        ConsentSender(client, subscription(behavior="subscribe")), [row("a@x.io", False)]
    )
    assert [r.key for r in outcome.already] == ["a@x.io"]
    assert emulator.stats()["writes"] == 0


def test_a_profile_klaviyo_points_at_is_rejected_and_the_others_sent_again(
    client: KlaviyoClient, emulator: Emulator
) -> None:
    emulator.inject(
        400,
        operation="bulk_subscribe_profiles",
        pointer=f"{PROFILES}/1/attributes/email",
    )
    people = [row("a@example.com"), row("b@example.com"), row("c@example.com")]
    outcome = send(ConsentSender(client, subscription()), people)
    assert [r.key for r in outcome.rejected] == ["b@example.com"]
    assert outcome.rejected[0].column == "email"
    assert sorted(r.key for r, _ in outcome.accepted) == ["a@example.com", "c@example.com"]
    assert set(by_email(emulator)) == {"a@example.com", "c@example.com"}


@pytest.mark.parametrize("status", [400, 503])
def test_a_refusal_about_no_profile_fails_the_records_for_the_next_run(
    client: KlaviyoClient, emulator: Emulator, status: int
) -> None:
    emulator.inject(status, operation="bulk_subscribe_profiles", count=10)
    outcome = send(ConsentSender(client, subscription()), [row("a@example.com")])
    assert not outcome.rejected and not outcome.accepted
    assert [r.key for r, _ in outcome.failed] == ["a@example.com"]


def test_sms_consent_without_a_phone_is_rejected_before_sending(
    client: KlaviyoClient, emulator: Emulator
) -> None:
    sender = ConsentSender(client, subscription(("email_marketing", "sms_marketing")))
    outcome = send(sender, [row("a@example.com", phone="+12025550101"), row("b@example.com")])
    [reject] = outcome.rejected
    assert reject.key == "b@example.com" and reject.column == "phone"
    assert reject.reason.startswith("sms consent needs phone_number")
    assert [r.key for r, _ in outcome.accepted] == ["a@example.com"]


def test_suppression_follows_its_jobs(client: KlaviyoClient, emulator: Emulator) -> None:
    records = [
        Record(
            "a@example.com", 1, "add", False, None, {"email": "a@example.com", "suppressed": True}
        ),
        Record(
            "b@example.com", 1, "add", False, None, {"email": "b@example.com", "suppressed": False}
        ),
    ]
    outcome = send(Suppressor(client, SUPPRESSION, 60.0), records)
    assert len(outcome.accepted) == 2
    assert by_email(emulator)["a@example.com"]["suppression"] == "USER_SUPPRESSED"
    removed = send(Suppressor(client, SUPPRESSION, 60.0, remove=True), records[:1])
    assert [r.key for r in removed.removed] == ["a@example.com"]
    assert "a@example.com" not in by_email(emulator)  # no consent, no suppression
    calls = emulator.stats()["requests_by_operation"]
    assert calls["get_bulk_suppress_profiles_job"] >= 1
    assert calls["get_bulk_unsuppress_profiles_job"] >= 1


@pytest.mark.parametrize(
    "operation",
    [
        "bulk_subscribe_profiles",
        "bulk_unsubscribe_profiles",
        "bulk_suppress_profiles",
        "bulk_unsuppress_profiles",
        "get_bulk_suppress_profiles_job",
        "get_bulk_unsuppress_profiles_job",
        "get_profiles_for_list",
    ],
)
def test_the_pacer_keeps_the_documented_limits_of_the_new_operations(
    client: KlaviyoClient, operation: str
) -> None:
    """75/s and 750/m, from the spec (API.md §2.14), as the client paces them."""
    assert client._pacer.endpoint(openapi.operation(operation)).limits == (75, 750)


def consent_rows(*rows: tuple[Any, Any]) -> pa.RecordBatch:
    """Change rows of `subscription()` with (consent, consented_at) values."""
    return pa.RecordBatch.from_pylist(
        [
            {
                "__change": "add",
                "__in_snapshot": False,
                "__klaviyo_id": None,
                "__key": f"p{i}@example.com",
                "__fingerprint": 7,
                "f0": f"p{i}@example.com",
                "f1": None,
                "f2": flag,
                "f3": when,
            }
            for i, (flag, when) in enumerate(rows)
        ]
    )


def test_consent_and_consented_at_values_are_checked_before_sending() -> None:
    past, future = datetime(2024, 3, 1, 10, tzinfo=UTC), datetime(2999, 1, 1, tzinfo=UTC)
    good, bad = payloads.records(
        subscription(), consent_rows((True, past), (False, None), (True, future))
    )
    assert [r.values["consented_at"] for r in good] == ["2024-03-01T10:00:00+00:00", None]
    [reject] = bad
    assert (reject.key, reject.column, reject.field) == ("p2@example.com", "at", "consented_at")
    assert "in the future" in reject.reason
    _, [text] = payloads.records(subscription(), consent_rows(("yes", None)))
    assert (text.column, text.field) == ("ok", "consent")
    assert "is not true or false" in text.reason
