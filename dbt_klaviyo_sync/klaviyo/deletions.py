"""Profile deletion: each row of the model is a profile to delete, once.

Klaviyo deletes through data-privacy deletion jobs that take exactly one identifier: an
email, a phone number or a Klaviyo id, never an external id (API.md §2.6), so external ids
are looked up first, a hundred per request. The endpoint allows only 3 requests a second
and 60 a minute; the client's pacer keeps to that.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import orjson

from dbt_klaviyo_sync.changeset import Record, Reject
from dbt_klaviyo_sync.errors import TransientApiError
from dbt_klaviyo_sync.klaviyo import lookup
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient, KlaviyoRejected
from dbt_klaviyo_sync.klaviyo.outcomes import (
    Outcome,
    Prepared,
    Unit,
    about_the_record,
    chunks,
    send_each,
)
from dbt_klaviyo_sync.spec import SyncSpec


def deletion_body(field: str, value: str) -> bytes:
    """A deletion job for the profiles holding one identifier (`id`, email or phone)."""
    # The spec requires `attributes` even when the id names the profile.
    profile: dict[str, object] = {"type": "profile", "attributes": {}}
    if field == "id":
        profile["id"] = value
    else:
        profile["attributes"] = {field: value}
    job = {"type": "data-privacy-deletion-job", "attributes": {"profile": {"data": profile}}}
    return orjson.dumps({"data": job})


class ProfileDeleter:
    """Requests one deletion job per new key; the state marks each key done for good.

    A key that no profile holds (looked up now, never by an id remembered from an earlier
    run, which a merge in Klaviyo may have made stale) has nothing left to delete: the
    erasure is complete, and the key is done like the others."""

    journaled = False  # a deletion asked twice deletes nothing more

    def __init__(self, client: KlaviyoClient, spec: SyncSpec) -> None:
        self.client = client
        self.spec = spec

    def prepare(self, records: list[Record]) -> tuple[list[Prepared], list[Reject]]:
        return [Prepared(r) for r in records], []

    def units(self, prepared: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        return chunks(prepared, lookup.PAGE_SIZE)

    def send(self, unit: Unit) -> Outcome:
        records = unit.records
        try:
            targets = self._targets(records)
        except (KlaviyoRejected, TransientApiError) as exc:
            return Outcome.unanswered(records, exc, "looking the profile up failed")
        return send_each(unit.items, lambda item: self._delete(item.record, targets))

    def _delete(self, record: Record, targets: dict[str, tuple[str, str]]) -> Outcome:
        """One deletion job for the profile holding the record's key, if any does."""
        target = targets.get(record.key)
        if target is None:
            return Outcome(already=[record])
        field, value = target
        try:
            self.client.call("request_profile_deletion", body=deletion_body(field, value))
        except KlaviyoRejected as exc:
            error = about_the_record(exc)
            if error is None:
                return Outcome.refused([record], exc)
            return Outcome(
                rejected=[
                    Reject(
                        record.key, record.fingerprint, record.in_snapshot, error.code, error.detail
                    )
                ]
            )
        except TransientApiError as exc:
            return Outcome(failed=[(record, str(exc))])
        return Outcome(accepted=[(record, value if field == "id" else None)])

    def _targets(self, records: list[Record]) -> dict[str, tuple[str, str]]:
        """The one identifier each deletion job carries, by record key; a key no profile
        holds has none."""
        key_field = self.spec.key_field
        if key_field == "external_id":
            found = lookup.profile_ids(self.client, "external_id", [r.key for r in records])
            return {r.key: ("id", found[r.key]) for r in records if r.key in found}
        field = "id" if key_field == "klaviyo_id" else key_field
        return {r.key: (field, str(r.values[key_field])) for r in records}
