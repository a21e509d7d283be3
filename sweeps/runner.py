"""Runs a validated sweep: caches first, then MLflow, then Ray Tune, then the parent run's status.

Order matters. Backbones are pre-trained and features cached in the driver, so trials only read
them; the MLflow store, experiment and parent run exist before any trial starts; a bad spec has
already failed in ``sweeps.spec`` before this module is reached.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from sweeps.report import is_localisation_score
from sweeps.spec import SweepSpec
from sweeps.tracking import default_tracking_uri, ensure_experiment, start_sweep_run

__all__ = ["SweepOutcome", "prepare_caches", "run_sweep", "trial_param_space"]


@dataclass(frozen=True)
class SweepOutcome:
    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    n_trials: int
    n_failed: int
    storage_path: str


def prepare_caches(spec: SweepSpec, log: Callable[[str], None] = print) -> None:
    """Pre-train (first use) each backbone and cache its features for both splits."""
    from probing.backbones import create_backbone
    from probing.datasets import create_dataset
    from probing.features import cached_features

    dataset = spec.data.dataset
    for name in spec.backbones:
        backbone = create_backbone(name, log=log)
        for split in ("train", "val"):
            cached_features(backbone, create_dataset(dataset, split), dataset, split, log=log)


def trial_param_space(spec: SweepSpec, runtime: dict) -> dict:
    """Ray Tune's param space: grid axes for backbone, loss, head and seed; the rest fixed."""
    from ray import tune

    from sweeps.trainable import RUNTIME_KEY

    train = spec.train.model_dump(exclude={"seed"})
    return {
        "backbone": tune.grid_search(spec.backbones),
        "loss": tune.grid_search(spec.probe.loss),
        "head": tune.grid_search([h.model_dump(exclude_none=True) for h in spec.probe.head]),
        "seed": tune.grid_search(spec.train.seed),
        "logit_bias": spec.probe.logit_bias,
        "data": spec.data.model_dump(),
        "train": train,
        "evaluate": spec.evaluate.model_dump(),
        RUNTIME_KEY: runtime,
    }


def _progress_callback(total: int, log: Callable[[str], None]):
    from ray import tune

    class Progress(tune.Callback):
        """One line per finished or failed trial instead of Ray's status dump."""

        def __init__(self):
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            result = trial.last_result or {}
            scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.items()) if is_localisation_score(k))
            grids = int(result.get("grids/count", 0))
            log(
                f"[{self.done}/{total}] {trial.trial_id} {trial.config['loss']} {trial.config['head']['type']}: "
                f"val acc {result.get('val/accuracy', float('nan')):.3f}, {grids} grids"
                + (f", {scores}" if scores else "")
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            log(f"[{self.done}/{total}] {trial.trial_id} FAILED: see {trial.local_path or trial.path}/error.txt")

    return Progress()


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


def run_sweep(
    spec: SweepSpec,
    *,
    name: str | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    workdir: Path | None = None,
    log: Callable[[str], None] = print,
) -> SweepOutcome:
    """Run every trial of ``spec`` on a local Ray instance (or the cluster at ``address``).

    Args:
        name: the sweep's name in MLflow and Ray; default ``<spec name>-<date>-<time>``.
        address: a Ray cluster address (``auto``, ``HOST:PORT``); default: start a local instance.
        tracking_uri: MLflow store; default ``spec.tracking.uri`` or ``sqlite:///<workdir>/mlflow.db``.
        workdir: where relative outputs go; default the current directory.
    """
    from mlflow import MlflowClient

    from probing.backbones import cache_dir

    workdir = (workdir or Path.cwd()).resolve()
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = tracking_uri or spec.tracking.uri or default_tracking_uri(workdir)
    storage = Path(spec.storage or workdir / "ray_results").expanduser().resolve()
    n_trials = len(spec.trials())

    prepare_caches(spec, log)
    experiment_id = ensure_experiment(uri, spec.tracking.experiment or spec.name)
    spec_yaml = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    parent_run_id = start_sweep_run(uri, experiment_id, name, spec_yaml, n_trials)
    runtime = {
        "tracking_uri": uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent_run_id,
        "cache_dir": str(cache_dir()),
        "threads": max(1, int(spec.resources.cpu)),
    }
    log(f"sweep {name}: {n_trials} trials, MLflow {uri} (experiment {experiment_id}), Ray results {storage / name}")
    log_file = storage / name / "driver.log"
    log(f"Ray's own messages go to {log_file}")
    status, failed = "FAILED", n_trials
    try:
        with ray_output_to(log_file) as reroute:
            failed = _fit(spec, name, storage, runtime, n_trials, address, log, after_init=reroute)
        status = "FINISHED" if failed == 0 else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:  # never leave the sweep's run RUNNING
        MlflowClient(uri).set_terminated(parent_run_id, status)
    return SweepOutcome(name, uri, experiment_id, parent_run_id, n_trials, failed, str(storage / name))


def _fit(spec, name, storage, runtime, n_trials, address, log, after_init) -> int:
    """Start (or join) Ray, run the Tuner, shut Ray down; returns the number of failed trials."""
    import ray
    from ray import tune

    from sweeps.trainable import probe_trial

    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    after_init()
    failed = n_trials
    try:
        tuner = tune.Tuner(
            tune.with_resources(probe_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}),
            param_space=trial_param_space(spec, runtime),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                verbose=0,
                callbacks=[_progress_callback(n_trials, log)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
        failed = tuner.fit().num_errors
    finally:
        ray.shutdown()
    return failed

