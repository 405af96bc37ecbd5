"""The bad-input corpus: one test per case.

Each ends with a clear error or reject naming the model, the column and the key; the good
rows still sync, and a bad row syncs once it is fixed. (A missing list, a wrong API key and
an unreachable API are in test_sync_objects.py and test_sync_profiles.py.)
"""

from __future__ import annotations

from pathlib import Path

from dbt_klaviyo_sync.emulator import Emulator
from tests.conftest import Sync, change_model, model_rows, sync

CUSTOMERS = "SELECT customer_id FROM main.customers WHERE customer_id IS NOT NULL"


def held_customers(emulator: Emulator) -> set[str]:
    return {p["attributes"]["external_id"] for p in emulator.profiles()}


def recorded_orders(emulator: Emulator) -> set[str]:
    return {e["unique_id"] for e in emulator.events()}


def reject_line(result: Sync, model: str, key: str | None, column: str | None) -> str:
    """The console line that reports this reject; fails when there is none."""
    where = f" {column}" if column else ""
    shown = "(a row with a NULL key)" if key is None else repr(key)
    start = f"rejected {model} {shown}{where}:"
    lines = [line.strip() for line in result.stdout.splitlines() if start in line]
    assert lines, f"no {start!r} in:\n{result.output}"
    return lines[0]


def profile_case(
    project: Path,
    emulator: Emulator,
    *,
    bad: str,
    fix: str,
    key: str | None,
    column: str,
    reason: str,
) -> None:
    """A bad customer row is rejected with its reason while the others sync; fixed, it syncs."""
    change_model(project, bad)
    first = sync(project, emulator, "--select", "customers")
    assert first.returncode == 1, first.output
    assert reason in reject_line(first, "customers", key, column)
    good = {r["customer_id"] for r in model_rows(project, CUSTOMERS)} - {key}
    assert held_customers(emulator) >= good - {"C00006"}  # duplicates: see that test
    assert key not in held_customers(emulator)

    change_model(project, fix)
    fixed = sync(project, emulator, "--select", "customers")
    assert fixed.returncode == 0, fixed.output
    assert held_customers(emulator) == {r["customer_id"] for r in model_rows(project, CUSTOMERS)}


def order_case(
    project: Path,
    emulator: Emulator,
    *,
    bad: str,
    fix: str,
    key: str,
    column: str | None,
    reason: str,
) -> None:
    """The same for a bad order row of the event model."""
    change_model(project, bad)
    first = sync(project, emulator, "--select", "order_events")
    assert first.returncode == 1, first.output
    assert reason in reject_line(first, "order_events", key, column)
    orders = {r["order_id"] for r in model_rows(project, "SELECT order_id FROM main.order_events")}
    assert recorded_orders(emulator) == orders - {key}

    change_model(project, fix)
    fixed = sync(project, emulator, "--select", "order_events")
    assert fixed.returncode == 0, fixed.output
    assert recorded_orders(emulator) == orders


def test_a_null_sync_key(project: Path, emulator: Emulator) -> None:
    change_model(project, "UPDATE main.customers SET customer_id = NULL WHERE email LIKE '%.5@%'")
    first = sync(project, emulator, "--select", "customers")
    assert first.returncode == 1
    line = reject_line(first, "customers", None, "customer_id")
    assert "NULL" in line and "None" not in first.stdout
    assert len(held_customers(emulator)) == 1199
    change_model(
        project, "UPDATE main.customers SET customer_id = 'C00005' WHERE customer_id IS NULL"
    )
    fixed = sync(project, emulator, "--select", "customers")
    assert "C00005" in held_customers(emulator)
    # A NULL key has no record to remember, so it is reported on every run until fixed.
    assert fixed.returncode == 0 and len(held_customers(emulator)) == 1200


def test_duplicate_sync_keys(project: Path, emulator: Emulator) -> None:
    change_model(
        project, "UPDATE main.customers SET customer_id = 'C00005' WHERE customer_id = 'C00006'"
    )
    first = sync(project, emulator, "--select", "customers")
    assert first.returncode == 1
    assert first.row("customers")["rejected"] == 2  # both copies
    assert "share" in reject_line(first, "customers", "C00005", "customer_id")
    assert {"C00005", "C00006"}.isdisjoint(held_customers(emulator))
    assert len(held_customers(emulator)) == 1198
    change_model(
        project,
        "UPDATE main.customers SET customer_id = 'C00006' WHERE email LIKE '%.6@%'",
    )
    fixed = sync(project, emulator, "--select", "customers")
    assert fixed.returncode == 0, fixed.output
    assert len(held_customers(emulator)) == 1200


