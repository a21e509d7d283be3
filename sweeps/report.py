"""Results read back from MLflow: one row per trial of a sweep, sorted by the sweep's objectives,
its Pareto front (the trials no other trial beats on every objective) and their run links."""

from __future__ import annotations

import csv
import io
import math
from typing import Sequence

from mlflow import MlflowClient

from evaluation.metrics import METRICS
from sweeps.settings import head_label

__all__ = [
    "front_rows", "is_localisation_score", "log_sweep_summary", "pareto_front", "pareto_figure", "render_table", "sort_rows", "summary_csv", "trial_rows",
]


def is_localisation_score(metric: str) -> bool:
    """``<metric>/<method>/<layer>`` for a registered localisation metric (gridpg, difull, dipart, epg)."""
    return metric.split("/", 1)[0] in METRICS and metric.count("/") == 2


FIXED = ("trial", "backbone", "loss", "head", "status", "val/accuracy", "grids")


def _head_label(params: dict[str, str]) -> str:
    return head_label({k.removeprefix("head."): v for k, v in params.items() if k.startswith("head.")})


def trial_rows(uri: str, parent_run_id: str, metrics: Sequence[str] = ()) -> list[dict[str, object]]:
    """The child runs of a sweep as dicts: the fixed columns, every localisation score
    (``gridpg/...``, ``difull/...``, ``dipart/...``, ``epg/...``) and the other ``metrics`` asked for."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.run_name ASC"],
    )
    rows = []
    for run in runs:
        params, logged = run.data.params, run.data.metrics
        row: dict[str, object] = {
            "_run_id": run.info.run_id,  # keys starting with "_" are not columns
            "trial": run.data.tags.get("trial_id", run.info.run_name),
            "backbone": params.get("backbone.name", "?"),
            "loss": params.get("loss", "?"),
            "head": _head_label(params),
            "status": run.info.status,
            "val/accuracy": logged.get("val/accuracy"),
            "grids": None if "grids/count" not in logged else int(logged["grids/count"]),
        }
        row |= {k: v for k, v in sorted(logged.items()) if is_localisation_score(k) or k in metrics}
        if "stopped_early" in run.data.tags:
            row["status"] = f"{run.info.status} (stopped at epoch {run.data.tags['stopped_early']})"
        rows.append(row)
    return rows


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def render_table(rows: list[dict[str, object]], title: str = ""):
    """A rich Table; a trial with no grid shows '-' in the GridPG columns and 0 in ``grids``."""
    from rich.table import Table

    metric_columns = sorted({k for row in rows for k in row if k not in FIXED and not k.startswith("_")})
    table = Table(title=title)
    for column in (*FIXED, *metric_columns):
        table.add_column(column, justify="left" if column in FIXED[:5] else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in (*FIXED, *metric_columns)))
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
    the Pareto front of all objectives marked and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(objectives)
    finished = [r for r in rows if str(r["status"]).startswith("FINISHED")]
    front = {id(r) for r in front_rows(rows, objectives)}
    x_metric, y_metric = (metrics[0], metrics[1]) if len(metrics) > 1 else (None, metrics[0])

    def xy(group):
        points = [(_value(r, x_metric) if x_metric else rank, _value(r, y_metric)) for rank, r in enumerate(group)]
        return [p for p in points if None not in p]

    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=100)
    others = xy([r for r in sort_rows(finished, objectives) if id(r) not in front])
    on_front = sorted(xy([r for r in sort_rows(finished, objectives) if id(r) in front]))
    if others:
        axes.scatter(*zip(*others), color="0.6", label="trials")
    if on_front:
        axes.plot(*zip(*on_front), "o-", color="tab:red", label="Pareto front")
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
    return front


def summary_csv(rows: list[dict[str, object]]) -> str:
    """The table as CSV text (every column, in the table's order, plus the MLflow run id)."""
    columns = [*FIXED, *sorted({k for row in rows for k in row if k not in FIXED and not k.startswith("_")}), "_run_id"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([c.lstrip("_") for c in columns])
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return out.getvalue()
