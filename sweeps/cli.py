"""The ``probesweep`` command line: small commands, heavy imports inside them (fast ``--help``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from sweeps.spec_files import redact_uri  # light: no torch, Ray or MLflow (fast --help)

app = typer.Typer(help="Sweep probes on frozen backbones, explain them, score localisation, log to MLflow.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
DEBUG_ENV = "PROBESWEEP_DEBUG"  # "1": tracebacks for user errors too (as --debug)


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help=f"Show the traceback of an error (or set {DEBUG_ENV}=1).")] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"

TrackingUri = Annotated[
    Optional[str],
    typer.Option("--tracking-uri", help="MLflow store. Default: sqlite:///<current directory>/mlflow.db."),
]

Dashboard = Annotated[bool, typer.Option("--dashboard", help="Start Ray's dashboard with the local Ray instance, on 127.0.0.1.")]
RayResults = Annotated[
    bool,
    typer.Option("--ray-results", help="Let Ray Tune write its own result files too (ResultGrid, TensorBoard). Default: MLflow only."),
]


def _uri(tracking_uri: str | None) -> str:
    from sweeps.spec_files import default_tracking_uri  # not sweeps.tracking: no MLflow import for an error

    return tracking_uri or default_tracking_uri(Path.cwd())


def _name(value: str | None, what: str = "sweep name") -> str | None:
    """A name that becomes a path, checked before anything is started or written (exit 2)."""
    from sweeps.spec_files import check_name

    try:
        return None if value is None else check_name(value, what)
    except ValueError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None


def _load(config: Path):
    from sweeps.spec import SpecError, load_spec

    try:
        return load_spec(config)
    except SpecError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None


def _print_results(
    uri: str, parent_run_id: str, experiment_id: str, title: str, output: Path | None = None, sort: dict[str, str] | None = None,
    group_by: list[str] | None = None, wide: bool = False, analysis=None,
) -> None:
    """The trials best first (by ``sort``, default the objectives), the Pareto front with run
    links, the seed replicates, paired effects and agreement of methods, how to open the UI; with
    ``output``, also ``summary.csv``, ``pareto.png`` and the files of
    :func:`sweeps.report.analysis_files` there. ``analysis``: the stored scores' analysis when the
    caller has it (the end of ``run`` does: the summary made it), else it is read here. On a
    terminal the table leaves out the metric columns that do not fit (and says so) unless
    ``wide``; written to a file or pipe it has them all. ``group_by``: a table of each column's
    groups after it."""
    from mlflow import MlflowClient
    from rich.console import Console

    from probing.registry import unknown_name
    from sweeps.report import (
        GROUP_COLUMNS, SweepAnalysis, analysis_files, fitting_metrics, front_rows, group_rows, metric_columns, pareto_figure,
        render_agreement, render_effects, render_groups, render_replicates, render_table, sort_rows, summary_csv, sweep_analysis,
        trial_rows,
    )  # fmt: skip
    from sweeps.tracking import run_url, runs_table_url, sweep_objectives, ui_command

    objectives = sweep_objectives(MlflowClient(uri).get_run(parent_run_id))
    order = sort or objectives
    rows = trial_rows(uri, parent_run_id, list(dict.fromkeys([*objectives, *order])))
    known = sorted({"val/accuracy", *metric_columns(rows)})  # numbers
    for metric in order:
        if metric not in known:
            typer.echo(f"--sort: {unknown_name('column', metric, known)}", err=True)
            raise typer.Exit(2)
    params = {k for row in rows for k in row.get("_params") or {}}
    for column in group_by or []:
        if column not in (*GROUP_COLUMNS, *params):
            typer.echo(f"--group-by: {unknown_name('column', column, sorted([*GROUP_COLUMNS, *params]))}", err=True)
            raise typer.Exit(2)
    rows = sort_rows(rows, order)
    named = ", ".join(f"{m} ({d})" for m, d in order.items())
    terminal = Console()
    shown = metric_columns(rows)
    if terminal.is_terminal and not wide:  # cut-off metric names are useless: whole columns are left out
        shown = fitting_metrics(rows, terminal.width, keep=[*objectives, *order])
    table = render_table(rows, title=f"{title}, best first by {named}", metrics=shown)
    needed = Console(width=100_000).measure(table).maximum
    console = Console(width=max(terminal.width, needed))
    console.print(table)
    if len(shown) < len(metric_columns(rows)):
        console.print(f"{len(metric_columns(rows)) - len(shown)} metric columns do not fit this terminal: --wide shows them (summary.csv has all)", highlight=False)
    for column in group_by or []:
        console.print(render_groups(group_rows(rows, column), column))
    front = front_rows(rows, objectives)
    console.print(f"The answer on the sweep's MLflow run (results table, best values, figures): {run_url(uri, experiment_id, parent_run_id)}", highlight=False, soft_wrap=True)
    console.print(f"Pareto front of {named}: {len(front)} trial(s)", highlight=False)
    for row in front:
        values = ", ".join(f"{m} {row[m]:.3f}" for m in objectives)
        console.print(f"  {row['trial']} {row['backbone']} {row['loss']} {row['head']}: {values}", highlight=False)
        console.print(f"    {run_url(uri, experiment_id, str(row['_run_id']))}", highlight=False, soft_wrap=True)
    if analysis is None:
        try:
            analysis = sweep_analysis(uri, parent_run_id)
        except Exception as err:  # the stored rows are artifacts: a store may hold the runs but not reach them
            console.print(f"no effects, replicates or agreement: the trials' stored scores could not be read ({err})", highlight=False, soft_wrap=True)
            analysis = SweepAnalysis()
    effects = analysis.effects
    if analysis.replicates:
        console.print(render_replicates(analysis.replicates))
    if effects:
        console.print(render_effects(effects))
        marked = sum(e.significant for e in effects)
        console.print(f"{marked} of {len(effects)} effects have a Holm-adjusted p below 0.05 (marked *)", highlight=False)
    for metric in dict.fromkeys(r.metric for r in analysis.agreement):
        console.print(render_agreement(analysis.agreement, metric))
    if output is not None:
        import matplotlib.pyplot as plt

        output.mkdir(parents=True, exist_ok=True)
        (output / "summary.csv").write_text(summary_csv(rows))
        figure = pareto_figure(rows, objectives, title)
        figure.savefig(output / "pareto.png")
        plt.close(figure)
        written = ["summary.csv", "pareto.png"]
        for name, content in analysis_files(analysis, title).items():
            if isinstance(content, str):
                (output / name).write_text(content)
            else:
                content.savefig(output / name)
                plt.close(content)
            written.append(name)
        console.print(f"Wrote {', '.join(written)} to {output}", highlight=False, soft_wrap=True)
    if uri.startswith(("http://", "https://")):  # the tracking server serves its own UI
        console.print(f"Open the runs in the tracking server's UI: {runs_table_url(uri, experiment_id)}", highlight=False, soft_wrap=True)
        return
    console.print("Open the MLflow UI on this store:", highlight=False)
    console.print(f"  {redact_uri(' '.join(ui_command(uri)))}", highlight=False, soft_wrap=True)
    console.print(f"  then open {runs_table_url(uri, experiment_id)}", highlight=False, soft_wrap=True)
    console.print("  (or run: probesweep ui)", highlight=False)


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="Sweep spec (YAML). Default: the shipped demo.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Sweep name. Default: <spec name>-<date>-<time>.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address. Default: a local instance.")] = None,
    tracking_uri: TrackingUri = None,
    storage: Annotated[
        Optional[str], typer.Option(help="Ray results folder (a cluster: one every node reaches). Default: the spec's, or ./ray_results.")
    ] = None,
    dashboard: Dashboard = False,
    ray_results: RayResults = False,
) -> None:
    """Validate a sweep spec, run all its trials with Ray Tune, and print the results table."""
    _name(name)
    from sweeps.spec import DEMO_SPEC  # loads torch (the method registry): after the name's check

    spec = _load(config or DEMO_SPEC)
    for warning in spec.warnings():
        typer.echo(f"warning: {warning}", err=True)
    from sweeps.runner import run_sweep

    _finish(lambda log: run_sweep(spec, name=name, address=address, tracking_uri=tracking_uri, storage=storage, dashboard=dashboard, ray_results=ray_results, log=log))


@app.command()
def resume(
    name: Annotated[str, typer.Argument(help="Sweep name (as printed by `probesweep run`).")],
    storage: Annotated[
        Optional[Path], typer.Option(help="Folder of the sweep's Ray results (the spec's `storage`). Default: ./ray_results.")
    ] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address. Default: a local instance.")] = None,
    tracking_uri: Annotated[
        Optional[str],
        typer.Option("--tracking-uri", help="The sweep's tracking URI, where it holds a password or token (never stored)."),
    ] = None,
    dashboard: Dashboard = False,
    ray_results: RayResults = False,
) -> None:
    """Continue an interrupted sweep: finished trials are kept, the others resume from their checkpoints."""
    _name(name)
    if tracking_uri:
        from sweeps.spec_files import SECRET_URI_ENV

        os.environ[SECRET_URI_ENV] = tracking_uri  # read in place of the stored, redacted one
    from sweeps.runner import resume_sweep

    _finish(lambda log: resume_sweep(name, storage=storage, address=address, dashboard=dashboard, ray_results=ray_results, log=log))


def _finish(start) -> None:
    """Run a sweep (new or resumed), print its table, exit 1 if trials failed, 2 on bad input."""
    try:
        outcome = start(lambda line: typer.echo(line, err=True))
    except (FileExistsError, FileNotFoundError, PermissionError) as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    _print_results(outcome.tracking_uri, outcome.parent_run_id, outcome.experiment_id, f"sweep {outcome.name}", analysis=outcome.analysis)
    if outcome.interrupted:
        raise typer.Exit(130)  # the shell's code for Ctrl-C
    if outcome.n_failed:
        typer.echo(f"{outcome.n_failed} of {outcome.n_trials} trials failed (their MLflow runs hold the error)", err=True)
        raise typer.Exit(1)


@app.command()
def validate(
    config: Annotated[Optional[Path], typer.Argument(help="Sweep spec (YAML). Default: the shipped demo.")] = None,
) -> None:
    """Check a sweep spec and say how many trials it expands to; every problem is listed."""
    from sweeps.spec import DEMO_SPEC

    config = config or DEMO_SPEC
    spec = _load(config)
    for warning in spec.warnings():
        typer.echo(f"warning: {warning}", err=True)
    per_point = f", {spec.search.num_samples} draws per grid point" if spec.search.algorithm == "random" else ""
    typer.echo(f"{config}: ok, {spec.n_trials()} trials ({spec.search.algorithm} search{per_point})")


@app.command()
def report(
    name: Annotated[str, typer.Argument(help="Sweep name (as printed by `probesweep run`).")],
    tracking_uri: TrackingUri = None,
    output: Annotated[
        Optional[Path], typer.Option(help="Folder for summary.csv, pareto.png, effects.csv and effects.png. Default: ./reports/<name>.")
    ] = None,
    sort: Annotated[
        Optional[list[str]],
        typer.Option(help="Sort the table by this column, best first (METRIC or METRIC:min; repeat for ties). Default: the objectives."),
    ] = None,
    group_by: Annotated[
        Optional[list[str]],
        typer.Option("--group-by", help="Also show the mean scores per group of this column (loss, head, backbone, or a param such as train.lr); repeatable."),
    ] = None,
    wide: Annotated[bool, typer.Option("--wide", help="Show every metric column, however wide the terminal.")] = False,
) -> None:
    """Print a sweep's trials sorted by its objectives, its Pareto front with MLflow run links,
    and write the table and the front's plot."""
    _name(name)
    uri = _store(tracking_uri, f"no sweep named {name!r}")
    from sweeps.tracking import find_sweep_run, similar_sweeps  # MLflow: after the checks that need none

    parent = find_sweep_run(uri, name)
    if parent is None:
        close = similar_sweeps(uri, name)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else " (probesweep ls lists them)"
        typer.echo(f"no sweep named {name!r} in {redact_uri(uri)}{hint}", err=True)
        raise typer.Exit(2)
    order = {}
    for item in sort or []:
        metric, _, mode = item.rpartition(":") if item.endswith((":min", ":max")) else (item, "", "max")
        order[metric] = mode
    output = output or Path.cwd() / "reports" / name
    _print_results(uri, parent.info.run_id, parent.info.experiment_id, f"sweep {name} ({parent.info.status})", output, order, group_by, wide)


