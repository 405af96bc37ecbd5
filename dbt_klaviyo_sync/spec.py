"""Turn a model's `klaviyo` annotations into a validated `SyncSpec`.

The annotations are checked against the JSON Schema shipped in `schema/annotations.json`,
then against the rules a schema cannot say well (one sync key per model, which keys and
fields each object accepts). Every problem is reported at once, each naming the model, the
column, the bad value and what is allowed, before anything is sent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from dbt_klaviyo_sync.errors import AnnotationError, AnnotationErrors
from dbt_klaviyo_sync.manifest import ModelNode

IDENTIFIERS = ("email", "phone_number", "external_id", "klaviyo_id")
EVENT_FIELDS = ("time", "value", "value_currency", "metric")
#: The channels a subscription model may consent to (API.md §2.8), as its `channels` say.
CHANNELS = ("email_marketing", "sms_marketing", "sms_transactional")
SMS_CHANNELS = ("sms_marketing", "sms_transactional")
#: The fields consent and suppression models send, beyond their sync key: the only ones
#: their Klaviyo jobs take.
_FIELDS_OF = {
    "subscription": ("email", "phone_number", "consent", "consented_at"),
    "suppression": ("email", "suppressed"),
}
#: Fields that only one object takes.
_OWN_FIELDS = {
    "consent": "subscription",
    "consented_at": "subscription",
    "suppressed": "suppression",
}
#: The safety brake: a list mirror (or a delete model) stops before sending when it would
#: remove (or delete) more than this share of what the previous sync left in Klaviyo.
DEFAULT_MAX_REMOVAL_SHARE = 0.5

_DEFAULT_BEHAVIOR = {
    "profile": "upsert",
    "list": "mirror",
    "event": "send",
    "subscription": "mirror",
    "suppression": "mirror",
}
_SYNC_KEYS = {
    ("profile", "upsert"): ("external_id", "email", "phone_number"),
    ("profile", "update_only"): ("external_id", "email", "phone_number", "klaviyo_id"),
    ("profile", "delete"): ("external_id", "email", "phone_number", "klaviyo_id"),
    ("list", "mirror"): ("external_id", "email", "phone_number"),
    ("event", "send"): ("unique_id",),
    # Unsubscribe matches by email or phone only (API.md §2.8); suppression is email-only.
    ("subscription", "mirror"): ("email", "phone_number"),
    ("subscription", "subscribe"): ("email", "phone_number"),
    ("suppression", "mirror"): ("email",),
}


@dataclass(frozen=True)
class FieldMap:
    """One synced column and the Klaviyo field it feeds."""

    column: str
    field: str  # e.g. "email", "location.city", "properties.ltv", "time"


@dataclass(frozen=True)
class SyncSpec:
    """Everything needed to sync one model, independent of dbt and of Klaviyo's wire format."""

    model: str
    unique_id: str
    relation: str
    object: str
    behavior: str
    key_column: str
    key_field: str  # the identifier the sync key is: external_id, email, ..., unique_id
    fields: tuple[FieldMap, ...]  # every synced column, the sync key first
    api: str = "private"
    nulls: str = "skip"
    list_id: str | None = None
    metric: str | None = None
    materialized: str = ""
    # where the relation is, for a warehouse that looks it up in its catalog
    database: str = ""
    schema: str = ""
    identifier: str = ""
    max_removal_share: float = DEFAULT_MAX_REMOVAL_SHARE
    channels: tuple[str, ...] = ()  # subscription models: the consent channels sent
    custom_source: str | None = None
    # events: True sends them with Klaviyo's `backfill` flag (recorded, no flow fires);
    # False sends them live on purpose; None (unset) warns on a first sync of old events
    backfill: bool | None = None
    # list mirrors: every sync also reads the list and removes members not in the model
    reconcile: bool = False

    @property
    def once(self) -> bool:
        """Deletions and events act once per key, ever: a key Klaviyo accepted is done,
        whatever happens to its row later, and `--full-refresh` does not undo that."""
        return self.behavior in ("delete", "send")

    @property
    def mirrors(self) -> bool:
        """A list mirror removes, in Klaviyo, the rows that left the model."""
        return self.object == "list"

    @property
    def withdraws(self) -> bool:
        """Whether rows that leave the model are undone in Klaviyo: removed from the list,
        unsubscribed, or unsuppressed (the `mirror` behaviours)."""
        return self.behavior == "mirror"

    @property
    def signature(self) -> str:
        """A digest of everything that shapes the payload; part of each row's fingerprint,
        so changing the mapping re-sends the rows it affects."""
        consent = [[*self.channels], self.custom_source] if self.channels else []
        described = orjson.dumps(
            [self.object, self.behavior, self.api, self.nulls, self.list_id, self.metric]
            + [[f.column, f.field] for f in self.fields]
            + consent
        )
        return hashlib.sha256(described).hexdigest()[:16]


