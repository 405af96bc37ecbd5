"""Requests checked against the bundled OpenAPI spec, as strictly as Klaviyo checks them.

The spec is OpenAPI 3.0. Its schemas are translated once into draft-07 JSON Schema and
compiled with fastjsonschema: `nullable` becomes a null alternative, and every object that
declares `properties` is closed (Klaviyo answers `'foo' is not a valid field for the resource
'profile'.`), while free-form objects such as profile `properties` stay open. jsonschema
(and openapi-schema-validator on top of it) needs 3.5 to 4.7 s for a 10,000-profile bulk
import here; the compiled validator needs about 0.3 s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import cache
from typing import Any

import fastjsonschema

from dbt_klaviyo_sync.klaviyo import openapi
from dbt_klaviyo_sync.klaviyo.openapi import Operation

from .errors import SpecViolation, spec_violation

_COMPONENTS = "#/components/schemas/"
_DEFINITIONS = "#/definitions/"
_NULLABLE = "|null"
_DRAFT = "http://json-schema.org/draft-07/schema#"
# OpenAPI-only keywords, dropped so the compiled code neither sees nor fills them in.
_ANNOTATIONS = frozenset(
    {
        "description",
        "example",
        "default",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",
        "xml",
        "externalDocs",
    }
)

Validate = Callable[[Any], Any]


def _translate(node: Any, refs: set[str]) -> Any:
    """One OpenAPI 3.0 schema as draft-07 JSON Schema, objects with properties closed.

    The definitions it refers to are added to `refs` (a nullable reference gets its own
    definition, named with a `|null` suffix).
    """
    if isinstance(node, list):
        return [_translate(item, refs) for item in node]
    if not isinstance(node, dict):
        return node
    if "allOf" in node:
        # Closing each part of an allOf would reject what the parts allow together.
        raise ValueError("allOf in a request schema: closing its objects would be wrong")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _ANNOTATIONS or key == "nullable" or key.startswith("x-"):
            continue
        if key == "properties":
            out[key] = {name: _translate(sub, refs) for name, sub in value.items()}
        elif key in ("enum", "required"):
            out[key] = list(value)
        else:
            out[key] = _translate(value, refs)
    if "properties" in out:
        out.setdefault("additionalProperties", False)
    if "$ref" in out:
        name = out["$ref"].removeprefix(_COMPONENTS)
        if node.get("nullable") is True:
            name += _NULLABLE
        refs.add(name)
        out["$ref"] = _DEFINITIONS + name
        if len(out) > 1:  # draft-07 ignores the siblings of $ref
            out = {"allOf": [{"$ref": out.pop("$ref")}], **out}
        return out
    return _allow_null(out) if node.get("nullable") is True else out


def _allow_null(schema: dict[str, Any]) -> dict[str, Any]:
    if "type" in schema:
        nullable = {**schema, "type": [schema["type"], "null"]}
        if "enum" in schema:
            nullable["enum"] = [*schema["enum"], None]
        return nullable
    if "oneOf" in schema:
        return {**schema, "oneOf": [*schema["oneOf"], {"type": "null"}]}
    return {"anyOf": [{"type": "null"}, schema]}


def _document(root: str) -> dict[str, Any]:
    """A draft-07 document for the component schema `root`, with what it refers to."""
    schemas = openapi.spec()["components"]["schemas"]
    definitions: dict[str, Any] = {}
    nullable: set[str] = set()
    pending = [root]
    while pending:
        name = pending.pop()
        if name.endswith(_NULLABLE):
            nullable.add(name)
            name = name.removesuffix(_NULLABLE)
        if name in definitions:
            continue
        refs: set[str] = set()
        definitions[name] = _translate(schemas[name], refs)
        pending.extend(refs)
    for name in nullable:
        definitions[name] = _allow_null(definitions[name.removesuffix(_NULLABLE)])
    return {"$schema": _DRAFT, "definitions": definitions, "$ref": _DEFINITIONS + root}


@cache
def _body_validator(operation_id: str) -> Validate | None:
    body = _spec_operation(operation_id).get("requestBody")
    if body is None:
        return None
    ref = body["content"]["application/vnd.api+json"]["schema"]["$ref"]
    document = _document(ref.removeprefix(_COMPONENTS))
    compiled: Validate = fastjsonschema.compile(document, use_default=False)
    return compiled


def _spec_operation(operation_id: str) -> dict[str, Any]:
    op = openapi.operation(operation_id)
    found: dict[str, Any] = openapi.spec()["paths"][op.path][op.method.lower()]
    return found


def has_body(operation: Operation) -> bool:
    return "requestBody" in _spec_operation(operation.operation_id)


def prepare(operations: Iterable[Operation]) -> None:
    """Compile the body validators ahead of the first request (about 50 ms each)."""
    for operation in operations:
        _body_validator(operation.operation_id)


def check_body(operation: Operation, body: Any) -> None:
    """Raise a `SpecViolation` naming the first place where `body` breaks the spec."""
    validate = _body_validator(operation.operation_id)
    if validate is None:
        return
    try:
        validate(body)
    except fastjsonschema.JsonSchemaValueException as error:
        raise _body_error(error, body) from None


def _body_error(error: fastjsonschema.JsonSchemaValueException, body: Any) -> SpecViolation:
    path = error.path[1:]  # the first element names the root ("data")
    pointer = "/" + "/".join(path)
    if error.rule == "additionalProperties":
        allowed = error.definition.get("properties", {})
        extra = sorted(key for key in error.value if key not in allowed)[0]
        resource = _resource_type(body, path)
        return spec_violation(
            f"'{extra}' is not a valid field for the resource '{resource}'.",
            pointer=pointer.rstrip("/") + "/" + extra,
        )
    if error.rule == "required":
        missing = next(key for key in error.definition["required"] if key not in error.value)
        return spec_violation(
            f"'{missing}' is a required field.", pointer=pointer.rstrip("/") + "/" + missing
        )
    field = path[-1] if path else "body"
    return spec_violation(_detail(error, field), pointer=pointer)


def _detail(error: fastjsonschema.JsonSchemaValueException, field: str) -> str:
    if error.rule == "enum":
        return f"\"{error.value}\" is not a valid choice for '{field}'."
    name = error.name or "data"
    rest = error.message.removeprefix(name) if error.message.startswith(name) else error.message
    return f"'{field}'{rest}."


def _resource_type(body: Any, path: list[str]) -> str:
    """The JSON:API `type` of the innermost resource object around `path`."""
    nodes = [body]
    for step in path:  # the validator walked this path, so every step exists
        parent = nodes[-1]
        nodes.append(parent[int(step)] if isinstance(parent, list) else parent[step])
    for node in reversed(nodes):
        if isinstance(node, dict) and isinstance(node.get("type"), str):
            return str(node["type"])
    return "request"


@cache
def _parameters(operation_id: str) -> dict[str, tuple[dict[str, Any], Validate]]:
    """Each query parameter of an operation: its OpenAPI definition and compiled schema."""
    found = {}
    for parameter in _spec_operation(operation_id).get("parameters", []):
        if parameter["in"] != "query":
            continue
        schema = {"$schema": _DRAFT, **_translate(parameter["schema"], set())}
        found[parameter["name"]] = (parameter, fastjsonschema.compile(schema, use_default=False))
    return found


def read_parameters(
    operation: Operation, query: Mapping[str, list[str]], *, strict: bool
) -> dict[str, Any]:
    """The query parameters as typed values, with the spec's defaults filled in.

    Arrays are comma-separated (Klaviyo's `fields[profile]=email,phone_number`). With
    `strict`, values are also checked against their schemas and unknown or repeated
    parameters are refused.
    """
    declared = _parameters(operation.operation_id)
    values: dict[str, Any] = {}
    for name, given in query.items():
        if name not in declared:
            if strict:
                raise spec_violation(f"'{name}' is not a valid query parameter.", parameter=name)
            continue
        if strict and len(given) > 1:
            raise spec_violation(f"'{name}' may be given only once.", parameter=name)
        definition, validate = declared[name]
        value = _coerce(name, given[-1], definition["schema"])
        if strict:
            try:
                validate(value)
            except fastjsonschema.JsonSchemaValueException as error:
                raise spec_violation(_detail(error, name), parameter=name) from None
        values[name] = value
    for name, (definition, _) in declared.items():
        if name in values:
            continue
        if definition.get("required"):
            raise spec_violation(f"'{name}' is a required query parameter.", parameter=name)
        if "default" in definition["schema"]:
            values[name] = definition["schema"]["default"]
    return values


def _coerce(name: str, raw: str, schema: Mapping[str, Any]) -> Any:
    kind = schema.get("type")
    if kind == "array":
        return [_coerce(name, item, schema.get("items", {})) for item in raw.split(",")]
    if kind == "integer":
        try:
            return int(raw)
        except ValueError:
            raise spec_violation(f"'{name}' must be an integer.", parameter=name) from None
    return raw  # strings, and anything else for its schema to judge
