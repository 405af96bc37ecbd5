"""Isolating the records Klaviyo refuses a whole request for."""

from __future__ import annotations

from dbt_klaviyo_sync.changeset import Record, Reject
from dbt_klaviyo_sync.klaviyo.client import ApiError, KlaviyoRejected
from dbt_klaviyo_sync.klaviyo.outcomes import Outcome, Prepared, send_isolating


def prepared(count: int) -> list[Prepared]:
    return [Prepared(Record(f"K{i}", i, "add", False, None, {})) for i in range(count)]


def reject(record: Record, error: ApiError) -> Reject:
    return Reject(record.key, record.fingerprint, False, error.code, error.detail)


def test_many_bad_records_named_one_per_answer_are_all_isolated() -> None:
    """Klaviyo names the first bad record of each request; 2,000 of them once made the
    splitting recurse past Python's limit."""
    bad = {f"K{i}" for i in range(0, 3000, 3)} | {f"K{i}" for i in range(1, 3000, 3)}
    requests = []

    def attempt(part: list[Prepared]) -> Outcome:
        requests.append(len(part))
        for index, item in enumerate(part):
            if item.record.key in bad:
                raise KlaviyoRejected("x", 400, [ApiError(400, "invalid", "bad", f"/{index}")])
        return Outcome(accepted=[(p.record, None) for p in part])

    outcome = send_isolating(prepared(3000), attempt, lambda _, e: int(str(e.pointer)[1:]), reject)
    assert {r.key for r in outcome.rejected} == bad
    assert len(outcome.accepted) == 1000
    assert len(requests) == 2001


def test_a_refusal_naming_no_record_rejects_none_and_fails_all() -> None:
    """A refusal that points at no record is the request's (a gateway, a missing list):
    it once halved the request down to single records and then rejected every one of
    them, so the next run saw nothing to send while Klaviyo held none of them."""
    requests = []

    def attempt(part: list[Prepared]) -> Outcome:
        requests.append(len(part))
        raise KlaviyoRejected("x", 400, [ApiError(400, "invalid", "refused")])

    outcome = send_isolating(prepared(1000), attempt, lambda _, e: None, reject)
    assert outcome.rejected == [] and outcome.accepted == []
    assert len(outcome.failed) == 1000 and requests == [1000]
    assert outcome.refusals == ["x: HTTP 400: refused"]
    assert "not this record" in outcome.failed[0][1]