@cache
def _validators() -> tuple[Draft202012Validator, Draft202012Validator]:
    schema = orjson.loads(
        resources.files("dbt_klaviyo_sync.schema").joinpath("annotations.json").read_bytes()
    )
    defs = schema["$defs"]
    return (
        Draft202012Validator({**defs["model"], "$defs": defs}),
        Draft202012Validator({**defs["column"], "$defs": defs}),
    )


def _explain(error: ValidationError) -> str:
    """One schema error as a sentence: where, the bad value, and what is allowed."""
    path = ".".join(str(p) for p in error.absolute_path)
    where = f"klaviyo.{path}" if path else "klaviyo"
    value = orjson.dumps(error.instance).decode()
    allowed_values: Any = error.validator_value
    schema: Any = error.schema
    instance: Any = error.instance
    match error.validator:
        case "enum":
            allowed = ", ".join(str(v) for v in allowed_values)
            return f"{where} is {value}; allowed values: {allowed}"
        case "anyOf" if path == "field":
            column_schema: Any = _validators()[1].schema
            field_schema = column_schema["properties"]["field"]
            standard = ", ".join(field_schema["anyOf"][0]["enum"])
            return (
                f"{where} is {value}; allowed values: {standard}, "
                "or properties.<name> for a custom property"
            )
        case "additionalProperties":
            known = list(schema.get("properties", {}))
            unknown = ", ".join(sorted(set(instance) - set(known)))
            return f"{where} has unknown key(s) {unknown}; allowed keys: {', '.join(known)}"
        case "type":
            return f"{where} is {value}; it must be a {allowed_values}"
        case "required":
            missing = ", ".join(sorted(set(allowed_values) - set(instance)))
            return f"{where} needs `{missing}`; add it to the model's klaviyo meta"
        case _:
            return f"{where}: {error.message}"


def _schema_errors(validator: Draft202012Validator, instance: Any) -> list[str]:
    found = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    return list(dict.fromkeys(_explain(e) for e in found))


