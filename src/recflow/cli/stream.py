"""The real-time event path's commands: publish events to the event log, consume them into the store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from recflow.cli.common import ParamsOption, app, out, steps
from recflow.config import DEFAULT_PARAMS, load_settings

store_app = typer.Typer(help="Look after the event store.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("check")
def store_check(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Read every file of the event store in full and name the ones that cannot be read (exit 1 if any)."""
    from recflow.store.health import check_store, data_files

    settings = load_settings(params)
    store = settings.paths.store
    with steps("store check") as progress:
        task = progress.add_task(f"reading {store}", total=None, step="")
        bad = check_store(store, progress=lambda done, total: progress.update(task, completed=done, total=total))
    files = len(data_files(store))
    if not bad:
        out.print(f"{store}: all {files:,} files read in full")
        return
    table = Table(title=f"{len(bad):,} of {files:,} files of {store} cannot be read")
    table.add_column("file")
    table.add_column("problem")
    for corrupt in bad:
        table.add_row(str(corrupt.path), corrupt.problem)
    out.print(table)
    out.print("restore them (dvc checkout, a backup) or move them out of the store; the other files stay valid")
    raise typer.Exit(1)


@app.command()
def publish(
    file: Annotated[Path, typer.Argument(help="Event file (.jsonl, .csv or .parquet) whose records to publish.")],
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Append the events of a file to the event log: the Redis stream (eventlog.redis_url or RECFLOW_REDIS_URL)
    or, without Redis, the local spool. `recflow consume` then stores them."""
    from recflow.stream.log import open_event_log, publish_file

    settings = load_settings(params)
    log = open_event_log(settings.eventlog)
    log.ping()
    with steps("publish") as progress:
        task = progress.add_task(f"publishing {file.name}", total=None, step="")
        report = publish_file(
            log, file, progress=lambda done, total: progress.update(task, completed=done, total=total, step=f"{done:,}")
        )
    out.print(f"published {report.published:,} events to {log.where}; next: recflow consume")
    if report.unreadable:
        from recflow.store.eventstore import record_rejections

        paths = settings.paths
        kept = record_rejections(report.unreadable, store=paths.store, rejected=paths.rejected)
        shown = "; ".join(f"record {r.record}: {r.reason}" for r in report.unreadable[:3])
        count = len(report.unreadable)
        out.print(
            f"[bold yellow]{count:,} records could not be read and were not published:[/] {shown}; "
            f"each with its reason in {kept or 'the rejected log (kept there before)'}"
        )


@app.command()
def consume(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep storing new events until Ctrl-C.")] = False,
    consumer: Annotated[
        str | None, typer.Option(help="Consumer name (default: eventlog.consumer in params.yaml, else the host name).")
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Store the events waiting in the event log into the event store, acknowledging each batch once it is
    stored; invalid events go to the rejected log, poison entries to the dead-letter log."""
    import signal
    import threading

    from recflow.stream.consumer import DrainReport, drain
    from recflow.stream.log import open_event_log

    settings = load_settings(params)
    open_event_log(settings.eventlog).ping()  # an unreachable log: one error line, before any progress
    stop = threading.Event()

    def request_stop(*_: object) -> None:  # the first signal finishes the batch in hand, a second one aborts
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)

    def lag_text(report: DrainReport) -> str:
        lag = report.lag
        return "?" if lag is None or lag.total is None else f"{lag.total:,}"

    with steps("consume") as progress:
        task = progress.add_task("following" if follow else "draining", total=None, step="")
        report = drain(
            settings,
            follow=follow,
            consumer=consumer,
            stop=stop,
            on_batch=lambda r: progress.update(
                task, step=f"{r.read:,} read, {r.stored:,} stored, {r.dead_lettered:,} dead-lettered, lag {lag_text(r)}"
            ),
        )
    table = Table(title=f"consume {report.where}")
    columns = ("read", "stored", "duplicate", "rejected", "dead_lettered")
    for column in (*columns, "lag"):
        table.add_column(column.replace("_", "-"), justify="right")
    table.add_row(*(f"{getattr(report, c):,}" for c in columns), lag_text(report))
    out.print(table)
    if report.rejected:
        reasons = ", ".join(f"{code}: {count:,}" for code, count in sorted(report.reasons.items()))
        out.print(f"rejected by reason: {reasons}; rejected records with their reasons: {settings.paths.rejected}")
    if report.dead_lettered:
        kinds = ", ".join(f"{kind}: {count:,}" for kind, count in sorted(report.dead_letter_reasons.items()))
        out.print(f"dead-lettered ({kinds}), each with its reason: {report.dead_letters}")
