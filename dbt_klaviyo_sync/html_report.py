"""`dbt-klaviyo report`: the sync history as one self-contained HTML page, for a browser
(the terminal's tables are in `report`).

The page carries everything it shows: inline CSS and SVG charts drawn here, no script, no
font, no request to anywhere (its Content-Security-Policy forbids them), so it opens from
the file system and can be mailed or kept as a CI artifact. Each chart's bars carry their
run and number as `data-*` attributes and as a tooltip (`<title>`), which is also how
tests read them. Every text that comes from the state (model names, keys, reasons, errors)
is HTML-escaped, and API keys are scrubbed from it as everywhere else."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dbt_klaviyo_sync.changeset import RUN_COLUMNS
from dbt_klaviyo_sync.logs import redact
from dbt_klaviyo_sync.warehouse import ReasonGroup

#: The charts of each model: title, and the run columns stacked in each bar with their colours.
CHARTS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Records per run",
        (("added", "#2e7d32"), ("updated", "#1565c0"), ("removed", "#8e24aa")),
    ),
    ("Rejected and failed records", (("rejected", "#e65100"), ("failed", "#c62828"))),
    ("Requests", (("requests", "#455a64"),)),
    ("Seconds waiting on rate limits", (("rate_limit_seconds", "#f9a825"),)),
)
_WIDTH, _HEIGHT = 560, 170
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 10, 12, 26

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1f2328; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
h3 { font-size: 14px; margin: 14px 0 4px; } .meta { color: #59636e; margin: 0 0 16px; }
section { border-top: 1px solid #d1d9e0; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 8px; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 2px; }
svg text { font: 11px system-ui, sans-serif; fill: #59636e; }
.legend span { display: inline-block; margin-right: 12px; font-size: 12px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
table { border-collapse: collapse; margin: 4px 0 8px; font-size: 13px; }
th, td { border: 1px solid #d1d9e0; padding: 2px 8px; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.status-ok { color: #2e7d32; } .status-error, .status-failed { color: #c62828; }
code { font-size: 12px; overflow-wrap: anywhere; } .reasons code { white-space: nowrap; }
"""


@dataclass(frozen=True)
class ModelHistory:
    """What the page shows of one model: its runs, oldest first, and its open rejects."""

    model: str
    runs: list[dict[str, Any]]  # `RUN_COLUMNS`, oldest first
    reasons: list[ReasonGroup]


def render(histories: Sequence[ModelHistory], source: str, generated: datetime) -> str:
    """The whole page."""
    body = "".join(_model_section(history) for history in histories)
    if not histories:
        body = "<p>No syncs recorded yet.</p>"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>Klaviyo sync history</title><style>{_CSS}</style></head><body>"
        "<h1>Klaviyo sync history</h1>"
        f"<p class='meta'>From {_text(source)}, written {_when(generated)}.</p>"
        f"{body}</body></html>\n"
    )


def _model_section(history: ModelHistory) -> str:
    model = _text(history.model)
    charts = "".join(_chart(title, series, history.runs) for title, series in CHARTS)
    return (
        f"<section class='model' data-model='{model}'><h2>{model}</h2>"
        f"{_last_run(history.runs[-1])}<div class='charts'>{charts}</div>"
        f"{_reasons(history.reasons)}{_runs_table(history.runs)}</section>"
    )


def _last_run(run: dict[str, Any]) -> str:
    """The last run's outcome and counts."""
    status = str(run["status"])
    counts = ("added", "updated", "removed", "unchanged", "rejected", "failed", "requests")
    cells = "".join(f"<th>{name}</th>" for name in counts)
    values = "".join(f"<td class='n'>{_number(run[name])}</td>" for name in counts)
    error = f"<p>Error: <code>{_text(run['error'])}</code></p>" if run["error"] else ""
    return (
        f"<h3>Last run</h3><p class='last-run'>{_when(run['started_at'])}: "
        f"<span class='status-{_text(status)}'>{_text(status)}</span>, "
        f"{_number(run['seconds'])} s, {_number(run['rate_limit_seconds'])} s waiting on "
        f"rate limits</p><table class='last-run-counts'><tr>{cells}</tr><tr>{values}</tr>"
        f"</table>{error}"
    )