@app.command()
def results(
    name: Annotated[str, typer.Argument(help="Sweep name (as printed by `probesweep run`).")],
    tracking_uri: TrackingUri = None,
    output: Annotated[Optional[Path], typer.Option(help="CSV file to write. Default: standard output.")] = None,
) -> None:
    """Write a sweep's trials as CSV, one row each, with every param, metric and tag (the columns of
    mlflow.search_runs; in Python: sweeps.results.results(name) gives the DataFrame)."""
    _name(name)
    uri = _store(tracking_uri, f"no sweep named {name!r}")
    from sweeps.results import results as sweep_results

    try:
        frame = sweep_results(name, uri)
    except ValueError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    if output is None:
        typer.echo(frame.to_csv(index=False), nl=False)
    else:
        frame.to_csv(output, index=False)
        typer.echo(f"wrote {len(frame)} trials to {output}", err=True)


def _store(tracking_uri: str | None, nothing: str) -> str:
    """The tracking URI of an existing store: ``--tracking-uri`` (answering), or ./mlflow.db if it
    exists (opening a missing one would create an empty store); else exit 2 saying ``nothing``."""
    from sweeps.preflight import check_tracking_store

    uri = _uri(tracking_uri)
    check_tracking_store(uri)  # MLflow's client would retry a silent server for minutes
    store = Path.cwd() / "mlflow.db"
    if tracking_uri is None and not store.is_file():
        typer.echo(f"{nothing}: there is no MLflow store here ({store}); give --tracking-uri", err=True)
        raise typer.Exit(2)
    return uri