def test_an_invalid_email(project: Path, emulator: Emulator) -> None:
    profile_case(
        project,
        emulator,
        bad="UPDATE main.customers SET email = 'ada@@example' WHERE customer_id = 'C00007'",
        fix="UPDATE main.customers SET email = 'ada@example.com' WHERE customer_id = 'C00007'",
        key="C00007",
        column="email",
        reason="not a valid email address",
    )


def test_a_phone_that_cannot_be_e164(project: Path, emulator: Emulator) -> None:
    profile_case(
        project,
        emulator,
        bad="UPDATE main.customers SET phone = '415-555-0199' WHERE customer_id = 'C00008'",
        fix="UPDATE main.customers SET phone = '+14155550199' WHERE customer_id = 'C00008'",
        key="C00008",
        column="phone",
        reason="E.164",
    )


def test_a_string_over_100_kb(project: Path, emulator: Emulator) -> None:
    profile_case(
        project,
        emulator,
        bad="UPDATE main.customers SET last_name = repeat('x', 110000) "
        "WHERE customer_id = 'C00009'",
        fix="UPDATE main.customers SET last_name = 'Short' WHERE customer_id = 'C00009'",
        key="C00009",
        column="last_name",
        reason="at most 100 KB",
    )


def test_nan(project: Path, emulator: Emulator) -> None:
    change_model(project, "ALTER TABLE main.customers ALTER lifetime_value TYPE DOUBLE")
    profile_case(
        project,
        emulator,
        bad="UPDATE main.customers SET lifetime_value = 'NaN'::DOUBLE WHERE customer_id = 'C00010'",
        fix="UPDATE main.customers SET lifetime_value = 1.5 WHERE customer_id = 'C00010'",
        key="C00010",
        column="lifetime_value",
        reason="finite",
    )


def test_infinity(project: Path, emulator: Emulator) -> None:
    change_model(project, "ALTER TABLE main.customers ALTER lifetime_value TYPE DOUBLE")
    profile_case(
        project,
        emulator,
        bad="UPDATE main.customers SET lifetime_value = '-inf'::DOUBLE "
        "WHERE customer_id = 'C00011'",
        fix="UPDATE main.customers SET lifetime_value = 1.5 WHERE customer_id = 'C00011'",
        key="C00011",
        column="lifetime_value",
        reason="finite",
    )


def test_control_characters(project: Path, emulator: Emulator) -> None:
    profile_case(
        project,
        emulator,
        bad="UPDATE main.customers SET first_name = 'Ada' || chr(7) WHERE customer_id = 'C00012'",
        fix="UPDATE main.customers SET first_name = 'Ada' WHERE customer_id = 'C00012'",
        key="C00012",
        column="first_name",
        reason="control characters",
    )


def map_column(project: Path, column: str, field: str) -> None:
    """Annotate one more column of the customers model."""
    schema = project / "models" / "schema.yml"
    schema.write_text(
        schema.read_text().replace(
            "      - name: internal_score\n",
            f"      - name: {column}\n        config:\n          meta:\n            klaviyo:\n"
            f"              field: {field}\n      - name: internal_score\n",
            1,
        )
    )


def test_non_utf8_bytes(project: Path, emulator: Emulator) -> None:
    map_column(project, "nickname", "properties.nickname")
    change_model(
        project,
        """ALTER TABLE main.customers ADD COLUMN nickname BLOB;
           UPDATE main.customers SET nickname = 'Ace'::BLOB;
           UPDATE main.customers SET nickname = '\\xFF\\xFE'::BLOB WHERE customer_id = 'C00014'""",
    )
    profile_case(
        project,
        emulator,
        bad="SELECT 1",
        fix="UPDATE main.customers SET nickname = 'Ace'::BLOB WHERE customer_id = 'C00014'",
        key="C00014",
        column="nickname",
        reason="not UTF-8",
    )


