"""Results read back from MLflow: one row per trial of a sweep, sorted by the sweep's objectives,
with each score's 95% interval; its Pareto front (the trials no other trial beats on every
objective) and their run links; the paired effects of the factors it varied and its seed
replicates (:mod:`sweeps.effects`)."""

from __future__ import annotations

import csv
import io
import math
from typing import Sequence

from mlflow import MlflowClient

from evaluation.metrics import METRICS
from sweeps.effects import Effect, effects_csv, forest_figure, head_of, load_trial_scores, paired_effects, replicate_scores

__all__ = [
    "front_rows", "grids_label", "is_localisation_score", "log_sweep_summary", "pareto_front", "pareto_figure", "render_effects",
    "render_replicates", "render_table", "sort_rows", "summary_csv", "sweep_effects", "sweep_runs", "trial_rows",
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
    """The child runs of a sweep (its trials), in trial order."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.run_name ASC"],
    )


def trial_rows(uri: str, parent_run_id: str, metrics: Sequence[str] = ()) -> list[dict[str, object]]:
    """The child runs of a sweep as dicts: the fixed columns, every localisation score
    (``gridpg/...``, ``difull/...``, ``dipart/...``, ``epg/...``) and the other ``metrics`` asked for.
    ``_ci`` holds each score's 95% interval (``{score: (low, high)}``) where the trial logged one."""
    rows = []
    for run in sweep_runs(uri, parent_run_id):
        params, logged = run.data.params, run.data.metrics
        row: dict[str, object] = {
            "_run_id": run.info.run_id,  # keys starting with "_" are not columns
            "trial": run.data.tags.get("trial_id", run.info.run_name),
            "backbone": params.get("backbone.name", "?"),
            "loss": params.get("loss", "?"),
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


def _cell(value: object, interval: tuple[float, float] | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if interval is not None and not any(math.isnan(b) for b in interval):
            return f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"
        return f"{value:.3f}"
    return str(value)


def render_table(rows: list[dict[str, object]], title: str = ""):
    """A rich Table; a score with an interval reads ``0.318 [0.27, 0.36]`` (its 95% bootstrap
    interval over the grids); a trial with no grid shows '-' in the GridPG columns and 0 in ``grids``."""
    from rich.table import Table

    metric_columns = sorted({k for row in rows for k in row if k not in FIXED and not k.startswith("_")})
    table = Table(title=title)
    for column in (*FIXED, *metric_columns):
        table.add_column(column, justify="left" if column in FIXED[:5] else "right")
    for row in rows:
        intervals = row.get("_ci") or {}
        table.add_row(*(_cell(row.get(column), intervals.get(column)) for column in (*FIXED, *metric_columns)))
    return table


def _value(row: dict[str, object], metric: str) -> float | None:
    value = row.get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def sort_rows(rows: list[dict[str, object]], objectives: dict[str, str]) -> list[dict[str, object]]:
    """Best first: by the first objective in its direction, ties by the next; missing values last."""

    def key(row):
        values = [_value(row, m) for m in objectives]
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
    front = pareto_front([[_value(r, m) for m in objectives] for r in finished], list(objectives.values()))
    return sort_rows([finished[i] for i in front], objectives)


def pareto_figure(rows: list[dict[str, object]], objectives: dict[str, str], title: str = ""):
    """Every finished trial on the first two objectives (one objective: against the trial's rank),
    the Pareto front of all objectives marked and joined; whiskers are the scores' 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(objectives)
    finished = [r for r in rows if str(r["status"]).startswith("FINISHED")]
    front = {id(r) for r in front_rows(rows, objectives)}
    x_metric, y_metric = (metrics[0], metrics[1]) if len(metrics) > 1 else (None, metrics[0])

    def xy(group):
        points = [(_value(r, x_metric) if x_metric else rank, _value(r, y_metric), r) for rank, r in enumerate(group)]
        return [p for p in points if None not in p[:2]]

    def whiskers(points, color):  # each score's 95% interval, where the trial logged one
        for x, y, row in points:
            intervals = row.get("_ci") or {}
            if x_metric in intervals:
                axes.plot(intervals[x_metric], [y, y], "-", color=color, alpha=0.5, linewidth=1)
            if y_metric in intervals:
                axes.plot([x, x], intervals[y_metric], "-", color=color, alpha=0.5, linewidth=1)

    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=100)
    others = xy([r for r in sort_rows(finished, objectives) if id(r) not in front])
    on_front = sorted(xy([r for r in sort_rows(finished, objectives) if id(r) in front]), key=lambda p: p[:2])
    if others:
        axes.scatter([p[0] for p in others], [p[1] for p in others], color="0.6", label="trials")
        whiskers(others, "0.6")
    if on_front:
        axes.plot([p[0] for p in on_front], [p[1] for p in on_front], "o-", color="tab:red", label="Pareto front")
        whiskers(on_front, "tab:red")
    axes.set_xlabel(f"{x_metric} ({objectives[x_metric]})" if x_metric else "trial, best first")
    axes.set_ylabel(f"{y_metric} ({objectives[y_metric]})")
    axes.set_title(title or "Pareto front")
    axes.legend(loc="best")
    figure.tight_layout()
    return figure


def log_sweep_summary(uri: str, parent_run_id: str, objectives: dict[str, str]) -> list[dict[str, object]]:
    """Log the sweep's results to its parent run: ``summary.csv`` (every trial, best first),
    ``pareto.json`` (the front, with run ids and links) and ``pareto.png``. Returns the front."""
    import json

    from sweeps.tracking import run_url

    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    rows = sort_rows(trial_rows(uri, parent_run_id, list(objectives)), objectives)
    front = front_rows(rows, objectives)
    client.log_text(parent_run_id, summary_csv(rows), "summary.csv")
    listed = [
        {"trial": r["trial"], "run_id": r["_run_id"], "url": run_url(uri, experiment_id, str(r["_run_id"])),
         **{m: _value(r, m) for m in objectives}}
        for r in front
    ]  # fmt: skip
    client.log_text(parent_run_id, json.dumps({"objectives": objectives, "front": listed}, indent=2), "pareto.json")
    if rows:
        import matplotlib.pyplot as plt

        figure = pareto_figure(rows, objectives, "Pareto front")
        client.log_figure(parent_run_id, figure, "pareto.png")
        plt.close(figure)
    effects = sweep_effects(uri, parent_run_id)[0]
    if effects:
        import matplotlib.pyplot as plt

        client.log_text(parent_run_id, effects_csv(effects), "effects.csv")
        figure = forest_figure(effects, "paired effects")
        client.log_figure(parent_run_id, figure, "effects.png")
        plt.close(figure)
    return front


def sweep_effects(uri: str, parent_run_id: str) -> tuple[list[Effect], list[dict[str, object]]]:
    """The sweep's paired effects and its seed-replicate rows (:mod:`sweeps.effects`), from the
    per-row scores its trials stored."""
    runs = sorted(sweep_runs(uri, parent_run_id), key=lambda run: run.info.start_time)  # a factor's first level is its baseline
    trials = load_trial_scores(uri, runs)
    return paired_effects(trials), replicate_scores(trials)


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
        cells = [_cell(*_mean_and_interval(row[s])) if s in row else "-" for s in scores]
        table.add_row(*(str(row.get(c, "")) for c in (*shown, *varied, "seed")), *cells)
    return table


def _mean_and_interval(value: tuple[float, float, float]) -> tuple[float, tuple[float, float]]:
    return value[0], (value[1], value[2])


def summary_csv(rows: list[dict[str, object]]) -> str:
    """The table as CSV text (every column, in the table's order, each score's ``/ci_low`` and
    ``/ci_high`` after it, and the MLflow run id)."""
    metrics = sorted({k for row in rows for k in row if k not in FIXED and not k.startswith("_")})
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