@app.command("ls")
def list_sweeps_command(tracking_uri: TrackingUri = None) -> None:
    """List the sweeps in the tracking store, newest first: status, trials, start and end."""
    from rich.console import Console
    from rich.table import Table

    uri = _store(tracking_uri, "no sweeps")
    from sweeps.tracking import list_sweeps

    sweeps = list_sweeps(uri)
    table = Table(title=f"sweeps in {redact_uri(uri)}")
    for column in ("sweep", "experiment", "status", "trials", "started", "ended"):
        table.add_column(column)
    for sweep in sweeps:
        table.add_row(*(str(sweep[c]) for c in ("sweep", "experiment", "status", "trials", "started", "ended")))
    Console(width=max(Console().width, 120)).print(table)


@app.command()
def ui(
    tracking_uri: TrackingUri = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.", min=1, max=65535)] = 5000,
) -> None:
    """Start the MLflow UI on the sweep store, bound to 127.0.0.1, and say where the newest sweep's
    runs are."""
    from sweeps.tracking import CLASSIC_VIEW, UI_ENVIRONMENT, list_sweeps, ui_command

    uri = _uri(tracking_uri)
    command = ui_command(uri, port=port)
    shown = redact_uri(" ".join(command))
    typer.echo(f"MLflow UI at http://127.0.0.1:{port} (Ctrl-C stops it): {shown}", err=True)
    if tracking_uri or (Path.cwd() / "mlflow.db").is_file():  # (opening a missing store would create it)
        newest = next(iter(list_sweeps(uri)), None)
        if newest is not None:
            where = f"http://127.0.0.1:{port}/#/experiments/{newest['experiment_id']}/runs?{CLASSIC_VIEW}"
            typer.echo(f"the newest sweep, {newest['sweep']}: {where}", err=True)
    os.execve(command[0], command, UI_ENVIRONMENT | dict(os.environ))


