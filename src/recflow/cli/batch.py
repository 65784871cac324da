"""The batch loop's commands: generate or import events, ingest them, build features, train, evaluate,
recommend, and `demo` running them all."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from recflow.cli.common import ParamsOption, app, console, out, steps
from recflow.config import DEFAULT_PARAMS, load_settings


class ImportFormat(StrEnum):
    movielens = "movielens"
    retailrocket = "retailrocket"
    csv = "csv"


def print_ingest(report: object) -> None:
    from recflow.store.eventstore import IngestReport

    assert isinstance(report, IngestReport)
    table = Table(title="ingest")
    for column in ("read", "stored", "duplicate", "rejected"):
        table.add_column(column, justify="right")
    table.add_row(*(f"{getattr(report, c):,}" for c in ("read", "stored", "duplicate", "rejected")))
    out.print(table)
    if report.rejected:
        reasons = ", ".join(f"{code}: {count:,}" for code, count in sorted(report.reasons.items()))
        where = report.rejected_path or "already in the rejected log (each refused record is kept once)"
        out.print(f"rejected by reason: {reasons}\nrejected records with their reasons: {where}")


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
    from recflow.events.fileio import write_events
    from recflow.events.synth import DriftSpec, generate_events

    settings = load_settings(params)
    changes = {k: v for k, v in dict(events=events, users=users, items=items, days=days, seed=seed).items() if v}
    conf = settings.replace("generate", **changes).generate
    target = out_file or settings.paths.inbox / f"generated-seed{conf.seed}-{conf.events}.parquet"
    with steps("generate") as progress:
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
    from recflow.events import importers
    from recflow.events.fileio import write_events

    settings = load_settings(params)
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
            action_map=importers.parse_mapping(action_map or [], contract_fields=False),
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
    """Validate events and append them to the event store; duplicates are skipped, bad records logged. Without
    paths: the inbox files not ingested before (the inbox's manifest records each one ingested)."""
    from recflow.store.eventstore import IngestReport, ingest_files
    from recflow.store.inbox import ingest_inbox, pending_files

    settings = load_settings(params)
    conf = settings.paths
    if not paths and not pending_files(conf.inbox):
        out.print(f"nothing new in {conf.inbox}: every event file there was ingested before")
        return
    with steps("ingest") as progress:
        task = progress.add_task("ingesting", total=None, step="")
        store, rejected, events = conf.store, conf.rejected, settings.events

        def on_file(path: Path, report: IngestReport) -> None:
            progress.update(task, step=f"{path.name}: {report.stored:,} stored")

        if paths:
            report = ingest_files(paths, store=store, rejected=rejected, settings=events, on_file=on_file)
        else:
            report = ingest_inbox(conf.inbox, store=store, rejected=rejected, settings=events, on_file=on_file)
    print_ingest(report)


@app.command()
def status(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Show what the event store holds and what the last training and evaluation produced."""
    from recflow.model.evaluate import METRICS_FILE
    from recflow.store.eventstore import store_summary

    settings = load_settings(params)
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
    metrics = settings.paths.models / METRICS_FILE
    if metrics.exists():
        from recflow.model.evaluate import load_report

        print_metrics(load_report(metrics), "the test window")
    else:
        out.print("no evaluation yet: run recflow features, train and evaluate (or dvc repro)")


@app.command()
def features(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Encode the event store into interactions with id maps and a temporal train/validation/test split."""
    from recflow.model.features import build_features

    settings = load_settings(params)
    with console.status("building features"):
        summary = build_features(settings.paths.store, settings.paths.features, settings)
    out.print(
        f"features: {summary.events:,} events, {summary.users:,} users, {summary.items:,} items; "
        f"split ({summary.method}) fit {summary.fit:,} / validation {summary.validation:,} / test {summary.test:,}"
    )


@app.command()
def profile(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Describe the event store's shape (span, events per user, one-event users, sessions, whether timestamps
    carry information): what the train stage's choices refer to. `recflow features` writes it too."""
    from recflow.constants import ACTION, ITEM_ID, TIMESTAMP, USER_ID
    from recflow.model.features import encode_events
    from recflow.model.profile import profile_interactions
    from recflow.store.eventstore import scan_store

    settings = load_settings(params)
    with console.status("reading the event store"):
        table = scan_store(settings.paths.store, columns=[USER_ID, ITEM_ID, ACTION, TIMESTAMP])
        shape = profile_interactions(encode_events(table, tuple(settings.events.actions)))
    print_profile(shape.as_dict())


def print_profile(shape: dict[str, object]) -> None:
    table = Table(title="data profile")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in shape.items():
        table.add_row(name, f"{value:,.4g}" if isinstance(value, float) else str(value))
    out.print(table)


@app.command()
def train(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Choose on validation folds and fit the served model (popularity, item-kNN, EASE, ALS or ALS + ranker), and
    write the backtest and deployable bundles; prints the validation table and the reason for the choice."""
    from recflow.model import training

    settings = load_settings(params)
    with steps("train") as progress:
        task = progress.add_task("training", total=8, step="")
        report = training.train(
            settings.paths.features,
            settings.paths.models,
            settings,
            progress=lambda step: progress.update(task, advance=1, step=step),
        )
        progress.update(task, completed=8, step="done")
    print_train(report)


def print_train(report: object) -> None:
    from recflow.model.scoring import KIND_TWO_STAGE
    from recflow.model.training import TrainReport

    assert isinstance(report, TrainReport)
    folds = ", ".join(
        f"{f['protocol']} ({f['tune_users']} tune / {f['select_users']} select users"
        + (f" + {f['ranker_only_users']} the ranker learns from)" if f.get("ranker_only_users") else ")")
        for f in report.folds
    )
    out.print(f"validation folds: {folds}")
    table = Table(title="validation NDCG@10 (users nothing was tuned on)")
    for column in ("model", "NDCG@10", "95% interval", "coverage@10", "users"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for kind, values in sorted(report.validation.items(), key=lambda kv: -kv[1]["ndcg@10"]):
        low, high = values["ci95"]
        table.add_row(
            kind,
            f"{values['ndcg@10']:.4f}",
            f"{low:.4f}-{high:.4f}",
            f"{values['coverage@10']:.3f}",
            str(values["users"]),
        )
    out.print(table)
    choices = report.choices
    als = ", ".join(f"{k}={v}" for k, v in choices["als"].items() if k != "random_state")
    decay = f"half-life {choices['half_life_days']:g} days" if choices["half_life_days"] else "none"
    window = f"last {choices['popularity_window_days']:g} days" if choices["popularity_window_days"] else "all time"
    sizes = choices.get("candidates")
    served = f", candidates ALS/popular/item-item {'/'.join(map(str, sizes))}" if sizes else ""
    if report.kind == KIND_TWO_STAGE and report.ranker and report.ranker.get("num_leaves"):
        served += f", ranker {report.ranker['num_leaves']} leaves per tree"
    out.print(f"chosen: decay {decay}, popularity {window}, item-item {choices['item_item']}, ALS {als}{served}")
    out.print(f"[bold]serving {report.kind}[/bold]: {report.decided}")
    if report.backtest["kind"] != report.kind:
        out.print(
            f"the backtest `recflow evaluate` scores was chosen on the data before the test window: "
            f"{report.backtest['kind']} ({report.backtest['decided']})"
        )
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def print_metrics(report: object, where: str) -> None:
    from recflow.model.evaluate import SERVED, EvaluationReport

    assert isinstance(report, EvaluationReport)
    table = Table(title=f"offline evaluation on {where}: {report.users:,} users (served model: {report.served_kind})")
    names = [n for n in next(iter(report.metrics.values())) if n != "users"]
    table.add_column("model")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("NDCG 95% interval", justify="right")
    for model, values in report.metrics.items():
        low, high = report.intervals.get(model, (float("nan"), float("nan")))
        label = f"[bold]{model}[/bold]" if model == SERVED else model
        table.add_row(label, *(f"{values[n]:.4f}" for n in names), f"{low:.4f}-{high:.4f}")
    out.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


@app.command()
def evaluate(
    holdout: Annotated[
        Path | None,
        typer.Option(
            help="Score the deployable model on your own held-out events (any event file ingest reads), as of the "
            "end of its training data; relevant = each known user's held-out items the user did not have."
        ),
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Score the served model and the baselines on events the model did not train on: the test window (backtest
    bundle), or --holdout FILE (deployable bundle). Same scoring function as `recflow recommend`."""
    from recflow.model import evaluate as evaluation

    settings = load_settings(params)
    with steps("evaluate") as progress:
        task = progress.add_task("evaluating", total=6, step="")

        def advance(name: str) -> None:
            progress.update(task, advance=1, step=name)

        if holdout is not None:
            report = evaluation.evaluate_holdout(holdout, settings.paths.models, settings, progress=advance)
        else:
            report = evaluation.evaluate(
                settings.paths.features, settings.paths.models, settings.paths.reports, settings, progress=advance
            )
    print_metrics(report, str(holdout) if holdout else "the test window")


@app.command()
def recommend(
    users: Annotated[Path, typer.Option(help="User ids: a text file with one id per line, or CSV/JSONL with user_id.")],
    output: Annotated[Path, typer.Option(help="JSONL output, one line per user.")] = Path("recs.jsonl"),
    k: Annotated[int, typer.Option(min=1, max=1000, help="Items per user.")] = 20,
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of",
            help="Answer as of: a time (ISO-8601 with offset, or epoch seconds), last-event (each user's last "
            "event), or column (the users file's as_of column). Default: the end of the training data.",
        ),
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Write top-k recommendations per user from the served model (popular items for unknown users), by the same
    scoring function as the service and `recflow evaluate`."""
    from recflow.model.recommend import read_user_ids, write_recommendations

    settings = load_settings(params)
    user_ids = read_user_ids(users)
    with console.status(f"recommending for {len(user_ids):,} users"):
        counts = write_recommendations(settings.paths.models, user_ids, k, output, as_of=as_of, users_file=users)
    out.print(
        f"wrote {output}: {counts['personalized']:,} users personalised, {counts['popular']:,} unknown "
        "users given popular items"
    )


@app.command()
def demo(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Run the whole batch loop on generated data: generate, ingest, features, train, evaluate."""
    settings = load_settings(params)
    conf = settings.generate
    inbox_file = settings.paths.inbox / f"generated-seed{conf.seed}-{conf.events}.parquet"
    if not inbox_file.exists():
        generate(out_file=inbox_file, params=params)
    ingest(paths=[inbox_file], params=params)
    features(params=params)
    train(params=params)
    evaluate(params=params)
