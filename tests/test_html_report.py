"""`dbt-klaviyo report`: the history page, read back as a browser renders it.

The end-to-end test syncs the demo a few times against the emulator, writes the page and
loads it in a real headless Chromium (Debian's `chromium`): the DOM Chromium built must
carry, bar by bar, the numbers of the runs the test made, and its screenshot must show the
bars. Without Chromium it is skipped, unless DBT_KLAVIYO_REQUIRE_CHROMIUM is set (as
`dev.py test` does), which makes that an error."""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections import Counter
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import duckdb
import pytest

from dbt_klaviyo_sync.changeset import RUN_COLUMNS
from dbt_klaviyo_sync.emulator import Emulator
from dbt_klaviyo_sync.html_report import CHARTS, ModelHistory, render
from dbt_klaviyo_sync.warehouse import ReasonGroup
from scripts import chromium
from tests.conftest import PRIVATE_KEY, change_model, dbt_klaviyo, model_rows, sync_customers

HOSTILE = '<script>document.title="owned"</script>'


class Page(HTMLParser):
    """The elements of a page, each as (tag, attributes, the model section it is in), and
    its text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self.text: list[str] = []
        self._model: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {name: value or "" for name, value in attrs}
        if tag == "section":
            self._model = found.get("data-model")
        self.elements.append((tag, found, self._model))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def bars(self, model: str) -> dict[str, list[float]]:
        """Each series' numbers in the model's charts, run by run, oldest first."""
        series: dict[str, dict[int, float]] = {}
        for tag, found, where in self.elements:
            if tag == "rect" and where == model and "data-series" in found:
                runs = series.setdefault(found["data-series"], {})
                runs[int(found["data-run"])] = float(found["data-value"])
        return {name: [runs[i] for i in sorted(runs)] for name, runs in series.items()}

    def tags(self) -> Counter[str]:
        return Counter(tag for tag, _, _ in self.elements)


def run(model: str, started: int, **numbers: Any) -> dict[str, Any]:
    values = dict.fromkeys(RUN_COLUMNS[4:-1], 0) | {"seconds": 1.5, "error": None}
    started_at = datetime(2026, 12, 1, 8, started, tzinfo=UTC)
    return values | {"model": model, "started_at": started_at, "status": "ok"} | numbers


def test_the_page_escapes_what_the_state_holds_and_scrubs_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KLAVIYO_PRIVATE_API_KEY", PRIVATE_KEY)
    model = "<b>customers</b>"
    runs = [
        run(model, 0, added=3, rate_limit_seconds=None),
        run(model, 5, status="error", error=f"refused {PRIVATE_KEY} & {HOSTILE}"),
    ]
    reasons = [ReasonGroup("invalid", HOSTILE, 4, ["'><img src=x onerror=alert(1)>", None])]
    page = render([ModelHistory(model, runs, reasons)], "a <state>", datetime.now(UTC))

    parsed = Page(page)
    assert not {"script", "img", "b"} & set(parsed.tags())
    text = "".join(parsed.text)
    assert HOSTILE in text and "'><img src=x onerror=alert(1)>" in text and model in text
    assert PRIVATE_KEY not in page
    # A run recorded before the wait was: no bar, and the tooltip says so.
    assert parsed.bars(model)["rate_limit_seconds"] == [0.0, 0.0]
    assert "rate_limit_seconds not recorded" in text


def test_the_run_history_records_the_seconds_spent_waiting_on_rate_limits(
    warehouse_project: Path, emulator: Emulator
) -> None:
    assert sync_customers(warehouse_project, emulator).returncode == 0
    change_model(warehouse_project, "UPDATE main.customers SET city = 'Oslo'")
    # The update's first request is answered 429: it waits a second before going again.
    emulator.inject(429, count=1, retry_after=1, operation="bulk_import_profiles")
    assert sync_customers(warehouse_project, emulator).returncode == 0

    shown = dbt_klaviyo(warehouse_project, None, "status", "customers", "--output", "json")
    waited = [r["rate_limit_seconds"] for r in json.loads(shown.stdout)]
    assert waited[0] >= 1.0 and waited[1] < 1.0, waited  # newest first


def test_runs_recorded_before_the_wait_was_read_as_not_recorded(
    project: Path, emulator: Emulator, tmp_path: Path
) -> None:
    """A state file of version 4 (no wait column): `report` reads it without changing it."""
    assert sync_customers(project, emulator).returncode == 0
    state = project / ".klaviyo_sync" / "state.duckdb"
    with duckdb.connect(str(state)) as con:
        con.execute("ALTER TABLE runs DROP COLUMN rate_limit_seconds")
        for table in ("snapshot", "journal"):  # version 6's
            con.execute(f"ALTER TABLE {table} DROP COLUMN memo")
        con.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    before = state.read_bytes()

    out = tmp_path / "page.html"
    assert dbt_klaviyo(project, None, "report", "--out", str(out)).returncode == 0
    page = Page(out.read_text())
    assert page.bars("customers")["rate_limit_seconds"] == [0.0]
    assert "rate_limit_seconds not recorded" in "".join(page.text)
    assert state.read_bytes() == before


def test_a_state_schema_from_before_the_wait_column_is_migrated_and_reported(
    pg_project: Path, emulator: Emulator, tmp_path: Path
) -> None:
    assert sync_customers(pg_project, emulator).returncode == 0
    change_model(
        pg_project,
        f"""ALTER TABLE klaviyo_sync.runs DROP COLUMN rate_limit_seconds;
           UPDATE klaviyo_sync.meta SET value = '1' WHERE key = 'schema_version';
           UPDATE main.customers SET email = '{HOSTILE}' WHERE customer_id = 'C00003'""",
    )
    assert sync_customers(pg_project, emulator).returncode == 1

    shown = dbt_klaviyo(pg_project, None, "status", "customers", "--output", "json")
    assert [r["rate_limit_seconds"] for r in json.loads(shown.stdout)] == [0.0, None]
    [version] = model_rows(
        pg_project, "SELECT value FROM klaviyo_sync.meta WHERE key = 'schema_version'"
    )
    assert version == {"value": "2"}

    # The report reads the same history through the adapter.
    out = tmp_path / "page.html"
    assert dbt_klaviyo(pg_project, None, "report", "--out", str(out)).returncode == 0
    page = Page(out.read_text())
    assert page.bars("customers")["added"] == [1200.0, 0.0]
    assert page.bars("customers")["rejected"] == [0.0, 1.0]
    reasons = [a for tag, a, _ in page.elements if tag == "tr" and "data-code" in a]
    assert [(r["data-code"], r["data-count"]) for r in reasons] == [("invalid_value", "1")]
    assert HOSTILE in "".join(page.text) and "C00003" in "".join(page.text)


# -- in Chromium ---------------------------------------------------------------------------


def need_chromium() -> None:
    if chromium.find():
        return
    if os.environ.get("DBT_KLAVIYO_REQUIRE_CHROMIUM"):
        pytest.fail("DBT_KLAVIYO_REQUIRE_CHROMIUM is set, but no chromium is on the PATH")
    pytest.skip(
        "Chromium is not installed (Debian: apt-get install chromium; `python3 dev.py test` "
        "installs it as root); set DBT_KLAVIYO_REQUIRE_CHROMIUM=1 to make this an error"
    )


def png_colours(path: Path) -> Counter[tuple[int, int, int]]:
    """How many pixels of each colour an 8-bit RGB or RGBA PNG (as Chromium writes) has."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks, header = 8, b"", b""
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        header = body if kind == b"IHDR" else header
        chunks += body if kind == b"IDAT" else b""
        at += 12 + length
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour_type in (2, 6) and not interlace
    size = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(chunks), width * size
    previous, colours = bytearray(stride), Counter[tuple[int, int, int]]()
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - size] if i >= size else 0
            up, corner = previous[i], previous[i - size] if i >= size else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                best = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + best) & 255
        colours.update(tuple(line[i : i + 3]) for i in range(0, stride, size))
        previous = line
    return colours


