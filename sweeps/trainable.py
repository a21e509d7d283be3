"""The Ray Tune function trainable: one trial = :func:`sweeps.trial.run_trial` with Ray Tune's
session (reports, checkpoints) and the trial's MLflow run as its tracker.

A trial reads its config, continues its MLflow run if one exists (tag ``trial_id``), resumes from
``tune.get_checkpoint()`` if there is one, and reports to Ray Tune with a checkpoint of the
trainer state no more often than every ``train.checkpoint_every_s`` and after the last epoch (and
every epoch when an early-stopping scheduler reads the results); the epochs' metrics are written
to MLflow with each checkpoint. The last epoch adds the localisation scores, the AggAtt figures,
the probe and the trial's timings, all logged before its report: ASHA stops a trial at that report.
An epoch that ended after the last checkpoint Ray saved is trained again when the trial resumes,
but logged once: the run's metric history holds each epoch one time. A trial whose probe diverged
is not trained again when Ray retries it: the retry fails at once with the recorded error.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

from probing.train import DivergedError
from sweeps.spec_files import secret_uri
from sweeps.trial import TrialConfig, TrialSession, flatten, run_trial, trial_params

__all__ = ["probe_trial", "RUNTIME_KEY", "RaySession"]

RUNTIME_KEY = "runtime"  # config entries that say where to log, not what to train
SEARCH_KEY = "search"  # Optuna's own choices (``search/lr``, ...), which Ray's OptunaSearch adds to the config
STATE_FILE = "trainer.pt"
NOT_TRAINED_AGAIN = " (the trial's retry was not trained again: the same seed and data diverge the same way)"


class RaySession(TrialSession):
    """Ray Tune's side of a trial: its checkpoint, and its reports. Ray checks that every result
    holds the searcher's metrics: the objectives are NaN until the probe is explained (and stay NaN
    for a trial that ASHA stops before that)."""

    def __init__(self, objectives: list[str], report_every_epoch: bool):
        self.pending = {metric: float("nan") for metric in objectives}
        self.report_every_epoch = report_every_epoch

    def restore(self) -> dict | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if not checkpoint:
            return None
        with checkpoint.as_directory() as folder:
            state = kept_state(Path(folder))
            return torch.load(state, weights_only=True) if state is not None else None

    def report(self, results: dict[str, float], state: dict | None) -> None:
        from ray import tune

        if state is None:
            return tune.report({**self.pending, **results})
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / STATE_FILE)
            tune.report({**self.pending, **results}, checkpoint=tune.Checkpoint.from_directory(folder))


def probe_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable; see the module docstring."""
    import ray
    from ray import tune

    from sweeps.tracking import TrialRun

    runtime = config[RUNTIME_KEY]
    trial = TrialConfig.model_validate({k: v for k, v in config.items() if k not in (RUNTIME_KEY, SEARCH_KEY)})
    os.environ["PROBESWEEP_CACHE"] = runtime["cache_dir"]
    torch.set_num_threads(runtime["threads"])
    context = tune.get_context()
    with TrialRun(
        secret_uri(runtime["tracking_uri"]),  # a URI with a secret comes from the environment
        runtime["experiment_id"],
        runtime["parent_run_id"],
        context.get_trial_id(),
        context.get_trial_name(),
        trial_params(trial),  # the run is named by those that set it apart
    ) as run:
        diverged = f"{DivergedError.__name__}: "  # how TrialRun records the error
        if run.previous_status == "FAILED" and (run.previous_error or "").startswith(diverged):
            # Ray retries a failed trial (resources.max_failures) for a lost node or process; a probe
            # that diverged diverges again on the same seed and data: no second training to learn it
            recorded = run.previous_error.removeprefix(diverged).removesuffix(NOT_TRAINED_AGAIN)
            raise DivergedError(recorded + NOT_TRAINED_AGAIN)
        if run.previous_status != "FINISHED":
            node_id = ray.get_runtime_context().get_node_id()
            # the address the node joined the cluster with (several nodes may share a host)
            node_ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), ray.util.get_node_ip_address())
            run.set_tags({"node_ip": node_ip, "node_id": node_id, "hostname": socket.gethostname()})
            if SEARCH_KEY in config:  # the study's names for the trial's values, as params beside them
                run.log_params(flatten({SEARCH_KEY: config[SEARCH_KEY]}))
        run_trial(trial, run, RaySession(runtime["objectives"], runtime.get("report_every_epoch", True)))


def kept_state(folder: Path) -> Path | None:
    """The trainer state in Ray's checkpoint ``folder``. Ray's experiment snapshot lags by seconds
    and may name a checkpoint that was since deleted (it keeps the newest two): then the newest
    checkpoint beside it, whose epochs MLflow holds too (it is saved after their write); None if
    the trial has none left."""
    if (folder / STATE_FILE).is_file():
        return folder / STATE_FILE
    kept = sorted(folder.parent.glob(f"checkpoint_*/{STATE_FILE}"))  # checkpoint_000012: zero-padded
    return kept[-1] if kept else None


