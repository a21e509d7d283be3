"""Kill the driver mid-sweep (SIGKILL), `probesweep resume`, and read MLflow back.

Every trial must finish exactly once, with one MLflow run each and none left RUNNING; a trial
that was running when the driver died continues its own run (from the checkpoint that Ray's last
experiment snapshot holds); a trial that had finished is not run again.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import session_processes

pytestmark = pytest.mark.slow
PROBESWEEP = str(Path(sys.executable).with_name("probesweep"))
EPOCHS = 8
SPEC = {
    "name": "resume",
    "backbones": ["tiny_resnet_sup"],
    "probe": {"loss": ["ce", "bce"], "head": [{"type": "mlp", "depth": 2, "width": 512}]},
    # a checkpoint every epoch: the driver is killed while a trial is past its first checkpoints
    "train": {"epochs": EPOCHS, "lr": 1.0e-2, "seed": [0, 1], "checkpoint_every_s": 0},
    "evaluate": {"methods": ["ixg"], "layers": ["input"], "n_grids": 4, "confidence": 0.5},
    "tracking": {"experiment": "resume"},
}


def _children(client, experiment_name):
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def _steps(client, run_id):
    return [m.step for m in client.get_metric_history(run_id, "train/loss")]


def _wait_until_mid_sweep(client, driver, timeout=600):
    """Until one trial has finished and another is running past its first checkpoints."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        children = _children(client, "resume")
        finished = [c for c in children if c.info.status == "FINISHED"]
        running = [c for c in children if c.info.status == "RUNNING" and len(_steps(client, c.info.run_id)) >= 2]
        if finished and running:
            return {c.data.tags["trial_id"] for c in finished}
        time.sleep(0.3)
    raise AssertionError("the sweep never reached the middle")


def test_killed_sweep_resumes_without_repeating_work(tmp_path):
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(SPEC))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    earlier = {p.pid for p in session_processes()}
    driver = subprocess.Popen(
        [PROBESWEEP, "run", "resume.yaml", "--name", "killed"], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        finished_before = _wait_until_mid_sweep(client, driver)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    # the killed driver's Ray processes: some linger for half a minute; `resume` stops those left
    lingering = {p.pid for p in session_processes()} - earlier

    result = subprocess.run([PROBESWEEP, "resume", "killed"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [p.pid for p in session_processes() if p.pid in lingering]
    assert "resuming sweep killed: 4 trials" in result.stderr

    children = _children(client, "resume")
    assert len(children) == 4 and len({c.data.tags["trial_id"] for c in children}) == 4  # one run per trial
    assert {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        steps = _steps(client, child.info.run_id)
        # a trial that was running continues its run from the checkpoint in Ray's last experiment
        # snapshot (taken every 10 s at least): the epochs after it are run again, logged once
        assert sorted(steps) == list(range(1, EPOCHS + 1)), steps
        assert "gridpg/ixg/input" in child.data.metrics
        if child.data.tags["trial_id"] in finished_before:  # not run again
            assert "resumed_at_epoch" not in child.data.tags
    parents = [r for r in client.search_runs([children[0].info.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    again = subprocess.run([PROBESWEEP, "resume", "killed"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "sweep killed has finished, every trial with it: nothing to resume" in again.stderr
    assert "Pareto front" in again.stdout  # its results, read back
    after = client.get_run(parents[0].info.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", parents[0].info.end_time)  # not restarted


def test_resume_of_an_unknown_sweep_is_refused(tmp_path):
    result = subprocess.run([PROBESWEEP, "resume", "ghost"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"no sweep 'ghost' to resume: {tmp_path.resolve()}/ray_results/ghost/probesweep.yaml does not exist" in result.stderr
