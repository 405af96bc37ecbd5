"""The Klaviyo operations the emulator implements: one handler per operationId.

A handler gets a `Call` that the server has already authenticated, rate limited and
validated against the spec, and returns a `Reply`. Adding an operation is one `@handles`
function here plus its logic in the store; an operation without a handler answers 501.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dbt_klaviyo_sync.klaviyo import openapi

from . import filters
from .errors import from_status, invalid, not_found
from .events import Batch, Event, Submission, check_strings
from .profiles import Profile, RecordError, checked_identifiers, timestamp
from .profiles import render as render_profile
from .store import (
    DELETION_IDENTIFIERS,
    JOB_PROFILES,
    PROFILE_MAX_BYTES,
    Account,
    BulkJob,
    Failure,
    Identity,
    KlaviyoList,
    SuppressionJob,
)

#: "Accepts up to 10,000 profiles per request. The maximum allowed payload size is 5MB."
BULK_MAX_PROFILES = 10_000
BULK_MAX_BYTES = 5 * 1024 * 1024
#: "This endpoint accepts a maximum of 1000 profiles per call." (list membership)
MEMBERS_MAX = 1000
#: "Accepts up to 1,000 events per request. Max payload 5MB." (API.md §2.9)
EVENTS_MAX = 1000
EVENTS_MAX_BYTES = 5 * 1024 * 1024
#: "Maximum number of profiles can be submitted for subscription: 1000"; unsubscribe takes
#: 100 per call; suppress and unsuppress, "Email address per request limit: 100".
SUBSCRIBE_MAX = 1000
UNSUBSCRIBE_MAX = 100
SUPPRESS_MAX = 100

_EQUALS_OR_ANY = frozenset({"equals", "any"})
PROFILE_FILTERS = dict.fromkeys(("id", "email", "phone_number", "external_id"), _EQUALS_OR_ANY)
LIST_FILTERS = dict.fromkeys(("id", "name"), _EQUALS_OR_ANY)
#: Of the list member filters the spec allows, those the emulator implements.
MEMBER_FILTERS = dict.fromkeys(("email", "phone_number"), _EQUALS_OR_ANY)
EVENT_FILTERS = dict.fromkeys(("metric_id", "profile_id"), frozenset({"equals"}))
_PAGE = ("page[size]", "page[cursor]")
_EVENT_GROUPS = "/data/attributes/events-bulk-create/data"
#: Where create_event and request_profile_deletion carry their profile resource.
_PROFILE_RESOURCE = "/data/attributes/profile/data"


@dataclass(frozen=True)
class Call:
    """One request, as a handler sees it."""

    account: Account
    path_params: tuple[str, ...]
    params: dict[str, Any]  # query parameters, typed, with the spec's defaults
    body: Any
    url: str  # the request URL, for links.self
    base_url: str  # scheme and host, for the links of resources
    job_stuck: bool  # an injected fault: the job this request creates never finishes


@dataclass(frozen=True)
class Reply:
    status: int
    document: dict[str, Any] | None = None  # None: an empty body (202, 204)


Handler = Callable[[Call], Reply]


@dataclass(frozen=True)
class Route:
    handler: Handler
    params: frozenset[str]  # the query parameters implemented; the others answer 501
    max_body: int | None  # the documented payload limit, in bytes


ROUTES: dict[str, Route] = {}


def handles(
    operation_id: str, *, params: Sequence[str] = (), max_body: int | None = None
) -> Callable[[Handler], Handler]:
    openapi.operation(operation_id)  # a misspelt operation fails at import

    def register(handler: Handler) -> Handler:
        ROUTES[operation_id] = Route(handler, frozenset(params), max_body)
        return handler

    return register


# Profiles


@handles("create_or_update_profile", max_body=PROFILE_MAX_BYTES)
def create_or_update_profile(call: Call) -> Reply:
    profile, created = call.account.upsert(call.body["data"])
    return Reply(201 if created else 200, _single(call, render_profile(profile, call.base_url)))


@handles("create_client_profile", params=("company_id",))
def create_client_profile(call: Call) -> Reply:
    """202 for whatever passes validation (a bad email or phone is a 400): identifier
    conflicts are not reported, the identifiers are just not applied (`Account._accepted`)."""
    call.account.client_upsert(call.body["data"])
    return Reply(202)


@handles("get_profiles", params=("filter", *_PAGE))
def get_profiles(call: Call) -> Reply:
    conditions = _conditions(call, PROFILE_FILTERS)
    page, links = _page(call, call.account.profile_ids(conditions))
    profiles = call.account.profiles(page)
    data = [render_profile(profile, call.base_url) for profile in profiles]
    return Reply(200, {"data": data, "links": links})


@handles("update_profile", max_body=PROFILE_MAX_BYTES)
def update_profile(call: Call) -> Reply:
    (profile_id,) = call.path_params
    resource = call.body["data"]
    if resource["id"] != profile_id:
        raise invalid("The id in the body must match the id in the URL.", pointer="/data/id")
    profile = call.account.update(profile_id, resource)
    return Reply(200, _single(call, render_profile(profile, call.base_url)))


# Bulk profile import jobs


@handles("bulk_import_profiles", max_body=BULK_MAX_BYTES)
def bulk_import_profiles(call: Call) -> Reply:
    """Klaviyo validates a job's profiles when the job is created, and refuses the job with
    a 400 whose `source.pointer` names each bad profile, e.g.
    `/data/attributes/profiles/data/0/attributes/last_name` (API.md §3): a bad email or
    phone, no identifier, over 100KB. Nothing of a refused job is imported. What depends on
    the account when the job runs (identifiers held by two profiles, an `id` no profile has)
    cannot be known then: those are the job's import errors (`Account._run`)."""
    data = call.body["data"]
    records = data["attributes"]["profiles"]["data"]
    if len(records) > BULK_MAX_PROFILES:
        raise invalid(
            f"A job accepts at most {BULK_MAX_PROFILES:,} profiles; {len(records):,} were given.",
            pointer=JOB_PROFILES,
        )
    lists = data.get("relationships", {}).get("lists", {}).get("data", [])
    job = call.account.create_job(records, [item["id"] for item in lists], stuck=call.job_stuck)
    return Reply(202, _single(call, _job(job, call.base_url)))


