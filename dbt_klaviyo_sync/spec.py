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
#: The safety brake: a list mirror (or a delete model) stops before sending when it would
#: remove (or delete) more than this share of what the previous sync left in Klaviyo.
DEFAULT_MAX_REMOVAL_SHARE = 0.5

_DEFAULT_BEHAVIOR = {"profile": "upsert", "list": "mirror", "event": "send"}
_SYNC_KEYS = {
    ("profile", "upsert"): ("external_id", "email", "phone_number"),
    ("profile", "update_only"): ("external_id", "email", "phone_number", "klaviyo_id"),
    ("profile", "delete"): ("external_id", "email", "phone_number", "klaviyo_id"),
    ("list", "mirror"): ("external_id", "email", "phone_number"),
    ("event", "send"): ("unique_id",),
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
    def signature(self) -> str:
        """A digest of everything that shapes the payload; part of each row's fingerprint,
        so changing the mapping re-sends the rows it affects."""
        described = orjson.dumps(
            [self.object, self.behavior, self.api, self.nulls, self.list_id, self.metric]
            + [[f.column, f.field] for f in self.fields]
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
    if "list_id" in meta and obj != "list":
        problems.append(AnnotationError(node.name, "list_id applies only to `object: list`"))
    if "metric" in meta and obj != "event":
        problems.append(AnnotationError(node.name, "metric applies only to `object: event`"))
    if "backfill" in meta and obj != "event":
        problems.append(AnnotationError(node.name, "backfill applies only to `object: event`"))
    if "reconcile" in meta and obj != "list":
        problems.append(AnnotationError(node.name, "reconcile applies only to `object: list`"))
    if "max_removal_share" in meta and obj != "list" and behavior != "delete":
        problems.append(
            AnnotationError(
                node.name,
                "max_removal_share applies only to list mirrors and `behavior: delete`, "
                "which remove or delete in Klaviyo",
            )
        )
    return problems


def _object_rules(
    node: ModelNode, obj: str, behavior: str, meta: dict[str, Any], fields: tuple[FieldMap, ...]
) -> list[AnnotationError]:
    """What events and deletions need beyond the schema."""
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
        not_for_profiles = f.field in EVENT_FIELDS or f.field == "unique_id"
        if obj != "event" and not_for_profiles:
            problems.append(
                AnnotationError(
                    node.name, f"field {f.field} applies only to `object: event`", f.column
                )
            )
        is_key = "sync_key" in node.column_meta[f.column]
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
