"""The `recflow` command line: one command per stage, each a thin shell over a library function."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from recflow.config import DEFAULT_PARAMS, Settings, load_settings
from recflow.errors import RecflowError

app = typer.Typer(
    name="recflow",
    help="recflow: events in, recommendations out. Each command is one stage of the batch loop; "
    "paths and parameters default to params.yaml.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True)
out = Console()

ParamsOption = Annotated[Path, typer.Option("--params", help="Parameter file (paths and knobs).")]


class ImportFormat(StrEnum):
    movielens = "movielens"
    retailrocket = "retailrocket"
    csv = "csv"


@app.callback()
def _configure(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


def _settings(params: Path) -> Settings:
    return load_settings(params)


@contextmanager
def _steps(description: str) -> Iterator[Progress]:
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[step]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        yield progress


def _print_ingest(report: object) -> None:
    from recflow.store import IngestReport

    assert isinstance(report, IngestReport)
    table = Table(title="ingest")
    for column in ("read", "stored", "duplicate", "rejected"):
        table.add_column(column, justify="right")
    table.add_row(*(f"{getattr(report, c):,}" for c in ("read", "stored", "duplicate", "rejected")))
    out.print(table)
    if report.rejected:
        reasons = ", ".join(f"{code}: {count:,}" for code, count in sorted(report.reasons.items()))
        out.print(f"rejected by reason: {reasons}\nrejected records with their reasons: {report.rejected_path}")


@app.command()
def generate(
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Event file to write (.parquet, .csv or .jsonl); default: inbox.")
    ] = None,
    events: Annotated[int | None, typer.Option(help="Number of events (default: params.yaml generate.events).")] = None,
    users: Annotated[int | None, typer.Option(help="Number of users.")] = None,
    items: Annotated[int | None, typer.Option(help="Number of items.")] = None,
    days: Annotated[int | None, typer.Option(help="Days the events span.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed: the same seed gives the same events.")] = None,
    drift: Annotated[
        float | None,
        typer.Option(
            help="Inject drift after this fraction of the time range (popularity shift, new items, action mix)."
        ),
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Generate synthetic events with structure a recommender can learn (taste groups, funnel, sessions)."""
    from recflow.eventio import write_events
    from recflow.synth import DriftSpec, generate_events

    settings = _settings(params)
    changes = {k: v for k, v in dict(events=events, users=users, items=items, days=days, seed=seed).items() if v}
    conf = settings.replace("generate", **changes).generate
    target = out_file or settings.paths.inbox / f"generated-seed{conf.seed}-{conf.events}.parquet"
    with _steps("generate") as progress:
        task = progress.add_task("generating events", total=conf.events, step="")
        table = generate_events(
            conf,
            drift=None if drift is None else DriftSpec(start_fraction=drift),
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
        progress.update(task, completed=conf.events, step=f"writing {target}")
        write_events(table, target)
    out.print(f"wrote {table.num_rows:,} events to {target}")


@app.command("import")
def import_(
    fmt: Annotated[ImportFormat, typer.Argument(help="Source format.")],
    source: Annotated[Path, typer.Argument(help="Source file or directory.")],
    out_file: Annotated[Path | None, typer.Option("--out", help="Event file to write; default: inbox.")] = None,
    mapping: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            help="csv only: FIELD=COLUMN, e.g. --map user_id=customer; a fixed action: --map action==purchase.",
        ),
    ] = None,
    action_map: Annotated[
        list[str] | None, typer.Option("--action", help="csv only: SOURCE=ACTION, e.g. --action buy=purchase.")
    ] = None,
    timestamp_unit: Annotated[
        str | None, typer.Option(help="csv only: s or ms when the timestamp column holds epoch numbers.")
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Convert MovieLens, RetailRocket or any mapped CSV into an event file of the recflow contract."""
    from recflow import importers
    from recflow.eventio import write_events

    settings = _settings(params)
    if fmt is ImportFormat.movielens:
        table = importers.import_movielens(source)
    elif fmt is ImportFormat.retailrocket:
        table = importers.import_retailrocket(source)
    else:
        if not mapping:
            raise typer.BadParameter("csv needs --map FIELD=COLUMN for user_id, item_id, action and timestamp")
        table = importers.import_mapped_csv(
            source,
            importers.parse_mapping(mapping),
            action_map=importers.parse_mapping(action_map or [], fields=None),
            timestamp_unit=timestamp_unit,
        )
    target = out_file or settings.paths.inbox / f"{fmt.value}-{source.stem}.parquet"
    write_events(table, target)
    out.print(f"wrote {table.num_rows:,} events to {target}; next: recflow ingest {target}")


@app.command()
def ingest(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Event files or folders (.jsonl, .csv, .parquet); default: the inbox.")
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Validate events and append them to the event store; duplicates are skipped, bad records logged."""
    from recflow.store import ingest_files

    settings = _settings(params)
    sources = paths or [settings.paths.inbox]
    with _steps("ingest") as progress:
        task = progress.add_task("ingesting", total=None, step="")
        report = ingest_files(
            sources,
            store=settings.paths.store,
            rejected=settings.paths.rejected,
            settings=settings.events,
            on_file=lambda path, r: progress.update(task, step=f"{path.name}: {r.stored:,} stored"),
        )
    _print_ingest(report)


@app.command()
def status(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Show what the event store holds and what the last training and evaluation produced."""
    from recflow.store import store_summary

    settings = _settings(params)
    summary = store_summary(settings.paths.store)
    table = Table(title=f"event store {settings.paths.store}")
    table.add_column("events", justify="right")
    table.add_column("users", justify="right")
    table.add_column("items", justify="right")
    table.add_column("from")
    table.add_column("to")
    table.add_row(
        f"{summary.events:,}", f"{summary.users:,}", f"{summary.items:,}", str(summary.first), str(summary.last)
    )
    out.print(table)
    metrics = settings.paths.models / "metrics.json"
    if metrics.exists():
        _print_metrics(json.loads(metrics.read_text()))
    else:
        out.print("no evaluation yet: run recflow features, train and evaluate (or dvc repro)")


@app.command()
def features(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Encode the event store into interactions with id maps and a temporal train/validation/test split."""
    from recflow.features import build_features

    settings = _settings(params)
    with console.status("building features"):
        summary = build_features(settings.paths.store, settings.paths.features, settings)
    out.print(
        f"features: {summary.events:,} events, {summary.users:,} users, {summary.items:,} items; "
        f"split ({summary.method}) fit {summary.fit:,} / validation {summary.validation:,} / test {summary.test:,}"
    )


@app.command()
def train(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Tune and fit ALS, train the LightGBM ranker, and write the backtest and deployable bundles."""
    from recflow import training

    settings = _settings(params)
    with _steps("train") as progress:
        task = progress.add_task("training", total=4, step="")

        def advance(step: str) -> None:
            progress.update(task, advance=0 if step == "tune ALS" else 1, step=step)

        report = training.train(settings.paths.features, settings.paths.models, settings, progress=advance)
        progress.update(task, completed=4, step="done")
    chosen = ", ".join(f"{k}={v}" for k, v in report.als_params.items())
    out.print(f"ALS ({'tuned' if report.tuned else 'pinned'}, {len(report.tuning_trials)} trials): {chosen}")
    out.print(f"candidate recall@{report.n_candidates} on validation: {report.candidate_recall:.3f}")
    if report.ranker:
        out.print(
            f"ranker: {report.ranker['best_iteration']} trees, validation NDCG@10 "
            f"{report.ranker['validation_ndcg@10']:.4f} on {report.ranker['validation_queries']} users"
        )


def _print_metrics(metrics: dict[str, object]) -> None:
    models = {name: values for name, values in metrics.items() if isinstance(values, dict)}
    names = list(next(iter(models.values())))
    table = Table(title=f"offline evaluation on the test window ({metrics.get('users', '?')} users)")
    table.add_column("model")
    for name in names:
        table.add_column(name, justify="right")
    for model, values in models.items():
        table.add_row(model, *(f"{values[n]:.4f}" for n in names))
    out.print(table)


@app.command()
def evaluate(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Score ALS + ranker and the baselines (popularity, item-kNN, ALS alone) on the held-out test window."""
    from recflow import evaluate as evaluation

    settings = _settings(params)
    with _steps("evaluate") as progress:
        task = progress.add_task("evaluating", total=4, step="")
        report = evaluation.evaluate(
            settings.paths.features,
            settings.paths.models,
            settings.paths.reports,
            settings,
            progress=lambda name: progress.update(task, advance=1, step=name),
        )
    _print_metrics({**report.metrics, "users": report.users})


@app.command()
def recommend(
    users: Annotated[Path, typer.Option(help="User ids: a text file with one id per line, or CSV/JSONL with user_id.")],
    output: Annotated[Path, typer.Option(help="JSONL output, one line per user.")] = Path("recs.jsonl"),
    k: Annotated[int, typer.Option(min=1, max=1000, help="Items per user.")] = 20,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Write top-k recommendations per user from the trained two-stage model (popular items for unknown users)."""
    from recflow.recommend import read_user_ids, write_recommendations

    settings = _settings(params)
    user_ids = read_user_ids(users)
    with console.status(f"recommending for {len(user_ids):,} users"):
        counts = write_recommendations(settings.paths.models, user_ids, k, output)
    out.print(
        f"wrote {output}: {counts['personalized']:,} users personalised, {counts['popular']:,} unknown "
        "users given popular items"
    )


@app.command()
def demo(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Run the whole batch loop on generated data: generate, ingest, features, train, evaluate."""
    settings = _settings(params)
    conf = settings.generate
    inbox_file = settings.paths.inbox / f"generated-seed{conf.seed}-{conf.events}.parquet"
    if not inbox_file.exists():
        generate(out_file=inbox_file, params=params)
    ingest(paths=[inbox_file], params=params)
    features(params=params)
    train(params=params)
    evaluate(params=params)


@app.command()
def publish(
    file: Annotated[Path, typer.Argument(help="Event file (.jsonl, .csv or .parquet) whose records to publish.")],
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Append the events of a file to the event log: the Redis stream (eventlog.redis_url or RECFLOW_REDIS_URL)
    or, without Redis, the local spool. `recflow consume` then stores them."""
    from recflow.eventlog import open_event_log, publish_file

    settings = _settings(params)
    log = open_event_log(settings.eventlog)
    log.ping()
    with _steps("publish") as progress:
        task = progress.add_task(f"publishing {file.name}", total=None, step="")
        report = publish_file(
            log, file, progress=lambda done, total: progress.update(task, completed=done, total=total, step=f"{done:,}")
        )
    out.print(f"published {report.published:,} events to {log.where}; next: recflow consume")
    if report.unreadable:
        shown = "; ".join(f"record {r.record}: {r.reason}" for r in report.unreadable[:3])
        count = len(report.unreadable)
        out.print(f"[bold yellow]{count:,} records could not be read and were not published:[/] {shown}")


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

    from recflow.consumer import DrainReport, drain
    from recflow.eventlog import open_event_log

    settings = _settings(params)
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

    with _steps("consume") as progress:
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


@app.command()
def deploy(
    user: Annotated[str | None, typer.Option(help="Who deploys (recorded in the history); default: OS user.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even if the gate refuses (still recorded).")] = False,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Save the trained model as a version and promote it if it passes the gate (NDCG@10 on the current test
    window at least production's minus registry.tolerance); otherwise production stays and this says why."""
    from recflow import registry

    settings = _settings(params)
    with console.status("saving the candidate and scoring it against production on the current test window"):
        decision = registry.deploy(settings, user=user, force=force)
    table = Table(title=f"deploy: {decision.metric} on the current test window ({decision.users or 'no'} users)")
    table.add_column("version", no_wrap=True)
    for column in ("role", decision.metric, "at training", "data"):
        table.add_column(column, justify="left" if column in ("role", "data") else "right")
    rows = [(decision.candidate, "candidate", decision.candidate_score)]
    if decision.previous is not None and decision.previous != decision.candidate:
        rows.append((decision.previous, "production before", decision.production_score))
    for version, role, score in rows:
        offline = version.metrics.get(decision.metric)
        table.add_row(
            version.version,
            role,
            "-" if score is None else f"{score:.4f}",
            "-" if offline is None else f"{offline:.4f}",
            version.data_version if version.data_version == "untracked" else version.data_version[:8],
        )
    out.print(table)
    verdict = "[bold green]promoted[/]" if decision.promoted else "[bold yellow]not promoted[/]"
    out.print(f"{verdict}: {decision.reason}")
    production = decision.production
    out.print(f"production: {production.version if production else 'none'}")
    if decision.promoted and settings.service.reload_check_seconds > 0:
        out.print(f"a running service switches within {settings.service.reload_check_seconds:g} s (or POST /reload)")


@app.command()
def rollback(
    user: Annotated[str | None, typer.Option(help="Who rolls back (recorded in the history).")] = None,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Return production to the version that was in production before the current one."""
    import time

    from recflow import registry

    settings = _settings(params)
    began = time.perf_counter()
    before = registry.production(settings)
    restored = registry.rollback(settings, user=user)
    seconds = time.perf_counter() - began
    out.print(f"rolled back from {before.version if before else '?'} to {restored.version} in {seconds:.2f} s")


@app.command()
def versions(
    show_history: Annotated[bool, typer.Option("--history", help="Also list promotions, refusals, rollbacks.")] = False,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """List the model versions in the store with their offline metrics; the production one is marked."""
    from recflow import registry

    settings = _settings(params)
    found = registry.versions(settings)
    current = registry.production(settings)
    if not found:
        out.print(f"no versions in {registry.bentoml_home(settings)}: run recflow train, evaluate and deploy")
        return
    names = [n for n in found[-1].metrics if n.split("@")[0] in ("ndcg", "recall", "map")]
    table = Table(title=f"model versions in {registry.bentoml_home(settings)} (* = production)")
    table.add_column("")
    table.add_column("version", no_wrap=True)
    for column in ("data", "model", *names):
        table.add_column(column, justify="right" if "@" in column else "left")
    for version in found:
        marker = "*" if current is not None and version.version == current.version else ""
        table.add_row(
            marker,
            version.version,
            version.data_version if version.data_version == "untracked" else version.data_version[:8],
            version.model,
            *(f"{version.metrics[n]:.4f}" if n in version.metrics else "-" for n in names),
        )
    out.print(table)
    if show_history:
        records = Table(title="deployment history")
        for column in ("when", "who", "action", "version", "reason"):
            records.add_column(column)
        for record in registry.history(settings):
            records.add_row(record["at"], record["user"], record["action"], record["version"], record["reason"])
        out.print(records)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 3000,
    bentos: Annotated[Path, typer.Option(help="Folder with service.py and bentofile.yaml.")] = Path("bentos"),
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Serve the production model over HTTP (`bentoml serve` in bentos/, for the project of --params)."""
    if not (bentos / "service.py").exists():
        raise typer.BadParameter(f"no service.py in {bentos}: run this in the project folder or pass --bentos")
    _settings(params).service.resolved(os.environ)  # a setting the service would refuse, told here
    executable = Path(sys.executable).parent / "bentoml"
    os.environ["RECFLOW_PROJECT"] = str(params.resolve().parent)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.chdir(bentos)
    os.execv(executable, [str(executable), "serve", "--host", host, "--port", str(port)])


@app.command("drift")
def drift_check(
    fail_on_drift: Annotated[bool, typer.Option(help="Exit with status 1 when drift is flagged.")] = False,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Compare the current window of events and of the ranker's inputs with the reference window (params.yaml
    drift); writes reports/drift/drift-<UTC time>.html (the Evidently reports) and .json (the verdict)."""
    from recflow.driftreport import run_drift

    settings = _settings(params)
    with console.status("checking drift (Evidently)"):
        result = run_drift(settings)
    w = result.windows
    table = Table(
        title=f"drift: current {w.current_start:%Y-%m-%d %H:%M} .. {w.end:%Y-%m-%d %H:%M} UTC "
        f"vs the reference window from {w.reference_start:%Y-%m-%d %H:%M}"
    )
    for column in ("data set", "rows (ref / cur)", "drifted columns", "share", "drift"):
        table.add_column(column)
    for d in result.datasets:
        names = ", ".join(c.column for c in d.columns if c.drifted) or "-"
        share = f"{d.share:.2f} (>= {d.drift_share:g} flags)"
        flag = "[bold red]yes[/]" if d.drifted else "no"
        table.add_row(d.name, f"{d.reference_rows:,} / {d.current_rows:,}", names, share, flag)
    out.print(table)
    for name, why in result.skipped.items():
        out.print(f"not compared: {name}: {why}")
    out.print(f"verdict: {'DRIFT, retrain' if result.drifted else 'no drift'}")
    out.print(f"report: {result.html_path}\nsummary: {result.json_path}")
    if fail_on_drift and result.drifted:
        raise typer.Exit(1)


@app.command()
def schedule(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Serve the scheduled flows (ingest every 5 minutes, drift hourly, pipeline nightly) from this process
    against the Prefect server at PREFECT_API_URL: `python -m flows.serve` (see flows/README.md)."""
    from recflow.errors import ConfigError

    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "PREFECT_API_URL is not set: run `prefect server start` and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (schedules never fire on Prefect's temporary server)"
        )
    if not Path("flows/serve.py").exists():
        raise ConfigError("no flows/serve.py here: run `recflow schedule` in the recflow project folder")
    os.execv(sys.executable, [sys.executable, "-m", "flows.serve", "--params", str(params)])


def main() -> None:
    # Before numpy is imported (the stages import it lazily): implicit and the ranker run several times
    # slower when OpenBLAS starts its own threads next to theirs.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        app()
    except RecflowError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
