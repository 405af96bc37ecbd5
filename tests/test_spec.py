"""Annotation validation: every error names the model, the column, the value and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from dbt_klaviyo_sync.errors import AnnotationErrors
from dbt_klaviyo_sync.manifest import ModelNode
from dbt_klaviyo_sync.spec import FieldMap, build_spec


def node(meta: Any, columns: dict[str, Any]) -> ModelNode:
    return ModelNode(
        unique_id="model.shop.customers",
        name="customers",
        relation_name='"wh"."main"."customers"',
        database="wh",
        schema="main",
        materialized="table",
        original_file_path="models/customers.sql",
        meta=meta,
        column_meta=columns,
    )


GOOD_COLUMNS = {
    "customer_id": {"sync_key": "external_id"},
    "email": {"field": "email"},
    "city": {"field": "location.city"},
    "ltv": {"field": "properties.lifetime_value"},
}


def problems(meta: Any, columns: dict[str, Any]) -> list[str]:
    with pytest.raises(AnnotationErrors) as caught:
        build_spec(node(meta, columns))
    return [str(p) for p in caught.value.problems]


def test_a_valid_profile_model_becomes_a_spec_with_the_key_first() -> None:
    spec = build_spec(node({"object": "profile"}, GOOD_COLUMNS))
    assert (spec.object, spec.behavior, spec.api, spec.nulls) == (
        "profile",
        "upsert",
        "private",
        "skip",
    )
    assert spec.key_column == "customer_id" and spec.key_field == "external_id"
    assert spec.fields[0] == FieldMap("customer_id", "external_id")
    assert FieldMap("ltv", "properties.lifetime_value") in spec.fields


def test_the_signature_changes_with_the_mapping() -> None:
    one = build_spec(node({"object": "profile"}, GOOD_COLUMNS))
    other = build_spec(
        node({"object": "profile"}, {**GOOD_COLUMNS, "city": {"field": "location.region"}})
    )
    cleared = build_spec(node({"object": "profile", "nulls": "clear"}, GOOD_COLUMNS))
    assert len({one.signature, other.signature, cleared.signature}) == 3


def test_a_bad_enum_names_model_value_and_allowed_values() -> None:
    [message] = problems({"object": "profiles"}, GOOD_COLUMNS)
    assert "model 'customers'" in message
    assert '"profiles"' in message
    assert "profile, list, event" in message


def test_a_behavior_that_does_not_fit_the_object_is_refused() -> None:
    [message] = problems({"object": "profile", "behavior": "mirror"}, GOOD_COLUMNS)
    assert "klaviyo.behavior" in message and "upsert, update_only, delete" in message


def test_an_unknown_field_names_the_column_and_lists_the_fields() -> None:
    [message] = problems({"object": "profile"}, {**GOOD_COLUMNS, "nick": {"field": "nickname"}})
    assert "column 'nick'" in message and '"nickname"' in message
    assert "first_name" in message and "properties.<name>" in message


def test_an_unknown_key_is_named() -> None:
    [message] = problems({"object": "profile", "sync": "yes"}, GOOD_COLUMNS)
    assert "unknown key(s) sync" in message and "behavior" in message


def test_a_list_needs_its_list_id() -> None:
    [message] = problems({"object": "list"}, GOOD_COLUMNS)
    assert "list_id" in message


def test_two_sync_keys_and_none_are_refused() -> None:
    two = {**GOOD_COLUMNS, "email": {"sync_key": "email"}}
    assert any(
        "exactly one column" in p and "customer_id, email" in p
        for p in problems({"object": "profile"}, two)
    )
    none = {k: v for k, v in GOOD_COLUMNS.items() if k != "customer_id"}
    assert any("found 0 (none)" in p for p in problems({"object": "profile"}, none))


def test_a_sync_key_the_behavior_does_not_accept_is_refused() -> None:
    cols = {**GOOD_COLUMNS, "customer_id": {"sync_key": "klaviyo_id"}}
    [message] = problems({"object": "profile"}, cols)
    assert "column 'customer_id'" in message and "external_id, email, phone_number" in message


def test_a_field_mapped_twice_is_refused() -> None:
    cols = {**GOOD_COLUMNS, "email2": {"field": "email"}}
    [message] = problems({"object": "profile"}, cols)
    assert "mapped twice" in message and "column 'email2'" in message


def test_event_fields_do_not_belong_on_profiles() -> None:
    cols = {**GOOD_COLUMNS, "ts": {"field": "time"}}
    [message] = problems({"object": "profile"}, cols)
    assert "column 'ts'" in message and "object: event" in message


def test_all_problems_are_reported_together() -> None:
    cols = {**GOOD_COLUMNS, "nick": {"field": "nickname"}, "x": {"sink": 1}}
    found = problems({"object": "profile", "nulls": "drop"}, cols)
    assert len(found) == 3


def test_column_meta_without_model_meta_says_what_to_add() -> None:
    with pytest.raises(AnnotationErrors) as caught:
        build_spec(node(None, GOOD_COLUMNS))
    assert "config: meta: klaviyo" in str(caught.value)


# -- consent and suppression ----------------------------------------------------------------

CONSENT_COLUMNS = {"email": {"sync_key": "email"}, "ok": {"field": "consent"}}
CONSENT = {"object": "subscription", "list_id": "NwsLtr"}


def test_a_subscription_model_defaults_to_an_email_marketing_mirror() -> None:
    spec = build_spec(node(CONSENT, CONSENT_COLUMNS))
    assert (spec.object, spec.behavior, spec.channels) == (
        "subscription",
        "mirror",
        ("email_marketing",),
    )
    assert spec.withdraws and not spec.mirrors
    other = build_spec(
        node({**CONSENT, "channels": ["email_marketing"], "custom_source": "x"}, CONSENT_COLUMNS)
    )
    assert other.signature != spec.signature  # a new source re-sends the consent


def test_a_subscription_needs_its_list_id() -> None:
    [message] = problems({"object": "subscription"}, CONSENT_COLUMNS)
    assert "model 'customers'" in message and "needs `list_id`" in message


def test_a_subscription_is_keyed_by_email_or_phone_only() -> None:
    columns = {**CONSENT_COLUMNS, "email": {"field": "email"}, "id": {"sync_key": "external_id"}}
    [message] = problems(CONSENT, columns)
    assert "sync_key is 'external_id', which subscription mirror does not accept" in message
    assert "allowed values: email, phone_number" in message
    [message] = problems({"object": "suppression"}, {"phone": {"sync_key": "phone_number"}})
    assert "allowed values: email" in message


def test_an_unknown_channel_is_named_with_the_allowed_ones() -> None:
    [message] = problems({**CONSENT, "channels": ["whatsapp_marketing"]}, CONSENT_COLUMNS)
    assert "klaviyo.channels.0" in message and "whatsapp_marketing" in message
    assert "email_marketing, sms_marketing, sms_transactional" in message


def test_fields_a_consent_or_suppression_job_cannot_take_are_refused() -> None:
    [message] = problems(CONSENT, {**CONSENT_COLUMNS, "first": {"field": "first_name"}})
    assert "column 'first'" in message
    assert "field first_name is not applicable to `object: subscription`" in message
    columns = {"email": {"sync_key": "email"}, "ok": {"field": "consent"}}
    [message] = problems({"object": "suppression"}, columns)
    assert "field consent is not applicable to `object: suppression`" in message
    [message] = problems({"object": "profile"}, {**GOOD_COLUMNS, "ok": {"field": "consent"}})
    assert "field consent applies only to `object: subscription`" in message


def test_sms_consent_needs_a_phone_column() -> None:
    [message] = problems({**CONSENT, "channels": ["sms_marketing"]}, CONSENT_COLUMNS)
    assert "sms_marketing" in message and "phone_number" in message


def test_consent_settings_belong_to_subscription_models_only() -> None:
    found = problems({"object": "profile", "channels": ["email_marketing"]}, GOOD_COLUMNS)
    assert found == ["model 'customers': channels applies only to `object: subscription`"]


def test_backfill_is_for_events_and_reconcile_for_lists() -> None:
    found = problems({"object": "profile", "backfill": True, "reconcile": True}, GOOD_COLUMNS)
    assert any("backfill applies only to `object: event`" in p for p in found)
    assert any("reconcile applies only to `object: list`" in p for p in found)
    [message] = problems({"object": "list", "list_id": "L", "reconcile": "yes"}, GOOD_COLUMNS)
    assert "klaviyo.reconcile" in message and "boolean" in message
    mirror = build_spec(node({"object": "list", "list_id": "L", "reconcile": True}, GOOD_COLUMNS))
    assert mirror.reconcile and not build_spec(node({"object": "profile"}, GOOD_COLUMNS)).reconcile
