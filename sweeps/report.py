"""Results read back from MLflow: one row per trial of a sweep, sorted by the sweep's objectives,
with each score's 95% interval; its Pareto front (the trials no other trial beats on every
objective) and their run links; the paired effects of the factors it varied and its seed
replicates (:mod:`sweeps.effects`); the agreement of its methods, layers and kernels
(:mod:`sweeps.agreement`)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Sequence

from mlflow import MlflowClient

from evaluation.metrics import METRICS
from sweeps.agreement import Agreement, agreement_csv, agreement_figure, agreement_matrix, method_agreement
from sweeps.effects import Effect, effects_csv, forest_figure, load_trial_scores, paired_effects, replicate_scores
from sweeps.run_params import head_of, run_params

__all__ = [
    "analysis_files", "cell", "fitting_metrics", "front_rows", "grids_label", "group_rows", "metric_columns", "render_groups", "is_localisation_score", "pareto_front", "pareto_figure", "render_agreement", "render_effects",
    "render_replicates", "render_table", "sort_rows", "summary_csv", "sweep_analysis", "SweepAnalysis", "sweep_runs", "trial_rows", "value_of",
]


def is_localisation_score(metric: str) -> bool:
    """``<metric>/<method>/<layer>`` for a registered localisation metric (gridpg, difull, dipart, epg)."""
    return metric.split("/", 1)[0] in METRICS and metric.count("/") == 2


FIXED = ("trial", "backbone", "loss", "head", "status", "val/accuracy", "grids")


def grids_label(logged: dict[str, float]) -> object:
    """The grids a trial scored; ``"N top-1"`` when no candidate reached the spec's confidence and
    its correctly classified grids were scored instead (``grids/threshold`` 0)."""
    if "grids/count" not in logged:
        return None
    count = int(logged["grids/count"])
    return f"{count} top-1" if logged.get("grids/threshold") == 0.0 and count else count


def sweep_runs(uri: str, parent_run_id: str) -> list:
    """The child runs of a sweep (its trials), in the order they started."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def trial_rows(uri: str, parent_run_id: str, metrics: Sequence[str] = ()) -> list[dict[str, object]]:
    """The child runs of a sweep as dicts: the fixed columns, every localisation score
    (``gridpg/...``, ``difull/...``, ``dipart/...``, ``epg/...``) and the other ``metrics`` asked for.
    ``_ci`` holds each score's 95% interval (``{score: (low, high)}``) where the trial logged one."""
    rows, shared = [], MlflowClient(uri).get_run(parent_run_id).data.params
    for run in sweep_runs(uri, parent_run_id):
        params, logged = run_params(run.data.params, shared), run.data.metrics
        row: dict[str, object] = {
            "_run_id": run.info.run_id,  # keys starting with "_" are not columns
            "_name": run.info.run_name,
            "_params": params,
            "trial": run.data.tags.get("trial_id", run.info.run_name),
            "backbone": params.get("backbone.name", "?"),
            "loss": params.get("probe.loss", "?"),
            "head": head_of(params),
            "status": run.info.status,
            "val/accuracy": logged.get("val/accuracy"),
            "grids": grids_label(logged),
        }
        row |= {k: v for k, v in sorted(logged.items()) if is_localisation_score(k) or k in metrics}
        row["_ci"] = {k: (logged[f"{k}/ci_low"], logged[f"{k}/ci_high"]) for k in row if f"{k}/ci_low" in logged and f"{k}/ci_high" in logged}
        if "stopped_early" in run.data.tags:
            row["status"] = f"{run.info.status} (stopped at epoch {run.data.tags['stopped_early']})"
        rows.append(row)
    return rows