def _chart(title: str, series: tuple[tuple[str, str], ...], runs: list[dict[str, Any]]) -> str:
    """Stacked bars, one per run, oldest on the left."""
    totals = [sum(_value(run[name]) for name, _ in series) for run in runs]
    top = _nice_ceiling(max(totals, default=0))
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(len(runs), 1)
    bar = max(min(slot * 0.7, 40), 1)
    parts = []
    for tick in (0, top / 2, top):
        y = _TOP + plot_h - tick / top * plot_h
        parts.append(
            f"<line x1='{_LEFT}' x2='{_WIDTH - _RIGHT}' y1='{y:.1f}' y2='{y:.1f}' "
            f"stroke='#d1d9e0'/><text x='{_LEFT - 6}' y='{y + 4:.1f}' text-anchor='end'>"
            f"{_number(tick)}</text>"
        )
    for index, run in enumerate(runs):
        x = _LEFT + index * slot + (slot - bar) / 2
        base = float(_TOP + plot_h)
        when = _when(run["started_at"])
        for name, colour in series:
            value = _value(run[name])
            # A bar of a few records among thousands still shows, a sliver of 2 px.
            height = max(value / top * plot_h, 2.0) if value else 0.0
            base -= height
            shown = "not recorded" if run[name] is None else _number(run[name])
            parts.append(
                f"<rect class='bar' data-run='{index}' data-started='{when}' "
                f"data-series='{name}' data-value='{_value(run[name]):g}' x='{x:.1f}' "
                f"y='{base:.1f}' width='{bar:.1f}' height='{height:.1f}' fill='{colour}'>"
                f"<title>{when}: {name} {shown}</title></rect>"
            )
    if runs:
        first, last = _when(runs[0]["started_at"]), _when(runs[-1]["started_at"])
        parts.append(f"<text x='{_LEFT}' y='{_HEIGHT - 8}'>{first}</text>")
        if len(runs) > 1:
            parts.append(
                f"<text x='{_WIDTH - _RIGHT}' y='{_HEIGHT - 8}' text-anchor='end'>{last}</text>"
            )
    legend = "".join(
        f"<span><i style='background:{colour}'></i>{name}</span>" for name, colour in series
    )
    names = " ".join(name for name, _ in series)
    return (
        f"<figure class='chart' data-series='{names}'><figcaption>{_text(title)}</figcaption>"
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{_WIDTH}' height='{_HEIGHT}' "
        f"viewBox='0 0 {_WIDTH} {_HEIGHT}' role='img' aria-label='{_text(title)}'>"
        f"{''.join(parts)}</svg><div class='legend'>{legend}</div></figure>"
    )


def _reasons(groups: list[ReasonGroup]) -> str:
    """The model's open rejects by reason, with a few example keys of each."""
    if not groups:
        return "<h3>Open rejects</h3><p class='no-rejects'>None.</p>"
    rows = "".join(
        f"<tr class='reason' data-code='{_text(g.code)}' data-count='{g.count}'>"
        f"<td class='n'>{g.count:,}</td><td>{_text(g.code)}</td><td>{_text(g.reason)}</td>"
        f"<td>{', '.join(_example(key) for key in g.examples)}"
        f"{' …' if g.count > len(g.examples) else ''}</td></tr>"
        for g in groups
    )
    return (
        "<h3>Open rejects by reason</h3><table class='reasons'><tr><th>records</th>"
        f"<th>code</th><th>reason</th><th>for example</th></tr>{rows}</table>"
    )


def _runs_table(runs: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{column}</th>" for column in RUN_COLUMNS[1:])
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td class='n'>{_number(run[c])}</td>"
            if isinstance(run[c], int | float) and not isinstance(run[c], bool)
            else f"<td>{_when(run[c]) if c == 'started_at' else _text(run[c])}</td>"
            for c in RUN_COLUMNS[1:]
        )
        + "</tr>"
        for run in reversed(runs)
    )
    return (
        f"<details><summary>Every run shown, newest first</summary>"
        f"<table class='runs'><tr>{head}</tr>{rows}</table></details>"
    )


def _example(key: str | None) -> str:
    return "<em>no key</em>" if key is None else f"<code>{_text(key)}</code>"


def _text(value: Any) -> str:
    """Text from the state, for the page: keys scrubbed, then escaped."""
    return "" if value is None else html.escape(redact(str(value)), quote=True)


def _value(value: Any) -> float:
    return float(value or 0)


def _number(value: Any) -> str:
    if value is None:
        return "&ndash;"
    number = float(value)
    return f"{number:,.0f}" if number.is_integer() else f"{number:,.1f}"


def _when(value: Any) -> str:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return _text(value)


def _nice_ceiling(value: float) -> float:
    """The chart's top: 1, 2 or 5 times a power of ten, at or above the largest bar."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return float(next(step * power for step in (1, 2, 5, 10) if step * power >= value))