@handles("get_bulk_import_profiles_job")
def get_bulk_import_profiles_job(call: Call) -> Reply:
    job = _known_job(call)
    return Reply(200, _single(call, _job(job, call.base_url)))


@handles("get_errors_for_bulk_import_profiles_job", params=_PAGE)
def get_errors_for_bulk_import_profiles_job(call: Call) -> Reply:
    page, links = _page(call, _known_job(call).failures)
    return Reply(200, {"data": [_import_error(failure) for failure in page], "links": links})


@handles("get_profiles_for_bulk_import_profiles_job", params=_PAGE)
def get_profiles_for_bulk_import_profiles_job(call: Call) -> Reply:
    page, links = _page(call, _known_job(call).profile_ids)
    profiles = call.account.profiles(page)
    data = [render_profile(profile, call.base_url) for profile in profiles]
    return Reply(200, {"data": data, "links": links})


@handles("get_profile_ids_for_bulk_import_profiles_job", params=_PAGE)
def get_profile_ids_for_bulk_import_profiles_job(call: Call) -> Reply:
    page, links = _page(call, _known_job(call).profile_ids)
    return Reply(200, {"data": _identifiers("profile", page), "links": links})


def _known_job(call: Call) -> BulkJob:
    (job_id,) = call.path_params
    job = call.account.job(job_id)
    if job is None:
        raise not_found(f"A profile bulk import job with id {job_id} does not exist.")
    return job