@app.command("list")
def list_registered() -> None:
    """List what the registries hold, with their descriptions: data sets, backbones, heads, losses,
    attribution methods and localisation metrics."""
    from evaluation.attribution import METHODS
    from evaluation.metrics import METRICS
    from probing.backbones import BACKBONES
    from probing.datasets import DATASETS
    from probing.heads import HEADS
    from probing.losses import LOSSES

    for registry in (DATASETS, BACKBONES, HEADS, LOSSES, METHODS, METRICS):
        plural = registry.family + ("es" if registry.family.endswith("s") else "s")
        typer.echo(f"{plural}:")
        width = max(map(len, registry.names()))
        for name in registry.names():
            typer.echo(f"  {name:<{width}}  {registry.description(name)}")


def run_cli(argv: list[str] | None = None) -> int | str:
    """Run one command; its exit code. A user error (bad input, a missing or unreadable file, an
    unreachable server: ``ValueError`` and ``OSError``) is one line on stderr and exit code 2, with
    the traceback only under ``--debug``; anything else is a bug and shows its traceback."""
    import sys
    import traceback

    from sweeps.spec_files import SpecError

    try:
        app(args=argv)
    except SystemExit as done:  # typer ends every command this way
        return 0 if done.code is None else done.code
    except (ValueError, OSError) as err:
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc()
        if isinstance(err, SpecError):  # one line per problem, with its YAML path
            print(err, file=sys.stderr)
        else:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            print(f"probesweep: {'; '.join(lines)}", file=sys.stderr)
        return 2
    return 0


def main() -> None:
    import faulthandler

    # a crash in native code (Ray's core worker, torch) shows the Python stack it happened under
    faulthandler.enable()
    _leave(run_cli())


def _leave(code: int | str) -> None:
    """Exit without the interpreter's teardown of torch, Ray and MLflow's modules: about 2 s after a
    sweep (bench/sweep_overhead.py), with nothing left to save by then. The exit handlers
    (logging, Ray, MLflow) still run, and the output is flushed."""
    import atexit
    import sys
    import threading

    # what the interpreter does first at exit: its thread-exit hooks (which stop idle thread pools,
    # such as MLflow's artifact downloads) and a join of the non-daemon threads
    threading._shutdown()
    atexit._run_exitfuncs()
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
