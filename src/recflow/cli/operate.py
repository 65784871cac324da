"""Running the model in production: deploy behind the gate, roll back, list versions, serve over HTTP, check
drift, serve the schedules."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from recflow.cli.common import ParamsOption, app, console, out
from recflow.config import DEFAULT_PARAMS, load_settings


@app.command()
def deploy(
    user: Annotated[str | None, typer.Option(help="Who deploys (recorded in the history); default: OS user.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even if the gate refuses (still recorded).")] = False,
    fail_on_refusal: Annotated[
        bool, typer.Option(help="Exit with status 1 when the gate refuses the candidate (for scripts and CI).")
    ] = False,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Save the trained model as a version and promote it if it passes the gate (NDCG@10 on the current test
    window at least production's minus registry.tolerance); otherwise production stays and this says why."""
    from recflow.ops import registry

    settings = load_settings(params)
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
    if fail_on_refusal and not decision.promoted:
        raise typer.Exit(1)


@app.command()
def rollback(
    user: Annotated[str | None, typer.Option(help="Who rolls back (recorded in the history).")] = None,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Return production to the version that was in production before the current one."""
    import time

    from recflow.ops import registry

    settings = load_settings(params)
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
    from recflow.ops import registry

    settings = load_settings(params)
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
    load_settings(params).service.resolved(os.environ)  # a setting the service would refuse, told here
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
    from recflow.ops.drift_report import run_drift

    settings = load_settings(params)
    with console.status("checking drift (Evidently)"):
        result = run_drift(settings)
    w = result.windows
    table = Table(
        title=f"drift: current {w.current_start:%Y-%m-%d %H:%M} .. {w.end:%Y-%m-%d %H:%M} UTC "
        f"vs the reference window from {w.reference_start:%Y-%m-%d %H:%M}"
    )
    for column in ("data set", "users (ref / cur)", "rows (ref / cur)", "drifted columns (score / needed)", "drift"):
        table.add_column(column)
    for d in result.datasets:
        names = ", ".join(f"{c.column} ({c.score:.3f} / {c.critical:.3f})" for c in d.columns if c.drifted) or "-"
        flag = "[bold red]yes[/]" if d.drifted else "no"
        users = f"{d.reference_users:,} / {d.current_users:,}"
        table.add_row(d.name, users, f"{d.reference_rows:,} / {d.current_rows:,}", names, flag)
    out.print(table)
    for name, why in result.skipped.items():
        out.print(f"not compared: {name}: {why}")
    for reason in result.reasons if not result.datasets else []:
        out.print(reason)
    out.print(f"verdict: {'DRIFT, retrain' if result.drifted else result.status}")
    out.print(f"report: {result.html_path}\nsummary: {result.json_path}")
    if result.evidently_path is not None:
        out.print(f"Evidently's snapshot of the drifted columns: {result.evidently_path}")
    if fail_on_drift and result.drifted:
        raise typer.Exit(1)


@app.command()
def schedule(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Serve the scheduled flows of prefect.yaml (ingest every 5 minutes, drift hourly, pipeline nightly) from
    this process against the Prefect server at PREFECT_API_URL: `python -m flows.serve` (see flows/README.md).

    Run it in the recflow project folder (the checkout with flows/ and prefect.yaml): the Prefect flows are
    part of the project, not of the installed recflow package."""
    from recflow.errors import ConfigError

    missing = [name for name in ("flows/serve.py", "prefect.yaml") if not Path(name).exists()]
    if missing:
        raise ConfigError(
            f"`recflow schedule` needs the recflow project folder, and {Path.cwd()} is not one (no "
            f"{' or '.join(missing)}): the Prefect flows are not installed with the package, so run it in the "
            "project checkout"
        )
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "PREFECT_API_URL is not set: run `prefect server start` and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (schedules never fire on Prefect's temporary server)"
        )
    os.execv(sys.executable, [sys.executable, "-m", "flows.serve", "--params", str(params)])
