"""Runs a validated sweep: caches first, then MLflow, then Ray Tune, then the parent run's status.

Order matters. Backbones are pre-trained and features cached in the driver, so trials only read
them; the MLflow store, experiment and parent run exist before any trial starts; a bad spec has
already failed in ``sweeps.spec`` before this module is reached.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from sweeps.leftovers import record_processes, stop_leftovers
from sweeps.preflight import (
    check_can_create,
    check_cluster_resources,
    check_local_resources,
    check_private,
    check_tracking_store,
    private_auth_token,
)
from sweeps.spec import SweepSpec
# not sweeps.tracking: MLflow loads while Ray starts
from sweeps.spec_files import SECRET_URI_ENV, check_name, default_tracking_uri, redact_uri, secret_uri

if TYPE_CHECKING:  # (sweeps.report imports MLflow: the driver imports it when the sweep closes)
    from sweeps.report import SweepAnalysis

__all__ = ["SweepOutcome", "prepare_caches", "resume_sweep", "run_sweep", "trial_param_space"]


@dataclass(frozen=True)
class SweepOutcome:
    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    n_trials: int
    n_failed: int
    storage_path: str
    interrupted: bool = False
    analysis: SweepAnalysis | None = None  # of the stored scores, made for the parent run's summary


def prepare_caches(spec: SweepSpec, log: Callable[[str], None] = print) -> None:
    """Before Ray starts: read the data set (one-line errors), and pre-train each embedded backbone
    at its first use. The features are extracted on the cluster once Ray is up (``sweeps.extraction``)."""
    from probing.backbones import create_backbone
    from probing.datasets import create_dataset

    dataset = spec.data.dataset
    splits = {name: create_dataset(dataset, name, **spec.data.options()) for name in ("train", "val")}
    if splits["train"].num_classes < 2:
        raise ValueError(f"data set {dataset!r} has {splits['train'].num_classes} class: a probe needs at least 2")
    for name, split in splits.items():
        if split.skipped:
            log(f"{dataset}/{name}: skipped {split.skipped} unreadable images (skip_corrupt)")
    for entry in spec.backbones:
        create_backbone(entry.name, log=log, **entry.options())


def trial_param_space(runtime: dict) -> dict:
    """What every trial's config shares: where to log (the searcher, ``sweeps.search``, hands each
    trial its whole :class:`sweeps.trial.TrialConfig`)."""
    from sweeps.trainable import RUNTIME_KEY

    return {RUNTIME_KEY: runtime}


def _progress_callback(outcome: SweepOutcome, epochs: int, log: Callable[[str], None]):
    """The sweep's progress (:mod:`sweeps.progress`), a live table where stderr is a terminal; at
    the end it closes the runs of trials that Ray ended but that could not close their own
    (stopped early by the scheduler, or interrupted by Ctrl-C)."""
    from sweeps.progress import progress_callback
    from sweeps.tracking import close_trial_runs

    def close_runs(ended: dict[str, tuple[str, int]]) -> None:
        # Ray pickles the callback with the experiment: it holds the redacted URI, the real one is in the env
        close_trial_runs(secret_uri(outcome.tracking_uri), outcome.experiment_id, outcome.parent_run_id, ended, epochs)

    return progress_callback(outcome.n_trials, epochs, log, close_runs, live=sys.stderr.isatty())


@contextmanager
def ray_output_to(log_file: Path):
    """Send Ray's own log records to ``log_file`` instead of the terminal, for the block's duration.

    Ray's driver-side warnings (checkpoint snapshot cadence, token authentication, ...) would bury
    the one-line-per-trial progress; they stay available in the sweep's log file.
    """
    # The legacy output engine honours ``verbose=0``; the new one prints its boxes regardless.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("ray")
    saved = logger.handlers[:], logger.propagate

    def reroute() -> None:  # ray.init installs its own terminal handler again: call after it
        logger.handlers[:] = [handler]
        logger.propagate = False

    reroute()
    try:
        yield reroute
    finally:
        logger.handlers[:], logger.propagate = saved
        handler.close()


# Trials keep large activations mapped between operations instead of returning them to the OS and
# faulting them in again (REFERENCE section 7: about 2x on a small CPU). glibc's older variables for
# the two settings, because Ray's processes inherit them from the driver as they are (glibc rewrites
# GLIBC_TUNABLES in the environment a process passes on: only its first setting survives), and
# because giving them through a Ray runtime env costs every new worker process about 0.9 s.
# One malloc arena: Ray Tune runs a trial's function on a thread of its own, and in a Ray worker
# such a thread's arena returned its memory and faulted it in again regardless of these settings
# (57,000-74,000 page faults a second, 8% slower training; none with one arena).
# Only for a Ray instance the driver starts: a job on a cluster sets them in its own runtime env
# (docs/cluster.md).
TRIAL_ENV = {"MALLOC_MMAP_THRESHOLD_": "2147483647", "MALLOC_TRIM_THRESHOLD_": "4294967295", "MALLOC_ARENA_MAX": "1"}

QUIET_MLFLOW = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
RECORD_FILE = "probesweep.yaml"  # beside Ray's experiment state: what `probesweep resume` needs
DRIVER_LOG = "driver.log"


def run_sweep(
    spec: SweepSpec,
    *,
    name: str | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    workdir: Path | None = None,
    dashboard: bool = False,
    ray_results: bool = False,
    log: Callable[[str], None] = print,
) -> SweepOutcome:
    """Run every trial of ``spec`` on a local Ray instance (or the cluster at ``address``).

    Args:
        name: the sweep's name in MLflow and Ray; default ``<spec name>-<date>-<time>``.
        address: a Ray cluster address (``auto``, ``HOST:PORT``); default: start a local instance.
        tracking_uri: MLflow store; default ``spec.tracking.uri`` or ``sqlite:///<workdir>/mlflow.db``.
        storage: Ray results folder (on a cluster: a path every node reaches); default
            ``spec.storage`` or ``<workdir>/ray_results``.
        workdir: where relative outputs go; default the current directory.
        dashboard: start Ray's dashboard with the local instance, on 127.0.0.1 (a cluster has its own).
        ray_results: let Ray Tune write its own result files (``result.json``, ``progress.csv``,
            TensorBoard events) beside its checkpoints, for ``ResultGrid`` and TensorBoard; off by
            default, since the results are in MLflow and the files cost the driver CPU time.
    """
    from probing.backbones import cache_dir

    workdir = (workdir or Path.cwd()).resolve()
    name = check_name(name) if name else f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = tracking_uri or spec.tracking.uri or default_tracking_uri(workdir)
    shown = redact_uri(uri)  # what is printed and stored; the real URI stays in memory and the trials' environment
    if shown != uri:
        os.environ[SECRET_URI_ENV] = uri
    if spec.tracking.uri:  # from here on the spec travels (searchers, Ray's pickles): redacted
        spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"uri": redact_uri(spec.tracking.uri)})})
    storage = Path(storage or spec.storage or workdir / "ray_results").expanduser().resolve()
    if (storage / name / RECORD_FILE).exists():  # (a sweep whose set-up failed left no record)
        raise FileExistsError(f"sweep {name!r} already exists in {storage}: resume it with `probesweep resume {name}`")
    n_trials = spec.n_trials()
    check_tracking_store(uri)  # before anything starts: an unknown scheme or a silent server
    check_can_create(storage / name, "--storage (the Ray results folder)")
    if uri.startswith("sqlite:///"):
        check_can_create(Path(uri.removeprefix("sqlite:///")).parent, "the MLflow store's folder")
    if address is None:
        check_local_resources(spec)
    prepare_caches(spec, log)

    def start_tracking() -> SweepOutcome:
        """The experiment and the sweep's parent run (while Ray starts), and the sweep's record."""
        from sweeps.tracking import ensure_experiment, start_sweep_run

        experiment_id = ensure_experiment(uri, spec.tracking.experiment or spec.name)
        spec_yaml = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
        parent_run_id = start_sweep_run(uri, experiment_id, name, spec_yaml, n_trials, spec.search.objectives, spec.shared_params())
        outcome = SweepOutcome(name, uri, experiment_id, parent_run_id, n_trials, n_trials, str(storage / name))
        stored = {k: v for k, v in asdict(outcome).items() if k != "analysis"}  # (made at the end, never stored)
        record = {"spec": spec.model_dump(mode="json"), "outcome": stored | {"tracking_uri": shown}}
        (storage / name / RECORD_FILE).write_text(yaml.safe_dump(record, sort_keys=False))
        log(f"sweep {name}: {n_trials} trials ({spec.search.algorithm} search), MLflow {shown} (experiment {experiment_id}), Ray results {storage / name}")
        return outcome

    def new_tuner(outcome: SweepOutcome):
        from ray import tune

        from sweeps.search import tune_config

        runtime = {
            "tracking_uri": shown,  # Ray stores the param space (tuner.pkl): the trials read the real one from their env
            "experiment_id": outcome.experiment_id,
            "parent_run_id": outcome.parent_run_id,
            "cache_dir": str(cache_dir()),
            "threads": max(1, int(spec.resources.cpu)),
            "objectives": list(spec.search.objectives),
            "report_every_epoch": spec.search.scheduler is not None,
        }
        return tune.Tuner(
            _trainable(spec),
            param_space=trial_param_space(runtime),
            tune_config=tune_config(spec, storage / name, name),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                verbose=0,
                callbacks=[_progress_callback(replace(outcome, tracking_uri=shown), spec.train.epochs, log)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            ),
        )

    (storage / name).mkdir(parents=True, exist_ok=True)
    return _drive(spec, start_tracking, new_tuner, address, storage / name / DRIVER_LOG, log, dashboard, ray_results)


def resume_sweep(
    name: str, *, storage: Path | None = None, address: str | None = None, dashboard: bool = False, ray_results: bool = False,
    log: Callable[[str], None] = print,
) -> SweepOutcome:
    """Continue an interrupted sweep: finished trials stay finished, the others resume from their
    last checkpoint and continue their MLflow runs.

    Args:
        storage: the folder holding the sweep's Ray results; default ``./ray_results``.
        dashboard: start Ray's dashboard with the local instance, on 127.0.0.1.
        ray_results: let Ray Tune write its own result files (see :func:`run_sweep`).
    """
    folder = Path(storage or Path.cwd() / "ray_results").expanduser().resolve() / check_name(name)
    record_file = folder / RECORD_FILE
    if not record_file.is_file():
        raise FileNotFoundError(f"no sweep {name!r} to resume: {record_file} does not exist")
    from mlflow import MlflowClient  # seconds of imports: after the check a mistyped name fails
    from ray import tune

    check_private(folder)
    stop_leftovers(folder, log)  # Ray processes of the sweep's killed driver
    if not tune.Tuner.can_restore(str(folder)):
        raise FileNotFoundError(f"sweep {name!r} never started its trials ({folder} holds no Ray Tune state)")
    record = yaml.safe_load(record_file.read_text())
    spec = SweepSpec.model_validate(record["spec"])
    outcome = SweepOutcome(**record["outcome"])
    shown = outcome.tracking_uri
    outcome = replace(outcome, tracking_uri=secret_uri(shown))  # the real one, from $PROBESWEEP_TRACKING_URI
    client = MlflowClient(outcome.tracking_uri)
    if client.get_run(outcome.parent_run_id).info.status == "FINISHED":  # Ray would start, and the end time move, for nothing
        log(f"sweep {name} has finished, every trial with it: nothing to resume (its results follow)")
        return replace(outcome, n_failed=0, interrupted=False)  # FINISHED: the sweep closed with no failed trial
    client.update_run(outcome.parent_run_id, status="RUNNING")
    log(f"resuming sweep {name}: {outcome.n_trials} trials, MLflow {shown}, Ray results {folder}")
    prepare_caches(spec, log)  # a fresh node (or a wiped cache) rebuilds what the trials read

    def restored_tuner(outcome: SweepOutcome):
        return tune.Tuner.restore(str(folder), trainable=_trainable(spec), resume_unfinished=True, resume_errored=True)

    return _drive(spec, lambda: outcome, restored_tuner, address, folder / DRIVER_LOG, log, dashboard, ray_results)


def _trainable(spec: SweepSpec):
    from ray import tune

    from sweeps.trainable import probe_trial

    return tune.with_resources(probe_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def _drive(
    spec: SweepSpec,
    start_tracking: Callable[[], SweepOutcome],
    make_tuner: Callable[[SweepOutcome], object],
    address: str | None,
    log_file: Path,
    log: Callable[[str], None],
    dashboard: bool = False,
    ray_results: bool = False,
) -> SweepOutcome:
    """Start (or join) Ray while ``start_tracking`` sets up the sweep's MLflow runs in a thread,
    fit the tuner, log the sweep's summary and Pareto front to its MLflow run and close it, then
    shut Ray down.

    Ray starts in the main thread (the processes it starts die with the thread that started them)
    and takes about 4 s here; the MLflow set-up about 2 s on a new store: done one after the
    other, they were the largest part of a sweep's fixed cost (bench/sweep_overhead.py).

    Ctrl-C: Ray Tune stops the trials and saves the experiment; the sweep's run is KILLED and
    ``probesweep resume`` continues it (a second Ctrl-C stops at once, with the same result).
    """
    import ray

    from sweeps.extraction import extract_features

    log(f"Ray's own messages go to {log_file}")
    ended_by = "fit"  # or "interrupt" (a second Ctrl-C, while Ray Tune was saving its state), "error"
    with ThreadPoolExecutor(1, thread_name_prefix="mlflow-setup") as pool:
        tracking = pool.submit(start_tracking)
        with ray_output_to(log_file) as reroute:
            try:
                if address is None:  # for the processes of the local instance, the trials' among them
                    for key, value in TRIAL_ENV.items():
                        os.environ.setdefault(key, value)
                # results live in MLflow: Ray Tune's own per-result JSON/CSV/TensorBoard files only
                # cost the driver CPU time, which the trials' threads lose on a small machine
                os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0" if ray_results else "1"
                # MLflow prints "View run ... at <tracking URI>" when a run ends: with the URI's
                # password, into the terminal and Ray's worker logs; probesweep prints its own links
                os.environ[QUIET_MLFLOW] = "true"
                context = ray.init(
                    # "local": a new instance even where `ray start` left a cluster address behind (a
                    # plain ray.init() would try to join it, and wait forever if it is gone)
                    address=address or "local", include_dashboard=dashboard and address is None, dashboard_host="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING,
                    # nothing reads Ray's metrics here; exporting them keeps its daemons busy
                    _system_config={"enable_metrics_collection": False} if address is None else None,
                    # a tracking URI with a secret reaches a cluster's trials in memory, never in a file
                    runtime_env={"env_vars": {k: os.environ[k] for k in (SECRET_URI_ENV, QUIET_MLFLOW) if k in os.environ}}
                    if address is not None else None,
                )  # fmt: skip
                private_auth_token()
                if dashboard:
                    where = context.dashboard_url or "not started (see the sweep's log)"
                    log(f"Ray's dashboard: {'http://' if context.dashboard_url else ''}{where}")
                if address is not None:
                    check_cluster_resources(spec, log)
                else:  # found again and stopped by `resume` if this driver is killed
                    record_processes(log_file.parent)
                reroute()
                extract_features(spec, log)  # every shard the trials read, on the cluster, before they start
                make_tuner(tracking.result()).fit()
            except KeyboardInterrupt:
                ended_by = "interrupt"
                raise
            except Exception:
                ended_by = "error"
                raise
            finally:
                # never leave a run of the sweep RUNNING; count what ended from the runs themselves.
                # Before Ray's shutdown: after a lost node the driver can crash at its end (seen once,
                # a segfault after the last trial of tests/test_two_nodes.py's lost-node job;
                # ray-project/ray#6025), and the results must be logged by then
                try:
                    if tracking.exception() is None:  # (waits for it) else there are no runs: its error is raised
                        outcome = tracking.result()
                        failed, interrupted, analysis = _close_sweep(outcome, spec, ended_by, log)
                finally:
                    ray.shutdown()
    if interrupted:
        log(f"sweep {outcome.name} interrupted: continue it with `probesweep resume {outcome.name}`")
    return replace(outcome, n_failed=failed, interrupted=interrupted, analysis=analysis)


def _close_sweep(outcome: SweepOutcome, spec: SweepSpec, ended_by: str, log: Callable[[str], None]) -> tuple[int, bool, SweepAnalysis | None]:
    """Close the trial runs and the sweep's run, with its summary; returns (failed trials,
    interrupted, the analysis of the stored scores or None where the summary failed)."""
    from mlflow import MlflowClient

    from sweeps.summary import log_sweep_summary
    from sweeps.tracking import close_trial_runs

    uri = outcome.tracking_uri
    statuses = close_trial_runs(uri, outcome.experiment_id, outcome.parent_run_id, {}, spec.train.epochs)
    failed = sum(s == "FAILED" for s in statuses.values())
    # Ray marks the trials it stops on Ctrl-C TERMINATED like finished ones; their runs say KILLED
    ended = failed + sum(s == "FINISHED" for s in statuses.values())
    interrupted = ended_by == "interrupt" or (ended_by == "fit" and ended < outcome.n_trials)
    status = "KILLED" if interrupted else "FINISHED" if ended_by == "fit" and failed == 0 else "FAILED"
    analysis = None
    try:
        front, analysis = log_sweep_summary(uri, outcome.parent_run_id, spec.search.objectives, log=log)
        log(f"Pareto front of {', '.join(f'{m} ({d})' for m, d in spec.search.objectives.items())}: {len(front)} trial(s)")
    except Exception as err:  # the trials' results are in MLflow whatever happens here
        log(f"could not log the sweep's summary to MLflow: {err}")
    MlflowClient(uri).set_terminated(outcome.parent_run_id, status)
    return failed, interrupted, analysis
