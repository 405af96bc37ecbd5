"""Profile deletion: each row of the model is a profile to delete, once.

Klaviyo deletes through data-privacy deletion jobs that take exactly one identifier: an
email, a phone number or a Klaviyo id, never an external id (API.md §2.6), so external ids
are looked up first, a hundred per request. The endpoint allows only 3 requests a second
and 60 a minute; the client's pacer keeps to that.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import orjson

from dbt_klaviyo_sync.errors import TransientApiError
from dbt_klaviyo_sync.klaviyo import lookup
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient, KlaviyoRejected
from dbt_klaviyo_sync.klaviyo.outcomes import Outcome, Prepared, chunks
from dbt_klaviyo_sync.payloads import Record, Reject
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
    """Requests one deletion job per new key; the state marks each key done for good."""

    def __init__(self, client: KlaviyoClient, spec: SyncSpec) -> None:
        self.client = client
        self.spec = spec

    def prepare(self, records: list[Record]) -> tuple[list[Prepared], list[Reject]]:
        return [Prepared(r) for r in records], []

    def units(self, prepared: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        return chunks(prepared, lookup.PAGE_SIZE)

    def send(self, unit: list[Prepared]) -> Outcome:
        records = [p.record for p in unit]
        try:
            targets = self._targets(records)
        except (TransientApiError, KlaviyoRejected) as exc:
            return Outcome(failed=[(r, f"looking the profile up failed: {exc}") for r in records])
        outcome = Outcome()
        for record in records:
            target = targets.get(record.key)
            if target is None:
                outcome.rejected.append(
                    Reject(
                        record.key,
                        record.fingerprint,
                        record.in_snapshot,
                        "not_found",
                        "Klaviyo has no profile with this external_id, so there is nothing "
                        "to delete; it is tried again when the row changes or with --full-refresh",
                    )
                )
                continue
            field, value = target
            try:
                self.client.call("request_profile_deletion", body=deletion_body(field, value))
            except KlaviyoRejected as exc:
                outcome.rejected.append(
                    Reject(
                        record.key,
                        record.fingerprint,
                        record.in_snapshot,
                        exc.errors[0].code,
                        exc.detail,
                    )
                )
            except TransientApiError as exc:
                outcome.failed.append((record, str(exc)))
            else:
                outcome.accepted.append((record, value if field == "id" else None))
        return outcome

    def _targets(self, records: list[Record]) -> dict[str, tuple[str, str]]:
        """The one identifier each deletion job carries, by record key."""
        key_field = self.spec.key_field
        if key_field == "external_id":
            known = {r.key: r.klaviyo_id for r in records if r.klaviyo_id}
            found = lookup.profile_ids(
                self.client, "external_id", [r.key for r in records if not r.klaviyo_id]
            )
            known |= {r.key: found[r.key] for r in records if r.key in found}
            return {key: ("id", klaviyo_id) for key, klaviyo_id in known.items() if klaviyo_id}
        field = "id" if key_field == "klaviyo_id" else key_field
        return {r.key: (field, str(r.values[key_field])) for r in records}