def _job(job: BulkJob, base_url: str) -> dict[str, Any]:
    own = f"{base_url}/api/profile-bulk-import-jobs/{job.id}"
    return {
        "type": "profile-bulk-import-job",
        "id": job.id,
        "attributes": {
            "status": job.status,
            "created_at": timestamp(job.created_at),
            "total_count": job.total_count,
            "completed_count": job.completed_count,
            "failed_count": job.failed_count,
            "completed_at": _maybe_timestamp(job.completed_at),
            "expires_at": _maybe_timestamp(job.expires_at),
            "started_at": _maybe_timestamp(job.started_at),
        },
        "relationships": {
            "lists": {
                "data": _identifiers("list", job.list_ids),
                "links": _relationship_links(own, "lists"),
            },
            "profiles": {"links": _relationship_links(own, "profiles")},
            "import-errors": {"links": {"related": f"{own}/import-errors/"}},
        },
        "links": {"self": f"{own}/"},
    }


def _import_error(failure: Failure) -> dict[str, Any]:
    error = failure.error
    return {
        "type": "import-error",
        "id": failure.id,
        "attributes": {
            "code": error.code,
            "title": error.title,
            "detail": error.detail,
            "source": {"pointer": f"{JOB_PROFILES}/{failure.index}{error.pointer}"},
            "original_payload": failure.payload,
        },
    }


# Lists


@handles("create_list")
def create_list(call: Call) -> Reply:
    attributes = call.body["data"]["attributes"]
    created = call.account.create_list(attributes["name"], attributes.get("opt_in_process"))
    return Reply(201, _single(call, _list(created, call.base_url)))


@handles("get_lists", params=("filter", *_PAGE))
def get_lists(call: Call) -> Reply:
    page, links = _page(call, call.account.lists(_conditions(call, LIST_FILTERS)))
    return Reply(200, {"data": [_list(item, call.base_url) for item in page], "links": links})


@handles("get_list")
def get_list(call: Call) -> Reply:
    (list_id,) = call.path_params
    found = call.account.get_list(list_id)
    if found is None:
        raise not_found(f"A list with id {list_id} does not exist.")
    return Reply(200, _single(call, _list(found, call.base_url)))


@handles("add_profiles_to_list")
def add_profiles_to_list(call: Call) -> Reply:
    (list_id,) = call.path_params
    call.account.add_members(list_id, _member_ids(call))
    return Reply(204)


@handles("remove_profiles_from_list")
def remove_profiles_from_list(call: Call) -> Reply:
    (list_id,) = call.path_params
    call.account.remove_members(list_id, _member_ids(call))
    return Reply(204)


@handles("get_profile_ids_for_list", params=_PAGE)
def get_profile_ids_for_list(call: Call) -> Reply:
    (list_id,) = call.path_params
    page, links = _page(call, call.account.members(list_id))
    return Reply(200, {"data": _identifiers("profile", page), "links": links})


@handles("get_profiles_for_list", params=("fields[profile]", "filter", *_PAGE))
def get_profiles_for_list(call: Call) -> Reply:
    """A list's members as profiles, in the order they joined, with `joined_group_at`;
    `fields[profile]` keeps only the attributes it names (JSON:API sparse fieldsets)."""
    (list_id,) = call.path_params
    members = call.account.members_joined(list_id)
    conditions = _conditions(call, MEMBER_FILTERS)
    if conditions:  # matched as GET /api/profiles matches them (emails without case)
        wanted = set(call.account.profile_ids(conditions))
        members = [(profile, at) for profile, at in members if profile.id in wanted]
    page, links = _page(call, members)
    data = [_member(profile, joined, call) for profile, joined in page]
    return Reply(200, {"data": data, "links": links})


def _member(profile: Profile, joined: float, call: Call) -> dict[str, Any]:
    resource = render_profile(profile, call.base_url)
    attributes = {**resource["attributes"], "joined_group_at": timestamp(joined)}
    wanted = call.params.get("fields[profile]")
    if wanted is not None:
        attributes = _sparse(attributes, wanted)
    return {**resource, "attributes": attributes}


