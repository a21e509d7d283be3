"""Results tables read back from MLflow: one row per trial of a sweep."""

from __future__ import annotations

import math

from mlflow import MlflowClient

from evaluation.grid_models import GRID_SETTINGS
from sweeps.spec import head_label

__all__ = ["is_localisation_score", "trial_rows", "render_table"]


def is_localisation_score(metric: str) -> bool:
    """``<setting>/<method>/<layer>`` for a grid setting (gridpg, difull, dipart) or EPG."""
    return metric.split("/", 1)[0] in (*GRID_SETTINGS, "epg") and metric.count("/") == 2


FIXED = ("trial", "backbone", "loss", "head", "status", "val/accuracy", "grids")


def _head_label(params: dict[str, str]) -> str:
    return head_label({k.removeprefix("head."): v for k, v in params.items() if k.startswith("head.")})


def trial_rows(uri: str, parent_run_id: str) -> list[dict[str, object]]:
    """The child runs of a sweep as dicts: the fixed columns, then every localisation score
    (``gridpg/...``, ``difull/...``, ``dipart/...``)."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.run_name ASC"],
    )
    rows = []
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        row: dict[str, object] = {
            "trial": run.data.tags.get("trial_id", run.info.run_name),
            "backbone": params.get("backbone.name", "?"),
            "loss": params.get("loss", "?"),
            "head": _head_label(params),
            "status": run.info.status,
            "val/accuracy": metrics.get("val/accuracy"),
            "grids": None if "grids/count" not in metrics else int(metrics["grids/count"]),
        }
        row |= {k: v for k, v in sorted(metrics.items()) if is_localisation_score(k)}
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

    metric_columns = sorted({k for row in rows for k in row if k not in FIXED})
    table = Table(title=title)
    for column in (*FIXED, *metric_columns):
        table.add_column(column, justify="left" if column in FIXED[:5] else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in (*FIXED, *metric_columns)))
    return table