def cell(value: object, interval: tuple[float, float] | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if interval is not None and not any(math.isnan(b) for b in interval):
            return f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"
        return f"{value:.3f}"
    return str(value)


def metric_columns(rows: Sequence[dict[str, object]]) -> list[str]:
    """The score and metric columns of the table, in its order."""
    return sorted({k for row in rows for k in row if k not in FIXED and not k.startswith("_")})


def render_table(rows: list[dict[str, object]], title: str = "", metrics: Sequence[str] | None = None):
    """A rich Table (with ``metrics``: only those of its metric columns); a score with an interval
    reads ``0.318 [0.27, 0.36]`` (its 95% bootstrap interval over the grids); a trial with no grid
    shows '-' in the GridPG columns and 0 in ``grids``."""
    from rich.table import Table

    shown_metrics = list(metrics) if metrics is not None else metric_columns(rows)
    table = Table(title=title)
    for column in (*FIXED, *shown_metrics):
        table.add_column(column, justify="left" if column in FIXED[:5] else "right")
    for row in rows:
        intervals = row.get("_ci") or {}
        table.add_row(*(cell(row.get(column), intervals.get(column)) for column in (*FIXED, *shown_metrics)))
    return table


def fitting_metrics(rows: list[dict[str, object]], width: int, keep: Sequence[str] = ()) -> list[str]:
    """The metric columns of a table ``width`` characters wide can show: those in ``keep`` (the
    sort columns) first, then the others in the table's order while they fit."""
    from rich.console import Console

    def needed(metrics):
        return Console(width=100_000).measure(render_table(rows, metrics=metrics)).maximum

    shown = [m for m in metric_columns(rows) if m in keep]
    for metric in metric_columns(rows):
        if metric not in shown and needed([*shown, metric]) <= width:
            shown.append(metric)
    return [m for m in metric_columns(rows) if m in shown]


def render_groups(groups: Sequence[dict[str, object]], column: str, title: str = ""):
    """A rich Table of :func:`group_rows`: the group, its trials, the mean of each score."""
    from rich.table import Table

    scores = [k for k in dict.fromkeys(k for g in groups for k in g) if k not in (column, "trials")]
    table = Table(title=title or f"finished trials grouped by {column}: mean of each score")
    for name in (column, "trials", *scores):
        table.add_column(name, justify="left" if name == column else "right")
    for group in groups:
        table.add_row(*(cell(group.get(name)) for name in (column, "trials", *scores)))
    return table


GROUP_COLUMNS = ("backbone", "loss", "head", "status")


def group_rows(rows: Sequence[dict[str, object]], column: str) -> list[dict[str, object]]:
    """The finished trials grouped by ``column`` (a table column, or a param such as
    ``train.lr``): per group its value, the number of trials and the mean of every score, groups
    in the order of their best trial (``rows`` best first)."""
    groups: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        if str(row["status"]).startswith("FINISHED"):
            key = row[column] if column in GROUP_COLUMNS else (row.get("_params") or {}).get(column, "-")
            groups.setdefault(str(key), []).append(row)
    scores = ["val/accuracy", *metric_columns(rows)]
    out = []
    for key, members in groups.items():
        means = {}
        for score in scores:
            values = [v for v in (value_of(r, score) for r in members) if v is not None]
            means[score] = sum(values) / len(values) if values else None
        out.append({column: key, "trials": len(members), **means})
    return out


def value_of(row: dict[str, object], metric: str) -> float | None:
    value = row.get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def sort_rows(rows: list[dict[str, object]], objectives: dict[str, str]) -> list[dict[str, object]]:
    """Best first: by the first objective in its direction, ties by the next; missing values last."""

    def key(row):
        values = [value_of(row, m) for m in objectives]
        return [(v is None, 0.0 if v is None else (-v if mode == "max" else v)) for v, mode in zip(values, objectives.values())]

    return sorted(rows, key=key)


def pareto_front(points: Sequence[Sequence[float | None]], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points, in input order.

    Point p dominates q when p is at least as good as q on every objective and better on one
    (``max``: larger is better, ``min``: smaller). Points with a missing or NaN value take no part.
    """
    signs = [1.0 if mode == "max" else -1.0 for mode in modes]
    scored = [
        (i, [s * float(v) for s, v in zip(signs, p)])
        for i, p in enumerate(points)
        if all(v is not None and not math.isnan(float(v)) for v in p)
    ]

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, p in scored if not any(dominates(q, p) for _, q in scored)]


def front_rows(rows: list[dict[str, object]], objectives: dict[str, str]) -> list[dict[str, object]]:
    """The finished trials on the Pareto front of ``objectives``, best first."""
    finished = [r for r in rows if str(r["status"]).startswith("FINISHED")]
    front = pareto_front([[value_of(r, m) for m in objectives] for r in finished], list(objectives.values()))
    return sort_rows([finished[i] for i in front], objectives)


def pareto_figure(rows: list[dict[str, object]], objectives: dict[str, str], title: str = ""):
    """Every finished trial on the first two objectives (one objective: against the trial's rank),
    coloured by loss, shaped by head and labelled with its run name; the Pareto front of all
    objectives joined by a red line; whiskers are the scores' 95% intervals. The legend names
    every colour and shape, so the figure reads without hovering."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    metrics = list(objectives)
    finished = sort_rows([r for r in rows if str(r["status"]).startswith("FINISHED")], objectives)
    front = {id(r) for r in front_rows(rows, objectives)}
    x_metric, y_metric = (metrics[0], metrics[1]) if len(metrics) > 1 else (None, metrics[0])
    points = [(value_of(r, x_metric) if x_metric else rank, value_of(r, y_metric), r) for rank, r in enumerate(finished)]
    points = [p for p in points if None not in p[:2]]
    losses = list(dict.fromkeys(str(r.get("loss", "?")) for _, _, r in points))
    heads = list(dict.fromkeys(str(r.get("head", "?")) for _, _, r in points))
    colours = {loss: plt.get_cmap("tab10")(i % 10) for i, loss in enumerate(losses)}
    shapes = {head: "os^Dv<>pP*X"[i % 11] for i, head in enumerate(heads)}

    figure, axes = plt.subplots(figsize=(7, 5), dpi=100, layout="constrained")
    on_front = sorted((x, y) for x, y, r in points if id(r) in front)
    if on_front:
        axes.plot(*zip(*on_front), "-", color="tab:red", linewidth=1.2, zorder=1)
    for x, y, row in points:
        colour = colours[str(row.get("loss", "?"))]
        intervals = row.get("_ci") or {}
        if x_metric in intervals:
            axes.plot(intervals[x_metric], [y, y], "-", color=colour, alpha=0.5, linewidth=1)
        if y_metric in intervals:
            axes.plot([x, x], intervals[y_metric], "-", color=colour, alpha=0.5, linewidth=1)
        edge = "tab:red" if id(row) in front else "none"
        axes.scatter([x], [y], color=colour, marker=shapes[str(row.get("head", "?"))], s=55, edgecolors=edge, linewidths=1.5, zorder=3)
        axes.annotate(str(row.get("_name") or row["trial"]), (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7)
    legend = [Line2D([], [], color=c, marker="o", linestyle="", label=f"loss {loss}") for loss, c in colours.items()]
    legend += [Line2D([], [], color="0.3", marker=m, linestyle="", label=f"head {head}") for head, m in shapes.items()]
    legend += [Line2D([], [], color="tab:red", marker="o", markerfacecolor="none", label="Pareto front")] if on_front else []
    if legend:
        axes.legend(handles=legend, loc="best", fontsize=8)
    axes.set_xlabel(f"{x_metric} ({objectives[x_metric]})" if x_metric else "trial, best first")
    axes.set_ylabel(f"{y_metric} ({objectives[y_metric]})")
    axes.set_title(title or "Pareto front")
    return figure


@dataclass(frozen=True)
class SweepAnalysis:
    """What the stored per-row scores of a sweep's trials say: the paired effects, the seed
    replicates (:mod:`sweeps.effects`) and the agreement of methods, layers and kernels
    (:mod:`sweeps.agreement`)."""

    effects: list[Effect] = field(default_factory=list)
    replicates: list[dict[str, object]] = field(default_factory=list)
    agreement: list[Agreement] = field(default_factory=list)


def sweep_analysis(uri: str, parent_run_id: str) -> SweepAnalysis:
    """The sweep's :class:`SweepAnalysis`, from the per-row scores its trials stored (read once)."""
    runs = sweep_runs(uri, parent_run_id)  # in the order they started: a factor's first level is its baseline
    trials = load_trial_scores(uri, runs, MlflowClient(uri).get_run(parent_run_id).data.params)
    return SweepAnalysis(paired_effects(trials), replicate_scores(trials), method_agreement(trials))


def analysis_files(analysis: SweepAnalysis, title: str = "") -> dict[str, object]:
    """The analysis as files by name: ``effects.csv`` (text) and ``effects.png`` (a forest plot),
    ``agreement.csv`` and ``agreement-<metric>.png`` (a heat map per metric); those with nothing to
    show are left out. Figures are matplotlib figures, for the caller to save and close."""
    named = f"{title}: " if title else ""
    files: dict[str, object] = {}
    if analysis.effects:
        files["effects.csv"] = effects_csv(analysis.effects)
        files["effects.png"] = forest_figure(analysis.effects, f"{named}paired effects")
    if analysis.agreement:
        files["agreement.csv"] = agreement_csv(analysis.agreement)
        for metric in dict.fromkeys(r.metric for r in analysis.agreement):
            files[f"agreement-{metric}.png"] = agreement_figure(analysis.agreement, metric, f"{named}{metric}: agreement of methods and layers")
    return files


def render_effects(effects: Sequence[Effect], title: str = ""):
    """A rich Table of the paired effects: ``* `` marks a Holm-adjusted p below 0.05."""
    from rich.table import Table

    table = Table(title=title or "paired effects: mean difference per grid, 95% interval; * Holm p < 0.05")
    for column in ("effect", "backbone", "score", "difference", "95% interval", "units", "p (Holm)"):
        table.add_column(column, justify="left" if column in ("effect", "backbone", "score") else "right")
    for e in effects:
        mark = "*" if e.significant else " "
        table.add_row(e.label, e.backbone, e.score, f"{e.mean:+.3f} {mark}", f"[{e.low:+.3f}, {e.high:+.3f}]", str(e.units), "-" if math.isnan(e.p_holm) else f"{e.p_holm:.3g}")
    return table


def render_agreement(rows: Sequence[Agreement], metric: str):
    """A rich Table of one metric's agreements: Spearman's rho of each two columns (mean over probes)."""
    from rich.table import Table

    labels, matrix = agreement_matrix(rows, metric)
    table = Table(title=f"{metric}: agreement (Spearman's rho over the units both rank, mean over probes)")
    table.add_column("")
    for label in labels:
        table.add_column(label, justify="right")
    for i, a in enumerate(labels):
        table.add_row(a, *("1" if i == j else "-" if math.isnan(v) else f"{v:+.2f}" for j, v in enumerate(matrix[i])))
    return table


def render_replicates(rows: Sequence[dict[str, object]], title: str = ""):
    """A rich Table of the configurations run with several seeds: per score the replicates' mean
    and its hierarchical 95% interval (seeds, then grids)."""
    from rich.table import Table

    scores = sorted({k for row in rows for k in row if is_localisation_score(k)})
    shown = [c for c in ("backbone", "loss", "head") if any(c in row for row in rows)]
    varied = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in (*shown, *scores, "seed", "seeds")
              and len({str(row.get(k)) for row in rows}) > 1]  # fmt: skip
    table = Table(title=title or "seed replicates: mean [95% interval, seeds then grids]")
    for column in (*shown, *varied, "seed", *scores):
        table.add_column(column, justify="right" if column in scores else "left")
    for row in rows:
        cells = [cell(*_mean_and_interval(row[s])) if s in row else "-" for s in scores]
        table.add_row(*(str(row.get(c, "")) for c in (*shown, *varied, "seed")), *cells)
    return table


def _mean_and_interval(value: tuple[float, float, float]) -> tuple[float, tuple[float, float]]:
    return value[0], (value[1], value[2])


def summary_csv(rows: list[dict[str, object]]) -> str:
    """The table as CSV text (every column, in the table's order, each score's ``/ci_low`` and
    ``/ci_high`` after it, and the MLflow run id)."""
    metrics = metric_columns(rows)
    with_ci = {m for row in rows for m in row.get("_ci") or {}}
    # an objective may itself be a bound (gridpg/ixg/input/ci_low): each column once
    columns = list(dict.fromkeys([*FIXED, *(c for m in metrics for c in ((m, f"{m}/ci_low", f"{m}/ci_high") if m in with_ci else (m,))), "_run_id"]))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([c.lstrip("_") for c in columns])
    for row in rows:
        bounds = {f"{m}/ci_{side}": b for m, pair in (row.get("_ci") or {}).items() for side, b in zip(("low", "high"), pair)}
        values = {**row, **bounds}
        writer.writerow(["" if values.get(c) is None else values.get(c) for c in columns])
    return out.getvalue()
