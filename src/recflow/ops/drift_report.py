"""The drift check's outputs in `reports/drift/`: `drift-<UTC time>.html` (the page people open), `.json` (the verdict
and every column's test) and, when columns drifted, `.evidently.json` (Evidently's snapshot of those columns).

The HTML opens with the verdict, the two windows as dates and sizes, and the drifted columns with how far they moved,
what they needed and Evidently's own score; then every column's test. It embeds no Evidently report: Evidently 0.7
renders a report only as a page with its 3.5 MB script inline (`Snapshot.save_html` / `get_html_str`), so its detail
(the distributions it plots) is saved as the snapshot JSON, which `evidently.core.report.Snapshot.load(path)` reads
back (`.save_html(...)` renders it, or add it to an Evidently workspace). A drifted page is ~15 kB, its snapshot
~100 kB per few columns."""

from __future__ import annotations

import html
import json
from datetime import datetime
from pathlib import Path

from recflow.config import Settings
from recflow.files import atomic_path
from recflow.ops.drift import DriftResult, check_drift

REPORT_DIR = "drift"  # under paths.reports


def run_drift(settings: Settings, *, root: Path = Path("."), end: datetime | None = None) -> DriftResult:
    """Check drift and write the report pair into `<reports>/drift/` (what the CLI and the flow call)."""
    result = check_drift(settings, root=root, end=end)
    write_report(result, root / settings.paths.reports / REPORT_DIR, keep=settings.drift.keep_reports)
    return result


def write_report(result: DriftResult, folder: Path, *, keep: int) -> None:
    """Write `drift-<UTC time>.html`, `.evidently.json` (when columns drifted) and `.json` (the summary), atomically;
    then remove all but the newest `keep` checks' files. Sets result.html_path / evidently_path / json_path."""
    moment = datetime.fromisoformat(result.checked_at)
    stem = f"drift-{moment:%Y%m%dT%H%M%S}{moment.microsecond // 1000:03d}Z"
    result.html_path, result.json_path = folder / f"{stem}.html", folder / f"{stem}.json"
    if result.evidently is not None:
        result.evidently_path = folder / f"{stem}{_EVIDENTLY}"
        with atomic_path(result.evidently_path) as tmp:
            tmp.write_text(result.evidently.dumps(), encoding="utf-8")
    with atomic_path(result.html_path) as tmp:
        tmp.write_text(_render_html(result), encoding="utf-8")
    with atomic_path(result.json_path) as tmp:  # written last: a summary always has its report
        tmp.write_text(json.dumps(result.summary(), indent=2))
    summaries = sorted(p for p in folder.glob("drift-*.json") if not p.name.endswith(_EVIDENTLY))
    for old in summaries[: max(len(summaries) - keep, 0)]:
        old.with_suffix(".html").unlink(missing_ok=True)
        old.with_suffix(_EVIDENTLY).unlink(missing_ok=True)
        old.unlink(missing_ok=True)


_EVIDENTLY = ".evidently.json"


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:80em}td,th{padding:2px 8px;text-align:left;vertical-align:top}"
    "table{border-collapse:collapse;margin:1em 0}tr:nth-child(even){background:#f4f4f4}"
    ".drift{color:#b00;font-weight:bold}"
    ".verdict{font-size:1.6em}"
)


