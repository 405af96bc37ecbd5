"""List audiences (Mirror): the list holds exactly the model's rows.

Rows that join or change are upserted as profiles and added to the list (see
`ProfileUpserter` with a `list_id`). Rows that leave the model are removed from the list
by Klaviyo profile id, at most 1,000 per request (API.md §2.7); their profiles are not
deleted and their consent is not touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import orjson

from dbt_klaviyo_sync.changeset import Record, Reject, sync_key
from dbt_klaviyo_sync.errors import ConfigurationError, TransientApiError
from dbt_klaviyo_sync.klaviyo import lookup
from dbt_klaviyo_sync.klaviyo.client import KlaviyoClient, KlaviyoRejected, dig
from dbt_klaviyo_sync.klaviyo.outcomes import Outcome, Prepared, Unit, chunks
from dbt_klaviyo_sync.payloads import identifier
from dbt_klaviyo_sync.spec import SyncSpec

MAX_MEMBERS_PER_CALL = 1000
#: The most list members one page of `get_profiles_for_list` holds (API.md §2.13).
MEMBERS_PAGE = 100


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
    """Removes from the list the profiles of rows that left the model.

    The profile to remove is the one that holds the row's key now, looked up by that key
    (a hundred per request), never an id remembered from an earlier run: when a member's
    email changes, the row under the old email leaves the model while the same profile
    joins under the new one (and is added first); removing by the remembered id would take
    it out of the list again. A key no profile holds any more is in no list."""

    journaled = False  # removing twice removes nothing more

    def __init__(self, client: KlaviyoClient, spec: SyncSpec) -> None:
        self.client = client
        self.spec = spec

    def prepare(self, records: list[Record]) -> tuple[list[Prepared], list[Reject]]:
        return [Prepared(r) for r in records], []

    def units(self, prepared: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        return chunks(prepared, MAX_MEMBERS_PER_CALL)

    def send(self, unit: Unit) -> Outcome:
        records = unit.records
        try:
            self._remove(list(self._holders(records)))
        except (KlaviyoRejected, TransientApiError) as exc:
            return Outcome.unanswered(records, exc, "not removed from the list")
        return Outcome(removed=records)

    def _holders(self, records: list[Record]) -> set[str]:
        """The ids of the profiles that hold the records' keys now."""
        field = self.spec.key_field
        values = [value for r in records if (value := identifier(field, r.key)) is not None]
        return set(lookup.profile_ids(self.client, field, values).values()) if values else set()

    def _remove(self, ids: list[str]) -> None:
        remove_members(self.client, str(self.spec.list_id), ids)


def remove_members(client: KlaviyoClient, list_id: str, ids: list[str]) -> None:
    """Remove the profiles (at most 1,000) from the list. A profile deleted or merged away
    since it was found makes Klaviyo refuse the whole request, pointing at it: it is in no
    list any more, so it is left out and the rest removed. A refusal that points at no
    profile (the list is gone, say) is the request's, and propagates."""
    operation = "remove_profiles_from_list"
    while ids:
        body = orjson.dumps({"data": [{"type": "profile", "id": i} for i in ids]})
        try:
            client.call(operation, path_params=(list_id,), body=body)
            return
        except KlaviyoRejected as exc:
            gone = {i for e in exc.errors if (i := _member_index(e.pointer)) is not None}
            if exc.status != 404 or not gone & set(range(len(ids))):
                raise
            ids = [member for i, member in enumerate(ids) if i not in gone]


def members(client: KlaviyoClient, spec: SyncSpec) -> Iterator[tuple[str, str | None]]:
    """Every member of the model's list, a page of 100 at a time (paced like any request):
    its profile id and its sync key as the model's keys are written (None when the profile
    has no value for the key's identifier, so no row of the model can be it)."""
    field = spec.key_field
    params = {"fields[profile]": field, "page[size]": str(MEMBERS_PAGE)}
    path = (str(spec.list_id),)
    for profile in client.pages("get_profiles_for_list", path_params=path, params=params):
        value = (profile.get("attributes") or {}).get(field)
        profile_id = dig(profile, "id", operation="get_profiles_for_list")
        yield str(profile_id), None if value is None else sync_key(field, str(value))


def _member_index(pointer: str | None) -> int | None:
    """The index of the member an error points at (`/data/3/id`), if it does."""
    match = re.match(r"^/data/(\d+)(?:/|$)", pointer or "")
    return int(match.group(1)) if match else None