def test_nested_json_and_lists_go_as_properties_but_not_as_text(
    project: Path, emulator: Emulator
) -> None:
    map_column(project, "tags", "properties.tags")
    map_column(project, "address", "organization")
    change_model(
        project,
        """ALTER TABLE main.customers ADD COLUMN tags VARCHAR[];
           ALTER TABLE main.customers ADD COLUMN address STRUCT(street VARCHAR, no INTEGER);
           UPDATE main.customers SET tags = ['a', 'b'];
           UPDATE main.customers SET address = {'street': 'Main', 'no': 1}
               WHERE customer_id = 'C00015'""",
    )
    profile_case(
        project,
        emulator,
        bad="SELECT 1",
        fix="UPDATE main.customers SET address = NULL WHERE customer_id = 'C00015'",
        key="C00015",
        column="address",
        reason="nested value",
    )
    c1 = next(p for p in emulator.profiles() if p["attributes"]["external_id"] == "C00001")
    assert c1["attributes"]["properties"]["tags"] == ["a", "b"]


def test_an_event_time_before_1990_or_over_a_year_ahead(project: Path, emulator: Emulator) -> None:
    order_case(
        project,
        emulator,
        bad="""UPDATE main.order_events SET ordered_at = now()::TIMESTAMP + INTERVAL 400 DAY
               WHERE order_id = 'O000006'""",
        fix="UPDATE main.order_events SET ordered_at = TIMESTAMP '2024-02-02' "
        "WHERE order_id = 'O000006'",
        key="O000006",
        column="ordered_at",
        reason="more than a year ahead",
    )


def test_a_non_numeric_value(project: Path, emulator: Emulator) -> None:
    change_model(project, "ALTER TABLE main.order_events ALTER amount TYPE VARCHAR")
    order_case(
        project,
        emulator,
        bad="UPDATE main.order_events SET amount = 'ten dollars' WHERE order_id = 'O000007'",
        fix="UPDATE main.order_events SET amount = '10.00' WHERE order_id = 'O000007'",
        key="O000007",
        column="amount",
        reason="is not a number",
    )


def test_more_than_400_event_properties(project: Path, emulator: Emulator) -> None:
    columns = [f"p{i}" for i in range(399)]  # with sku and quantity: 401
    schema = project / "models" / "schema.yml"
    schema.write_text(
        schema.read_text()
        + "\n".join(
            f"      - name: {c}\n        config:\n          meta:\n            klaviyo:\n"
            f"              field: properties.{c}"
            for c in columns
        )
        + "\n"
    )
    added = "; ".join(f"ALTER TABLE main.order_events ADD COLUMN {c} INTEGER" for c in columns)
    # Only O000009 fills every one of them; NULL properties are not sent.
    filled = ", ".join(f"{c} = 1" for c in columns)
    order_case(
        project,
        emulator,
        bad=f"{added}; UPDATE main.order_events SET {filled} WHERE order_id = 'O000009'",
        fix="UPDATE main.order_events SET p398 = NULL WHERE order_id = 'O000009'",
        key="O000009",
        column=None,
        reason="401 properties",
    )


def annotation_error(project: Path, emulator: Emulator, old: str, new: str) -> Sync:
    schema = project / "models" / "schema.yml"
    schema.write_text(schema.read_text().replace(old, new, 1))
    done = sync(project, emulator)
    assert done.returncode == 2, done.output
    assert emulator.stats()["writes"] == 0
    assert sum(emulator.stats()["requests_by_operation"].values()) == 0
    return done


def test_an_annotation_naming_a_missing_column(project: Path, emulator: Emulator) -> None:
    done = annotation_error(project, emulator, "- name: country", "- name: kountry")
    assert "model 'customers', column 'kountry'" in done.stderr
    assert "has no such column" in done.stderr and "country" in done.stderr


def test_an_unknown_field_name(project: Path, emulator: Emulator) -> None:
    done = annotation_error(project, emulator, "field: first_name", "field: firstname")
    assert "model 'customers', column 'first_name'" in done.stderr
    assert '"firstname"' in done.stderr and "first_name" in done.stderr


def test_two_sync_keys(project: Path, emulator: Emulator) -> None:
    done = annotation_error(project, emulator, "field: email\n", "sync_key: email\n")
    assert "model 'customers'" in done.stderr
    assert "exactly one column must have `sync_key`, found 2 (customer_id, email)" in done.stderr
