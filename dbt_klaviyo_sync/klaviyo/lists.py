"""List audiences (Mirror): the list holds exactly the model's rows.

Rows that join or change are upserted as profiles and added to the list (see
`ProfileUpserter` with a `list_id`). Rows that leave the model are removed from the list
by Klaviyo profile id, at most 1,000 per request (API.md §2.7); their profiles are not
deleted and their consent is not touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import orjson

from dbt_klaviyo_sync.errors import ConfigurationError, TransientApiError
from dbt_klaviyo_sync.klaviyo import lookup
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient, KlaviyoRejected
from dbt_klaviyo_sync.klaviyo.outcomes import Outcome, Prepared, chunks
from dbt_klaviyo_sync.payloads import Record, Reject, identifier
from dbt_klaviyo_sync.spec import SyncSpec

MAX_MEMBERS_PER_CALL = 1000


def check_list(client: KlaviyoClient, spec: SyncSpec) -> None:
    """Stop before anything is sent when the model's list does not exist."""
    try:
        client.call("get_list", path_params=(str(spec.list_id),))
    except KlaviyoRejected as exc:
        raise ConfigurationError(
            f"model '{spec.model}': Klaviyo has no list {spec.list_id!r} ({exc.detail}). "
            "Create the list in Klaviyo and put its id in `list_id`."
        ) from exc


class ListRemover:
    """Removes from the list the profiles of rows that left the model."""

    def __init__(self, client: KlaviyoClient, spec: SyncSpec) -> None:
        self.client = client
        self.spec = spec

    def prepare(self, records: list[Record]) -> tuple[list[Prepared], list[Reject]]:
        return [Prepared(r) for r in records], []

    def units(self, prepared: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        return chunks(prepared, MAX_MEMBERS_PER_CALL)

    def send(self, unit: list[Prepared]) -> Outcome:
        records = [p.record for p in unit]
        try:
            ids = self._ids(records)
            if ids:
                body = orjson.dumps({"data": [{"type": "profile", "id": i} for i in ids.values()]})
                self.client.call(
                    "remove_profiles_from_list", path_params=(str(self.spec.list_id),), body=body
                )
        except (TransientApiError, KlaviyoRejected) as exc:
            return Outcome(failed=[(r, f"not removed from the list: {exc}") for r in records])
        # A key Klaviyo has no profile for is in no list: there is nothing to remove.
        return Outcome(removed=records)

    def _ids(self, records: list[Record]) -> dict[str, str]:
        """Each record's Klaviyo id: remembered from earlier answers, else looked up."""
        field = self.spec.key_field
        ids = {r.key: r.klaviyo_id for r in records if r.klaviyo_id}
        unknown = {
            r.key: value
            for r in records
            if not r.klaviyo_id and (value := identifier(field, r.key)) is not None
        }
        if unknown:
            found = lookup.profile_ids(self.client, field, unknown.values())
            ids |= {
                key: found[norm]
                for key, value in unknown.items()
                if (norm := lookup.normalise(field, value)) in found
            }
        return ids