def _sparse(attributes: dict[str, Any], wanted: Sequence[str]) -> dict[str, Any]:
    """Only the attributes named, `location.city` naming one field of `location`."""
    kept: dict[str, Any] = {}
    for name in wanted:
        outer, _, inner = name.partition(".")
        if outer not in attributes:
            continue  # `id` is the resource's, not an attribute
        if inner:
            kept.setdefault(outer, {})[inner] = (attributes[outer] or {}).get(inner)
        else:
            kept[outer] = attributes[outer]
    return kept


def _member_ids(call: Call) -> list[str]:
    members = call.body["data"]
    if len(members) > MEMBERS_MAX:
        raise invalid(
            f"At most {MEMBERS_MAX} profiles per call; {len(members)} were given.",
            pointer="/data",
        )
    return [member["id"] for member in members]


def _list(item: KlaviyoList, base_url: str) -> dict[str, Any]:
    own = f"{base_url}/api/lists/{item.id}"
    return {
        "type": "list",
        "id": item.id,
        "attributes": {
            "name": item.name,
            "created": timestamp(item.created),
            "updated": timestamp(item.created),
            "opt_in_process": item.opt_in_process,
        },
        "relationships": {"profiles": {"links": _relationship_links(own, "profiles")}},
        "links": {"self": f"{own}/"},
    }


# Consent and suppression


@handles("bulk_subscribe_profiles")
def bulk_subscribe_profiles(call: Call) -> Reply:
    data = call.body["data"]
    attributes = data["attributes"]
    call.account.subscribe(
        _job_profiles(attributes["profiles"], SUBSCRIBE_MAX),
        _related_list(data),
        historical=bool(attributes.get("historical_import")),
        custom_source=attributes.get("custom_source"),
    )
    return Reply(202)


@handles("bulk_unsubscribe_profiles")
def bulk_unsubscribe_profiles(call: Call) -> Reply:
    data = call.body["data"]
    profiles = _job_profiles(data["attributes"]["profiles"], UNSUBSCRIBE_MAX)
    call.account.unsubscribe(profiles, _related_list(data))
    return Reply(202)


@handles("bulk_suppress_profiles")
def bulk_suppress_profiles(call: Call) -> Reply:
    return _suppression_job(call, suppress=True)


@handles("bulk_unsuppress_profiles")
def bulk_unsuppress_profiles(call: Call) -> Reply:
    return _suppression_job(call, suppress=False)


@handles("get_bulk_suppress_profiles_job")
def get_bulk_suppress_profiles_job(call: Call) -> Reply:
    return Reply(200, _single(call, _suppression(_known_suppression(call, True), call.base_url)))


@handles("get_bulk_unsuppress_profiles_job")
def get_bulk_unsuppress_profiles_job(call: Call) -> Reply:
    return Reply(200, _single(call, _suppression(_known_suppression(call, False), call.base_url)))


def _job_profiles(profiles: dict[str, Any] | None, most: int) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = (profiles or {}).get("data") or []
    if len(entries) > most:
        raise invalid(
            f"At most {most} profiles per request; {len(entries)} were given.",
            pointer="/data/attributes/profiles/data",
        )
    return entries


def _related_list(data: dict[str, Any]) -> str | None:
    related = (data.get("relationships") or {}).get("list")
    return None if related is None else str(related["data"]["id"])


def _suppression_job(call: Call, *, suppress: bool) -> Reply:
    data = call.body["data"]
    if data.get("relationships"):
        # Suppressing every member of a list or segment: nothing here needs it.
        raise from_status(501, "The emulator suppresses by email only, not by list or segment.")
    profiles = _job_profiles(data["attributes"].get("profiles"), SUPPRESS_MAX)
    emails = [profile["attributes"]["email"] for profile in profiles]
    job = call.account.create_suppression_job(emails, suppress=suppress)
    return Reply(202, _single(call, _suppression(job, call.base_url)))


def _known_suppression(call: Call, suppress: bool) -> SuppressionJob:
    (job_id,) = call.path_params
    job = call.account.suppression_job(job_id, suppress=suppress)
    if job is None:
        raise not_found(f"A suppression job with id {job_id} does not exist.")
    return job