def build_spec(node: ModelNode) -> SyncSpec:
    """Validate one model's annotations and build its spec; raise listing every problem."""
    problems: list[AnnotationError] = []
    model_validator, column_validator = _validators()
    meta = node.meta
    if meta is None:
        raise AnnotationErrors(
            [
                AnnotationError(
                    node.name,
                    "columns carry `klaviyo` meta but the model has none; add "
                    "`config: meta: klaviyo: {object: profile}` (or list, event) to the model",
                )
            ]
        )
    problems += [AnnotationError(node.name, msg) for msg in _schema_errors(model_validator, meta)]
    for column, column_meta in node.column_meta.items():
        problems += [
            AnnotationError(node.name, msg, column)
            for msg in _schema_errors(column_validator, column_meta)
        ]
    if problems:
        raise AnnotationErrors(problems)

    obj = meta["object"]
    behavior = meta.get("behavior", _DEFAULT_BEHAVIOR[obj])
    keys = [(c, m["sync_key"]) for c, m in node.column_meta.items() if "sync_key" in m]
    allowed_keys = _SYNC_KEYS[(obj, behavior)]
    if len(keys) != 1:
        named = ", ".join(c for c, _ in keys) or "none"
        problems.append(
            AnnotationError(
                node.name,
                f"exactly one column must have `sync_key`, found {len(keys)} ({named}); "
                f"for {obj} {behavior} the sync key is one of: {', '.join(allowed_keys)}",
            )
        )
    for column, key in keys:
        if key not in allowed_keys:
            problems.append(
                AnnotationError(
                    node.name,
                    f"sync_key is {key!r}, which {obj} {behavior} does not accept; "
                    f"allowed values: {', '.join(allowed_keys)}",
                    column,
                )
            )
    problems += _model_rules(node, obj, behavior, meta)
    fields = _field_maps(node, keys)
    problems += _field_rules(node, obj, behavior, fields)
    problems += _object_rules(node, obj, behavior, meta, fields)
    if problems:
        raise AnnotationErrors(problems)
    key_column, key_field = keys[0]
    return SyncSpec(
        model=node.name,
        unique_id=node.unique_id,
        relation=node.relation_name,
        materialized=node.materialized,
        database=node.database,
        schema=node.schema,
        identifier=node.alias or node.name,
        max_removal_share=meta.get("max_removal_share", DEFAULT_MAX_REMOVAL_SHARE),
        object=obj,
        behavior=behavior,
        key_column=key_column,
        key_field=key_field,
        fields=fields,
        api=meta.get("api", "private"),
        nulls=meta.get("nulls", "skip"),
        list_id=meta.get("list_id"),
        metric=meta.get("metric"),
        channels=tuple(meta.get("channels", ["email_marketing"])) if obj == "subscription" else (),
        custom_source=meta.get("custom_source"),
        backfill=meta.get("backfill"),
        reconcile=meta.get("reconcile", False),
    )


def _model_rules(
    node: ModelNode, obj: str, behavior: str, meta: dict[str, Any]
) -> list[AnnotationError]:
    problems = []
    if meta.get("api", "private") == "client" and (obj, behavior) != ("profile", "upsert"):
        problems.append(
            AnnotationError(
                node.name, f"api: client works only for profile upsert, not {obj} {behavior}"
            )
        )
    if "list_id" in meta and obj not in ("list", "subscription"):
        problems.append(
            AnnotationError(
                node.name, "list_id applies only to `object: list` and `object: subscription`"
            )
        )
    for key in ("channels", "custom_source"):
        if key in meta and obj != "subscription":
            problems.append(
                AnnotationError(node.name, f"{key} applies only to `object: subscription`")
            )
    if "metric" in meta and obj != "event":
        problems.append(AnnotationError(node.name, "metric applies only to `object: event`"))
    if "backfill" in meta and obj != "event":
        problems.append(AnnotationError(node.name, "backfill applies only to `object: event`"))
    if "reconcile" in meta and obj != "list":
        problems.append(AnnotationError(node.name, "reconcile applies only to `object: list`"))
    if "max_removal_share" in meta and behavior not in ("mirror", "delete"):
        problems.append(
            AnnotationError(
                node.name,
                "max_removal_share applies only to `behavior: mirror` and `behavior: delete`, "
                "which remove, unsubscribe, unsuppress or delete in Klaviyo",
            )
        )
    return problems


def _object_rules(
    node: ModelNode, obj: str, behavior: str, meta: dict[str, Any], fields: tuple[FieldMap, ...]
) -> list[AnnotationError]:
    """What events, deletions and consent need beyond the schema."""
    mapped = {f.field: f.column for f in fields}
    problems = []
    if obj == "event":
        if ("metric" in meta) == ("metric" in mapped):
            problems.append(
                AnnotationError(
                    node.name,
                    "an event model needs its metric from exactly one place: `metric: <name>` "
                    "on the model, or one column with `field: metric`",
                )
            )
        if not {"email", "external_id", "klaviyo_id"} & set(mapped):
            problems.append(
                AnnotationError(
                    node.name,
                    "an event model must map email, external_id or klaviyo_id: Klaviyo ties "
                    "events to a profile by those, and phone numbers alone are not reliable",
                )
            )
    if obj == "subscription":
        problems += _consent_rules(node, meta, mapped)
    if behavior == "delete":
        problems += [
            AnnotationError(
                node.name,
                f"behavior: delete sends only the sync key; remove `field: {f.field}`",
                f.column,
            )
            for f in fields[1:]
        ]
    return problems


