"""MLflow tracking: one parent run per sweep, one child run per trial (tag ``trial_id``).

Only the MLflow client API is used (no fluent global state), so the driver and every Ray worker
talk to the store the same way. The driver creates the store, experiment and parent run before
any trial starts (many trials creating a fresh SQLite schema at once would race).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from sweeps.run_params import trial_run_name
from sweeps.spec_files import default_tracking_uri  # noqa: F401 (part of this module's API)

__all__ = [
    "SWEEP_TAG",
    "TrialRun",
    "close_trial_runs",
    "sweep_objectives",
    "default_tracking_uri",
    "ensure_experiment",
    "find_sweep_run",
    "start_sweep_run",
    "ui_command",
    "runs_table_url",
    "run_url",
    "ui_base",
    "quiet_downloads",
]

SWEEP_TAG = "probesweep.sweep"
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH = 1000, 100  # MLflow's limits for one log_batch
OBJECTIVES_PARAM = "objectives"  # of the parent run, as JSON
UI_HOST, UI_PORT = "127.0.0.1", 5000


def quiet_downloads():
    """A context in which MLflow downloads artifacts without a progress bar per file (on the
    report's console); the environment is put back as it was on the way out."""
    from unittest import mock

    return mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})


def _local_store_dir(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing.

    For a local SQLite store the artifacts go to an absolute ``mlartifacts/`` folder beside the
    database (MLflow's default is relative to the current directory, which Ray trials change).
    The experiment is tagged so that the MLflow 3 UI opens it on the runs table.
    """
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    store = _local_store_dir(uri)
    location = (store / "mlartifacts" / name).resolve().as_uri() if store else None
    return client.create_experiment(
        name, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"}
    )


def start_sweep_run(
    uri: str, experiment_id: str, sweep: str, spec_yaml: str, n_trials: int, objectives: dict[str, str] | None = None,
    shared: dict[str, str] | None = None,
) -> str:
    """Create the sweep's parent run, with the spec as an artifact, the objectives as a param
    (``probesweep report`` reads them back) and the ``shared`` params (those every trial has
    alike: its trial runs log only the others); returns its run id."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=sweep, tags={SWEEP_TAG: sweep})
    params = (shared or {}) | {"n_trials": str(n_trials), OBJECTIVES_PARAM: json.dumps(objectives or {"val/accuracy": "max"})}
    try:
        _log_params(client, run.info.run_id, params)
        client.log_text(run.info.run_id, spec_yaml, "spec.yaml")
    except Exception:
        client.set_terminated(run.info.run_id, "FAILED")  # never a parent left RUNNING by a failed start
        raise
    return run.info.run_id


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])


def sweep_objectives(run) -> dict[str, str]:
    """The objectives of a sweep's parent run (``val/accuracy: max`` for sweeps that named none)."""
    return json.loads(run.data.params.get(OBJECTIVES_PARAM, '{"val/accuracy": "max"}'))


def close_trial_runs(
    uri: str, experiment_id: str, parent_run_id: str, ended: dict[str, tuple[str, int]], epochs: int
) -> dict[str, str]:
    """Give every trial run of this sweep its final status once the driver stops Ray; returns the
    status of each trial's run by trial id.

    ``ended`` maps trial ids to (Ray status, last epoch). Ray stops a trial (early stopping or
    Ctrl-C) by ending its thread, which leaves the run KILLED, or RUNNING if the process went
    first. A TERMINATED trial is FINISHED, tagged ``stopped_early`` with its epoch if the scheduler
    stopped it short of ``epochs``; an ERROR trial is FAILED; any other (the sweep was
    interrupted) is KILLED, and ``probesweep resume`` continues it.
    """
    client = MlflowClient(uri)
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    statuses = {}
    for run in children:
        trial_id = run.data.tags.get("trial_id", run.info.run_id)
        status, epoch = ended.get(trial_id, ("", 0))
        if not status and "stopped_early" in run.data.tags:
            # the driver closed it as stopped early, then the trial's own thread, which Ray stopped a
            # moment later, wrote KILLED over it: it is finished all the same
            status = "TERMINATED"
        if status == "TERMINATED" and epoch < epochs and "stopped_early" not in run.data.tags:
            client.set_tag(run.info.run_id, "stopped_early", str(epoch))
        final = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}.get(status, "KILLED")
        statuses[trial_id] = run.info.status
        if run.info.status in ("RUNNING", "KILLED") and run.info.status != final:
            client.set_terminated(run.info.run_id, final)
            statuses[trial_id] = final
    return statuses