def _suppression(job: SuppressionJob, base_url: str) -> dict[str, Any]:
    kind = "create" if job.suppress else "delete"
    own = f"{base_url}/api/profile-suppression-bulk-{kind}-jobs/{job.id}"
    done = job.status == "complete"
    return {
        "type": f"profile-suppression-bulk-{kind}-job",
        "id": job.id,
        "attributes": {
            "status": job.status,
            "created_at": timestamp(job.created_at),
            "total_count": job.total_count,
            "completed_count": job.total_count - job.skipped_count if done else 0,
            "completed_at": _maybe_timestamp(job.completed_at),
            "skipped_count": job.skipped_count,
        },
        "links": {"self": f"{own}/"},
    }


# Events


@handles("create_event", max_body=EVENTS_MAX_BYTES)
def create_event(call: Call) -> Reply:
    check_strings(call.body)
    attributes = call.body["data"]["attributes"]
    profile = attributes["profile"]["data"]
    # Here the profile's `meta` sits among its attributes; in bulk jobs, beside them.
    resource = {**profile, "meta": profile["attributes"].get("meta")}
    batch = Batch(resource, _PROFILE_RESOURCE, [("/data", attributes)])
    call.account.record_events([batch])
    return Reply(202)


@handles("bulk_create_events", max_body=EVENTS_MAX_BYTES)
def bulk_create_events(call: Call) -> Reply:
    groups = call.body["data"]["attributes"]["events-bulk-create"]["data"]
    batches = [_event_group(index, group) for index, group in enumerate(groups)]
    count = sum(len(batch.events) for batch in batches)
    if count > EVENTS_MAX:
        raise invalid(
            f"A job accepts at most {EVENTS_MAX:,} events; {count:,} were given.",
            pointer=_EVENT_GROUPS,
        )
    check_strings(call.body)
    call.account.record_events(batches)
    return Reply(202)


def _event_group(index: int, group: dict[str, Any]) -> Batch:
    """One profile's events in a bulk create job."""
    at = f"{_EVENT_GROUPS}/{index}/attributes"
    events = group["attributes"]["events"]["data"]
    return Batch(
        group["attributes"]["profile"]["data"],
        f"{at}/profile/data",
        [
            (f"{at}/events/data/{number}", event["attributes"])
            for number, event in enumerate(events)
        ],
        group["attributes"].get("backfill"),
    )


@handles("get_events", params=("filter", "sort", *_PAGE))
def get_events(call: Call) -> Reply:
    # Oldest first unless `sort` says otherwise; `datetime` and `timestamp` are one time.
    found = sorted(
        call.account.events(_conditions(call, EVENT_FILTERS)),
        key=lambda event: event.submission.time,
        reverse=call.params.get("sort", "datetime").startswith("-"),
    )
    page, links = _page(call, found)
    return Reply(200, {"data": [_event(event, call.base_url) for event in page], "links": links})


def _event(event: Event, base_url: str) -> dict[str, Any]:
    own = f"{base_url}/api/events/{event.id}"
    given = event.submission
    return {
        "type": "event",
        "id": event.id,
        "attributes": {
            "timestamp": given.time,
            "event_properties": _event_properties(given),
            "datetime": timestamp(given.time),
            "uuid": event.uuid,
        },
        "relationships": {
            "profile": {
                "data": {"type": "profile", "id": event.profile_id},
                "links": _relationship_links(own, "profile"),
            },
            "metric": {
                "data": {"type": "metric", "id": event.metric_id},
                "links": _relationship_links(own, "metric"),
            },
        },
        "links": {"self": f"{own}/"},
    }


def _event_properties(given: Submission) -> dict[str, Any]:
    """The properties as Klaviyo shows them, with the event's own fields under `$` names."""
    shown = {**given.properties, "$event_id": given.dedup_id}
    if given.value is not None:
        shown["$value"] = given.value
    if given.value_currency is not None:
        shown["$value_currency"] = given.value_currency
    return shown