def _consent_rules(
    node: ModelNode, meta: dict[str, Any], mapped: dict[str, str]
) -> list[AnnotationError]:
    """Each channel needs its identifier: email consent an email, SMS consent a phone."""
    channels = meta.get("channels", ["email_marketing"])
    problems = []
    if "email_marketing" in channels and "email" not in mapped:
        problems.append(
            AnnotationError(
                node.name,
                "channels include email_marketing, but no column is sent as email; map one "
                "with `field: email` (or `sync_key: email`), or leave email_marketing out",
            )
        )
    sms = [c for c in channels if c in SMS_CHANNELS]
    if sms and "phone_number" not in mapped:
        problems.append(
            AnnotationError(
                node.name,
                f"channels include {', '.join(sms)}, but no column is sent as phone_number "
                "(Klaviyo needs an E.164 phone for SMS consent); map one with "
                "`field: phone_number`, or leave the SMS channels out",
            )
        )
    return problems


def _field_maps(node: ModelNode, keys: list[tuple[str, str]]) -> tuple[FieldMap, ...]:
    """The synced columns, sync key first; the key column feeds its own identifier."""
    key_columns = {c for c, _ in keys}
    maps = [FieldMap(c, k) for c, k in keys]
    maps += [
        FieldMap(c, m["field"])
        for c, m in node.column_meta.items()
        if "field" in m and c not in key_columns
    ]
    return tuple(maps)


def _field_rules(
    node: ModelNode, obj: str, behavior: str, fields: tuple[FieldMap, ...]
) -> list[AnnotationError]:
    problems = []
    for column, meta in node.column_meta.items():
        if "sync_key" in meta and "field" in meta and meta["field"] != meta["sync_key"]:
            problems.append(
                AnnotationError(
                    node.name,
                    f"the sync key column is sent as {meta['sync_key']}; remove "
                    f"`field: {meta['field']}` or map another column to it",
                    column,
                )
            )
    seen: dict[str, str] = {}
    for f in fields:
        if f.field in seen:
            problems.append(
                AnnotationError(
                    node.name,
                    f"field {f.field} is mapped twice (also from column '{seen[f.field]}'); "
                    "map each Klaviyo field from one column",
                    f.column,
                )
            )
        seen[f.field] = f.column
        owner = _OWN_FIELDS.get(f.field)
        is_key = "sync_key" in node.column_meta[f.column]  # a bad key has its own error
        if obj in _FIELDS_OF and f.field not in _FIELDS_OF[obj] and not is_key:
            problems.append(
                AnnotationError(
                    node.name,
                    f"field {f.field} is not applicable to `object: {obj}`, whose Klaviyo "
                    f"jobs take only {', '.join(_FIELDS_OF[obj])}; remove it",
                    f.column,
                )
            )
            continue
        if owner is not None and obj != owner:
            problems.append(
                AnnotationError(
                    node.name, f"field {f.field} applies only to `object: {owner}`", f.column
                )
            )
        not_for_profiles = f.field in EVENT_FIELDS or f.field == "unique_id"
        if obj != "event" and not_for_profiles:
            problems.append(
                AnnotationError(
                    node.name, f"field {f.field} applies only to `object: event`", f.column
                )
            )
        if (
            f.field == "klaviyo_id"
            and not is_key
            and behavior not in ("update_only", "delete", "send")
        ):
            problems.append(
                AnnotationError(
                    node.name,
                    f"klaviyo_id cannot be sent by {obj} {behavior}: Klaviyo upserts match "
                    "on email, phone_number and external_id only",
                    f.column,
                )
            )
    return problems
