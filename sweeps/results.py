"""A sweep's trials as a pandas DataFrame, for notebooks and scripts::

    from sweeps.results import results
    frame = results("demo-20261201-1200")           # ./mlflow.db
    frame.groupby("params.probe.loss")["metrics.gridpg/ixg/input"].mean()

The columns are those of ``mlflow.search_runs``: ``run_id``, ``run_name``, ``status``,
``start_time``, ``end_time``, ``params.*``, ``metrics.*``, ``tags.*``. Each trial's row holds the
params its sweep's trials have alike too (a trial run logs only its own; the sweep's parent run
holds the others), so every row is the whole trial. MLflow's client is given the store
explicitly: no global tracking URI is set.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["results"]


def results(name: str, tracking_uri: str | None = None):
    """The trials of sweep ``name``, one row each, in the order they started.

    Args:
        tracking_uri: the MLflow store; default ``sqlite:///<current directory>/mlflow.db``.

    Raises:
        ValueError: there is no sweep ``name`` in the store (with the names it may have meant).
    """
    import pandas as pd
    from mlflow import MlflowClient

    from sweeps.report import sweep_runs
    from sweeps.run_params import run_params
    from sweeps.tracking import default_tracking_uri, find_sweep_run, similar_sweeps

    if tracking_uri is None and not (Path.cwd() / "mlflow.db").is_file():  # opening it would create an empty store
        raise ValueError(f"no MLflow store here ({Path.cwd() / 'mlflow.db'}): give tracking_uri")
    uri = tracking_uri or default_tracking_uri(Path.cwd())
    parent = find_sweep_run(uri, name)
    if parent is None:
        close = similar_sweeps(uri, name)
        raise ValueError(f"no sweep named {name!r}" + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""))
    shared = MlflowClient(uri).get_run(parent.info.run_id).data.params
    frame = pd.DataFrame(
        [
            {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
             "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
             "end_time": pd.to_datetime(run.info.end_time, unit="ms", utc=True) if run.info.end_time else pd.NaT}
            | {f"params.{k}": v for k, v in sorted(run_params(run.data.params, shared).items())}
            | {f"metrics.{k}": v for k, v in sorted(run.data.metrics.items())}
            | {f"tags.{k}": v for k, v in sorted(run.data.tags.items())}
            for run in sweep_runs(uri, parent.info.run_id)
        ]  # fmt: skip
    )
    return frame
