"""The drift check's outputs: `reports/drift/drift-<UTC time>.html` (self-contained: the Evidently reports of
every compared data set inline, after a summary) and `.json` (the verdict and every column's score)."""

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
    """Write `drift-<UTC time>.html` (self-contained: the Evidently reports inline) and `.json` (the summary),
    atomically; then remove all but the newest `keep` pairs. Sets result.html_path / json_path."""
    moment = datetime.fromisoformat(result.checked_at)
    stem = f"drift-{moment:%Y%m%dT%H%M%S}{moment.microsecond // 1000:03d}Z"
    result.html_path, result.json_path = folder / f"{stem}.html", folder / f"{stem}.json"
    with atomic_path(result.html_path) as tmp:
        tmp.write_text(_render_html(result), encoding="utf-8")
    with atomic_path(result.json_path) as tmp:  # written last: a summary always has its report
        tmp.write_text(json.dumps(result.summary(), indent=2))
    summaries = sorted(folder.glob("drift-*.json"))
    for old in summaries[: max(len(summaries) - keep, 0)]:
        old.with_suffix(".html").unlink(missing_ok=True)
        old.unlink(missing_ok=True)


def _render_html(result: DriftResult) -> str:
    esc = html.escape
    verdict = "DRIFT" if result.drifted else "no drift"
    rows = "".join(
        f"<tr><td>{esc(d.name)}</td><td>{esc(c.column)}</td><td>{esc(c.method)}</td><td>{c.score:.4f}</td>"
        f"<td>{c.threshold:g}</td><td>{'drifted' if c.drifted else ''}</td></tr>"
        for d in result.datasets
        for c in d.columns
    )
    labels = list(result.aggregates.get("reference", {}))
    agg = "".join(
        f"<tr><td>{esc(k)}</td>"
        + "".join(f"<td>{result.aggregates[w].get(k, float('nan')):g}</td>" for w in ("reference", "current"))
        + "</tr>"
        for k in labels
    )
    frames = "".join(
        f"<h2>{esc(name)}</h2><iframe style='width:100%;height:1100px;border:1px solid #ccc' "
        f'srcdoc="{esc(snapshot.get_html_str(as_iframe=False), quote=True)}"></iframe>'
        for name, snapshot in result.snapshots.items()
    )
    skipped = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in result.skipped.items())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>recflow drift {esc(result.checked_at)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}</style></head><body>"
        f"<h1>recflow drift check: {verdict}</h1><p>checked at {esc(result.checked_at)}; windows "
        f"{esc(json.dumps(result.windows.as_dict()))}</p>"
        f"<ul>{''.join(f'<li>{esc(r)}</li>' for r in result.reasons)}</ul>"
        + (f"<p>not compared:</p><ul>{skipped}</ul>" if skipped else "")
        + f"<table><tr><th>aggregate</th><th>reference</th><th>current</th></tr>{agg}</table>"
        f"<table><tr><th>data set</th><th>column</th><th>method</th><th>score</th><th>threshold</th><th></th></tr>"
        f"{rows}</table>{frames}</body></html>"
    )
