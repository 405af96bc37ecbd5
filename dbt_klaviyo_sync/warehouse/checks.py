"""What every warehouse checks of a model before its sync, in the same words everywhere."""

from __future__ import annotations

from dbt_klaviyo_sync.errors import AnnotationError, AnnotationErrors, ModelError
from dbt_klaviyo_sync.spec import SyncSpec


def unreadable(spec: SyncSpec) -> None:
    """`ModelError` for a model that has no relation to read at all (ephemeral)."""
    if spec.materialized == "ephemeral" or not spec.relation:
        raise ModelError(
            f"model '{spec.model}' is materialized as "
            f"{spec.materialized or 'something without a relation'}: there is no table or "
            "view to read. Materialize it as a table or a view (`config: materialized: "
            "table`), run dbt, then sync."
        )


def not_built(spec: SyncSpec) -> ModelError:
    return ModelError(
        f"model '{spec.model}': its relation {spec.relation} is not in the dbt database. "
        "Run `dbt run` (or `dbt build`) for it first."
    )


def mapped_columns(spec: SyncSpec, columns: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    """The relation's real name and type of each mapped column, in `spec.fields` order,
    from its columns by lower-case name; `AnnotationErrors` naming each one it lacks."""
    missing = [f for f in spec.fields if f.column.lower() not in columns]
    if missing:
        raise AnnotationErrors(
            [
                AnnotationError(
                    spec.model,
                    f"the column is annotated but {spec.relation} has no such column (it has: "
                    f"{', '.join(name for name, _ in columns.values())}). Fix the annotation "
                    "or the model, then run dbt.",
                    f.column,
                )
                for f in missing
            ]
        )
    return [columns[f.column.lower()] for f in spec.fields]