# Data privacy


@handles("request_profile_deletion")
def request_profile_deletion(call: Call) -> Reply:
    resource = call.body["data"]["attributes"]["profile"]["data"]
    try:
        given = {"id": resource.get("id"), **checked_identifiers(resource["attributes"])}
    except RecordError as error:
        raise error.in_request(_PROFILE_RESOURCE) from None
    named = [(n, v) for n, v in given.items() if n in DELETION_IDENTIFIERS and v is not None]
    if len(named) != 1:
        # "If multiple identifiers are provided, we will return an error." (API.md §2.6)
        raise invalid(
            f"Give exactly one of id, email or phone_number; {len(named)} were given.",
            pointer=_PROFILE_RESOURCE,
        )
    ((identifier, value),) = named
    call.account.request_deletion(identifier, value)
    return Reply(202)


# Accounts


@handles("get_accounts")
def get_accounts(call: Call) -> Reply:
    """The one account the key belongs to (API.md §2.11), in a collection as Klaviyo has it."""
    resource = _account(call.account.identity, call.base_url)
    return Reply(200, {"data": [resource], "links": {"self": call.url}})


def _account(identity: Identity, base_url: str) -> dict[str, Any]:
    """An account resource. Beyond its id, name and public key, every emulated account has
    the same settings: nothing in the emulator depends on them."""
    return {
        "type": "account",
        "id": identity.id,
        "attributes": {
            "test_account": False,
            "contact_information": {
                "default_sender_name": identity.name,
                "default_sender_email": f"{identity.id.lower()}@example.com",
                "website_url": None,
                "organization_name": identity.name,
                "street_address": dict.fromkeys(
                    ("address1", "address2", "city", "region", "country", "zip")
                ),
            },
            "industry": None,
            "timezone": "UTC",
            "preferred_currency": "USD",
            "public_api_key": identity.public_api_key,
            "locale": "en-US",
        },
        "links": {"self": f"{base_url}/api/accounts/{identity.id}/"},
    }


# Shared pieces of JSON:API documents

T = TypeVar("T")


def _single(call: Call, resource: dict[str, Any]) -> dict[str, Any]:
    return {"data": resource, "links": {"self": call.url}}


def _page(call: Call, items: Sequence[T]) -> tuple[Sequence[T], dict[str, str]]:
    """One page of `items` and the collection links, with an opaque `page[cursor]`."""
    size: int = call.params["page[size]"]
    offset = _offset(call.params.get("page[cursor]"))
    links = {"self": call.url}
    if offset + size < len(items):
        links["next"] = _with_cursor(call.url, offset + size)
    if offset > 0:
        links["prev"] = _with_cursor(call.url, max(0, offset - size))
    return items[offset : offset + size], links


def _offset(cursor: str | None) -> int:
    if cursor is None:
        return 0
    try:
        kind, _, offset = base64.urlsafe_b64decode(cursor + "==").decode().partition(":")
        if kind == "offset" and offset.isdigit():
            return int(offset)
    except (binascii.Error, UnicodeDecodeError):
        pass
    raise invalid("Invalid cursor.", parameter="page[cursor]")


def _with_cursor(url: str, offset: int) -> str:
    cursor = base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")
    parts = urlsplit(url)
    query = [(name, value) for name, value in parse_qsl(parts.query) if name != "page[cursor]"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("page[cursor]", cursor)])))


def _conditions(call: Call, allowed: dict[str, frozenset[str]]) -> list[filters.Condition]:
    text = call.params.get("filter")
    return [] if text is None else filters.parse(text, allowed)


def _identifiers(kind: str, ids: Sequence[str]) -> list[dict[str, str]]:
    return [{"type": kind, "id": item} for item in ids]


def _relationship_links(own: str, name: str) -> dict[str, str]:
    return {"self": f"{own}/relationships/{name}/", "related": f"{own}/{name}/"}


def _maybe_timestamp(seconds: float | None) -> str | None:
    return None if seconds is None else timestamp(seconds)
