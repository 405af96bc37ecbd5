"""Read dbt's manifest.json into plain data: the models that carry `klaviyo` meta.

Only the few keys we need are read, and unknown keys are ignored, so manifests written by
newer dbt versions keep working. No dbt import here: reading JSON must stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from dbt_klaviyo_sync.errors import ConfigurationError


@dataclass(frozen=True)
class ModelNode:
    """A dbt model as far as syncing is concerned."""

    unique_id: str
    name: str
    relation_name: str
    database: str
    schema: str
    materialized: str
    original_file_path: str
    meta: dict[str, Any] | None  # the model's `klaviyo` meta, or None
    column_meta: dict[str, Any] = field(default_factory=dict)  # column name -> `klaviyo` meta
    alias: str = ""  # the relation's own name, when the model sets one (else its name)
    fqn: tuple[str, ...] = ()  # dbt's fully qualified name: the package, folders, model

    @property
    def selector(self) -> str:
        """The node in dbt's selector syntax, as `dbt ls --output selector` prints it."""
        return ".".join(self.fqn) or self.name


def _klaviyo_meta(node: dict[str, Any]) -> Any:
    """`config.meta.klaviyo`, where dbt 1.10+ puts it, falling back to top-level `meta`."""
    config_meta = (node.get("config") or {}).get("meta") or {}
    if "klaviyo" in config_meta:
        return config_meta["klaviyo"]
    return (node.get("meta") or {}).get("klaviyo")


def read_manifest(manifest_path: Path) -> dict[str, Any]:
    """manifest.json as plain data."""
    try:
        manifest = orjson.loads(manifest_path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigurationError(
            f"cannot read the dbt manifest {manifest_path}: {exc}. "
            "Run `dbt parse` (or delete the file so it is rebuilt) and try again."
        ) from exc
    if not isinstance(manifest, dict):
        raise ConfigurationError(
            f"the dbt manifest {manifest_path} is not a dbt manifest. Delete it and try again."
        )
    return manifest


def invocation_id(manifest: dict[str, Any]) -> str | None:
    """The id of the dbt command that wrote the manifest."""
    found = (manifest.get("metadata") or {}).get("invocation_id")
    return str(found) if found else None


def read_models(manifest_path: Path) -> list[ModelNode]:
    """Every model in manifest.json whose model or column meta mentions `klaviyo`."""
    return annotated_models(read_manifest(manifest_path))


def annotated_models(manifest: dict[str, Any]) -> list[ModelNode]:
    """Every model in the manifest whose model or column meta mentions `klaviyo`."""
    models = []
    for unique_id, node in (manifest.get("nodes") or {}).items():
        if node.get("resource_type") != "model":
            continue
        columns = {
            name: meta
            for name, column in (node.get("columns") or {}).items()
            if (meta := _klaviyo_meta(column)) is not None
        }
        meta = _klaviyo_meta(node)
        if meta is None and not columns:
            continue
        models.append(
            ModelNode(
                unique_id=unique_id,
                name=node["name"],
                relation_name=node.get("relation_name") or "",
                database=node.get("database") or "",
                schema=node.get("schema") or "",
                materialized=(node.get("config") or {}).get("materialized", ""),
                original_file_path=node.get("original_file_path", ""),
                meta=meta,
                column_meta=columns,
                alias=node.get("alias") or "",
                fqn=tuple(node.get("fqn") or ()),
            )
        )
    return sorted(models, key=lambda m: m.name)