def _render_html(result: DriftResult) -> str:
    esc = html.escape
    w = result.windows
    gap = (w.current_start - w.reference_start).total_seconds() / 86_400  # each lookback ends a reference window early
    lookback = (w.reference_start - w.lookback_start).total_seconds() / 86_400 - gap
    window_rows = "".join(
        f"<tr><td>{label}</td><td>{start:%Y-%m-%d %H:%M}</td><td>{stop:%Y-%m-%d %H:%M}</td>"
        f"<td>{result.sizes[label]['users']:,}</td><td>{result.sizes[label]['events']:,}</td>"
        f"<td>{lookback:g} days, ending {gap:g} days before it</td></tr>"
        for label, start, stop in (
            ("reference", w.reference_start, w.current_start),
            ("current", w.current_start, w.end),
        )
    )
    evidently = _evidently_scores(result)
    flagged = "".join(
        f"<tr><td>{esc(name)}</td><td class='drift'>{esc(c.column)}</td><td>{esc(c.method)}</td><td>{c.score:.3f}</td>"
        f"<td>{c.critical:.3f}</td><td>{c.null_median:.3f}</td><td>{c.p_value:.4f}</td><td>{esc(c.reference)}</td>"
        f"<td>{esc(c.current)}</td><td>{evidently.get(f'{name}.{c.column}', float('nan')):.3f}</td></tr>"
        for name, c in result.flagged()
    )
    every = "".join(
        f"<tr><td>{esc(d.name)}</td><td>{esc(c.column)}</td><td>{esc(c.method)}</td><td>{c.score:.3f}</td>"
        f"<td>{c.critical:.3f}</td><td>{c.p_value:.4f}</td><td>{'<b class=drift>drifted</b>' if c.drifted else ''}</td>"
        f"<td>{d.reference_users:,} / {d.current_users:,}</td><td>{d.reference_rows:,} / {d.current_rows:,}</td></tr>"
        for d in result.datasets
        for c in d.columns
    )
    column_head = "<th>column</th><th>distance</th><th>score</th><th>needed</th>"
    labels = list(result.aggregates.get("reference", {}))
    agg = "".join(
        f"<tr><td>{esc(k)}</td>"
        + "".join(f"<td>{result.aggregates[x].get(k, float('nan')):g}</td>" for x in ("reference", "current"))
        + "</tr>"
        for k in labels
    )
    name = "" if result.evidently_path is None else esc(result.evidently_path.name, quote=True)
    detail = (
        f"<p>Evidently's detail of the drifted columns (ValueDrift: distributions, same distance and threshold) is its "
        f"snapshot <a href='{name}'>{name}</a>; to see it: <code>python -c \"from evidently.core.report import "
        f"Snapshot; Snapshot.load('{name}').save_html('evidently.html')\"</code> (a page of ~4 MB, Evidently's "
        "script inline), or add it to an Evidently workspace.</p>"
        if name
        else ""
    )
    skipped = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in result.skipped.items())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>recflow drift: {esc(result.status)}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1 class='verdict'>Drift check: <span class='{'drift' if result.drifted else ''}'>"
        f"{esc(result.status.upper())}</span></h1>"
        f"<ul>{''.join(f'<li>{esc(r)}</li>' for r in result.reasons)}</ul>"
        "<h2>Windows (UTC)</h2><table><tr><th>window</th><th>from</th><th>until</th><th>active users</th>"
        f"<th>events</th><th>its lookback (new items and users, popularity)</th></tr>{window_rows}</table>"
        + (
            f"<h2>Drifted columns</h2><table><tr><th>data set</th>{column_head}<th>random splits: median</th>"
            f"<th>p (adjusted)</th><th>reference</th><th>current</th><th>Evidently's score</th></tr>{flagged}</table>"
            + detail
            if flagged
            else ""
        )
        + (f"<p>not compared:</p><ul>{skipped}</ul>" if skipped else "")
        + "<p>A column drifts when its distance beats what random splits of the same users reach (min-p adjusted "
        "p-value below the data set's alpha) and is at least its floor (params.yaml drift.*.min_effect); "
        "'needed' is the larger of the two. Every user weighs the same in a window's distribution and summaries.</p>"
        f"<h2>Every column</h2><table><tr><th>data set</th>{column_head}<th>p (adjusted)</th><th></th>"
        f"<th>users ref / cur</th><th>rows ref / cur</th></tr>{every}</table>"
        f"<h2>Window aggregates</h2><table><tr><th>aggregate</th><th>reference</th><th>current</th></tr>{agg}</table>"
        + f"<p>checked at {esc(result.checked_at)}</p></body></html>"
    )


def _evidently_scores(result: DriftResult) -> dict[str, float]:
    """`<data set>.<column>` -> Evidently's ValueDrift score of that drifted column (empty: no Evidently report)."""
    if result.evidently is None:
        return {}
    return {m["config"]["column"]: float(m["value"]) for m in result.evidently.dict()["metrics"]}