def find_sweep_run(uri: str, sweep: str):
    """The newest parent run of sweep ``sweep`` in any experiment, or None."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'", order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


def list_sweeps(uri: str) -> list[dict[str, object]]:
    """Every sweep in the store, newest first: name, experiment (and its id), status, trials,
    start and end (local time, ``-`` while it runs)."""
    client = MlflowClient(uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    runs = client.search_runs(list(experiments), filter_string=f"tags.`{SWEEP_TAG}` LIKE '%'", order_by=["attributes.start_time DESC"])

    def when(ms):
        return "-" if not ms else time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))

    return [
        {"sweep": r.data.tags[SWEEP_TAG], "experiment": experiments.get(r.info.experiment_id, "?"), "experiment_id": r.info.experiment_id,
         "status": r.info.status,
         "trials": r.data.params.get("n_trials", "?"), "started": when(r.info.start_time), "ended": when(r.info.end_time)}
        for r in runs
    ]  # fmt: skip


def similar_sweeps(uri: str, name: str) -> list[str]:
    """Sweep names in the store that ``name`` may have meant: those it starts (``demo`` for
    ``demo-20261201-1200``), else the closest spellings."""
    import difflib

    names = list(dict.fromkeys(str(s["sweep"]) for s in list_sweeps(uri)))
    return [n for n in names if n.startswith(name)][:3] or difflib.get_close_matches(name, names, n=1)


def _timed(method):
    """Adds the call's duration to ``self.seconds`` (what logging costs a trial, see bench/sweep_overhead.py)."""

    def call(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    call.__doc__, call.__name__ = method.__doc__, method.__name__
    return call


class TrialRun:
    """The child run of one trial, as a context manager.

    On entry it finds the run tagged with this ``trial_id`` under the parent (a retried or
    restored trial continues its run) or creates it, named by what sets the trial's ``params``
    apart from the sweep's shared ones (the parent run's), ``trial_name`` when nothing does. It
    logs only params the parent does not hold alike. On exit the run is FINISHED; KILLED if Ray
    stopped the trial before it was ``complete``; or FAILED with the error as the tag ``error``
    and the artifact ``error.txt``.
    """

    def __init__(
        self, uri: str, experiment_id: str, parent_run_id: str, trial_id: str, trial_name: str, params: dict[str, str] | None = None
    ):
        self.client = MlflowClient(uri)
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.trial_id, self.trial_name, self.params = trial_id, trial_name, params or {}
        self.shared: dict[str, str] = {}  # the parent run's params
        self.run_id = ""
        self.previous_status: str | None = None  # of the run found on entry; None if created
        self.previous_error: str | None = None  # its tag ``error``, if it FAILED
        self.seconds = 0.0  # spent in the logging methods
        self.upload_failed = False  # an artifact could not be saved (tag warning.artifacts)
        self.unwritten: list[Metric] = []  # logged with later=True, written by flush()
        # set once the trial has logged all it logs: Ray stopping it after that (ASHA stops a
        # trial at its last report, Ctrl-C may come) leaves the run FINISHED
        self.complete = False

    def __enter__(self) -> "TrialRun":
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.trial_id = '{self.trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
        )
        self.shared = self.client.get_run(self.parent_run_id).data.params
        if found:
            self.run_id, self.previous_status = found[0].info.run_id, found[0].info.status
            self.previous_error = found[0].data.tags.get("error")
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"trial_id": self.trial_id, "mlflow.parentRunId": self.parent_run_id}
            name = trial_run_name(self.params, self.shared) or self.trial_name
            self.run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
        return self

    @_timed
    def latest_metrics(self) -> dict[str, float]:
        """The last value of every metric logged to this run."""
        return dict(self.client.get_run(self.run_id).data.metrics)

    @_timed
    def last_step(self, metric: str) -> int:
        """The highest step at which ``metric`` was logged to this run; 0 if never."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, metric)), default=0)

    @_timed
    def log_params(self, params: dict[str, str]) -> None:
        """Log the ``params`` this run does not hold yet (params are write-once), but for those
        the parent run holds alike."""
        existing = self.client.get_run(self.run_id).data.params
        _log_params(self.client, self.run_id, {k: v for k, v in params.items() if k not in existing and self.shared.get(k) != v})

    def log_metrics(self, metrics: dict[str, float], step: int, later: bool = False) -> None:
        """Log ``metrics`` at ``step``; with ``later``, kept until the next ``flush()`` (one write for
        many epochs: each write costs about 12 ms on a local SQLite store)."""
        now = int(time.time() * 1000)
        self.unwritten += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if not later:
            self.flush()

    @_timed
    def flush(self) -> None:
        """Write the metrics kept by ``log_metrics(later=True)``."""
        while self.unwritten:
            batch, self.unwritten = self.unwritten[:MAX_METRICS_PER_BATCH], self.unwritten[MAX_METRICS_PER_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def _upload(self, what: str, upload) -> bool:
        """An artifact upload that cannot fail the trial: scores and metrics live in the tracking
        store, artifacts in the artifact store, which may be unwritable (a full disk, a read-only
        bucket). A failure is a warning on the run (tag ``warning.artifacts``, the first one) and on
        stderr; the trial goes on and logs its scores."""
        try:
            upload()
            return True
        except Exception as err:  # noqa: BLE001 (any store's error: the scores must still be logged)
            message = f"{what} not saved: {type(err).__name__}: {err}"[:1000]
            print(f"warning: trial {self.trial_id}: {message}", file=sys.stderr, flush=True)
            if not self.upload_failed:
                self.upload_failed = True
                self.client.set_tag(self.run_id, "warning.artifacts", message)
            return False

    @_timed
    def log_figure(self, figure, artifact_file: str, key: str | None = None) -> bool:
        """Save a matplotlib figure as an image artifact and free it; False if it could not be saved.
        With ``key`` it is also an image under that key (``log_image``), which the MLflow UI's chart
        view shows side by side across runs."""
        import matplotlib.pyplot as plt
        import numpy as np

        def as_image():
            figure.canvas.draw()
            self.client.log_image(self.run_id, np.asarray(figure.canvas.buffer_rgba())[..., :3], key=key, step=0)

        try:
            saved = self._upload(artifact_file, lambda: self.client.log_figure(self.run_id, figure, artifact_file))
            return saved and (key is None or self._upload(f"image {key}", as_image))
        finally:
            plt.close(figure)

    @_timed
    def log_text(self, text: str, artifact_file: str) -> bool:
        return self._upload(artifact_file, lambda: self.client.log_text(self.run_id, text, artifact_file))

    @_timed
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> bool:
        return self._upload(Path(local_path).name, lambda: self.client.log_artifact(self.run_id, str(local_path), artifact_path))

    @_timed
    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.flush()  # also when the trial failed or was stopped: its epochs so far belong in the run
        except Exception:
            if exc is None:
                raise
        stopped = exc_type in (SystemExit, KeyboardInterrupt)
        if exc is None or (stopped and self.complete):
            self.client.set_terminated(self.run_id, "FINISHED")
        elif stopped:
            # Ray stopped the trial (early stopping or Ctrl-C: it ends the thread with
            # SystemExit): the driver tells which, see close_trial_runs
            self.client.set_terminated(self.run_id, "KILLED")
        else:
            message = f"{exc_type.__name__}: {exc}"
            self.client.set_tag(self.run_id, "error", message[:5000])
            self.client.log_text(self.run_id, message, "error.txt")
            self.client.set_terminated(self.run_id, "FAILED")
        return False


def ui_base(uri: str) -> str:
    """Where the MLflow UI of store ``uri`` is: a tracking server serves its own; a local store is
    shown by ``probesweep ui`` on 127.0.0.1:5000."""
    if not uri.startswith(("http://", "https://")):
        return f"http://{UI_HOST}:{UI_PORT}"
    return re.sub(r"^(https?://)[^/@]*@", r"\1", uri).split("?")[0].rstrip("/")  # no credentials in a link


CLASSIC_VIEW = "workflowType=machine_learning"  # MLflow 3 otherwise opens an experiment in its GenAI view


def runs_table_url(uri: str, experiment_id: str) -> str:
    """The UI page with the runs table, in the classic (model training) view."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?{CLASSIC_VIEW}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The UI page of one run, in the classic (model training) view."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?{CLASSIC_VIEW}"


# MLflow's job runner (8 more processes) serves its GenAI features only: the UI of probe sweeps
# answered after 8.7 s instead of 11.1 s without it (2 cores, measured); a user's own setting wins
UI_ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def ui_command(uri: str, host: str = UI_HOST, port: int = UI_PORT) -> list[str]:
    """``mlflow ui`` on the sweep's store, bound to loopback, with this environment's ``mlflow``.

    The executable is spelled relative to the current directory where it lies under it
    (``.venv/bin/mlflow`` after ``make demo``), so the printed command works without activating
    the virtual environment.
    """
    executable = Path(sys.executable).with_name("mlflow").absolute()
    if executable.is_relative_to(Path.cwd()):
        executable = executable.relative_to(Path.cwd())
    # one server process for one person's browser: each of mlflow's default four imports the whole
    # server, and the UI answered after 7-10 s instead of 12.5-14 s on a 2-core machine (measured)
    command = [str(executable), "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    store = _local_store_dir(uri)
    if store:
        command += ["--default-artifact-root", (store / "mlartifacts").resolve().as_uri()]
    return command