def test_report_renders_each_runs_numbers_in_chromium(
    project: Path, emulator: Emulator, tmp_path: Path
) -> None:
    need_chromium()
    syncs = [sync_customers(project, emulator)]
    change_model(
        project,
        f"""UPDATE main.customers SET city = 'Oakland' WHERE customer_id IN ('C00001', 'C00002');
            UPDATE main.customers SET email = '{HOSTILE}' WHERE customer_id = 'C00003'""",
    )
    emulator.inject(429, count=1, retry_after=1, operation="create_or_update_profile")
    syncs.append(sync_customers(project, emulator))
    change_model(project, "DELETE FROM main.customers WHERE customer_id IN ('C00004', 'C00005')")
    syncs.append(sync_customers(project, emulator))
    expected = [s.row("customers") for s in syncs]
    assert [e["rejected"] for e in expected] == [0, 1, 1], [s.output for s in syncs]

    out = tmp_path / "history.html"
    written = dbt_klaviyo(project, None, "report", "--out", str(out))
    assert written.returncode == 0, written.output
    assert f"Wrote 3 runs of 1 model to {out}" in written.stdout

    dom = Page(chromium.headless(out, "--dump-dom"))
    bars = dom.bars("customers")
    for name in ("added", "updated", "removed", "rejected", "failed", "requests"):
        assert bars[name] == [e[name] for e in expected], name
    history = dbt_klaviyo(project, None, "status", "customers", "--output", "json")
    waited = [r["rate_limit_seconds"] for r in reversed(json.loads(history.stdout))]
    assert bars["rate_limit_seconds"] == waited and waited[1] >= 1.0
    # The reject, by its reason, with its key; the hostile email stays text.
    assert ("tr", "invalid_value") in [(tag, a.get("data-code")) for tag, a, _ in dom.elements]
    assert "script" not in dom.tags() and HOSTILE in "".join(dom.text)
    assert "C00003" in "".join(dom.text)

    shot = tmp_path / "page.png"
    chromium.headless(out, f"--screenshot={shot}")
    colours = png_colours(shot)
    drawn = {name: colour for _, series in CHARTS for name, colour in series}
    for name in ("added", "rejected", "requests", "rate_limit_seconds"):
        # Thousands of pixels: a bar, not only its legend's 10 x 10 swatch.
        assert colours[tuple(bytes.fromhex(drawn[name][1:]))] > 1000, name
