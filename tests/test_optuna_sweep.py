"""An Optuna multi-objective search with ASHA, interrupted with Ctrl-C and resumed, read back.

The driver runs as a user runs it, in its own process group, and gets SIGINT as a terminal's
Ctrl-C sends it (to the whole foreground group). Then `probesweep resume` finishes the sweep and
the report's Pareto front is checked against the non-dominated set computed here from the runs.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from conftest import session_processes, wait_for_exit

pytestmark = pytest.mark.slow
PROBESWEEP = str(Path(sys.executable).with_name("probesweep"))
EPOCHS, SAMPLES = 8, 6
# Ctrl-C while a trial has logged this many epochs: past ASHA's rungs (epochs 2 and 4), before its
# last; small batches make an epoch last long enough (about 0.5 s) to be caught there
INTERRUPT_AT = (5, 6)
OBJECTIVES = {"val/accuracy": "max", "gridpg/ixg/input": "max"}
SPEC = {
    "name": "moo",
    "backbones": ["tiny_resnet_sup"],
    "probe": {
        "loss": ["ce", "bce"],
        "head": [{"type": "linear"}, {"type": "bcos", "depth": 1, "bcos_b": {"low": 1.0, "high": 2.5}}],
    },
    "train": {
        "epochs": EPOCHS, "batch_size": 4, "lr": {"low": 1.0e-3, "high": 3.0e-2, "log": True}, "checkpoint_every_s": 0,
    },  # fmt: skip
    "evaluate": {"methods": ["ixg"], "layers": ["input"], "n_grids": 4, "confidence": 0.5},
    "search": {
        "algorithm": "optuna",
        "num_samples": SAMPLES,
        "seed": 3,
        "objectives": OBJECTIVES,
        # val/loss, not val/accuracy: small batches bring several probes to the same accuracy by epoch
        # 2, and ASHA stops no trial that ties its cutoff
        "scheduler": {"metric": "val/loss", "mode": "min", "grace_period": 2, "reduction_factor": 2},
    },
    "tracking": {"experiment": "moo"},
}


def _children(client):
    experiment = client.get_experiment_by_name("moo")
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def _epochs(client, run) -> int:
    return max((m.step for m in client.get_metric_history(run.info.run_id, "train/loss")), default=0)


def _parent(client):
    experiment = client.get_experiment_by_name("moo")
    return next(r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Run, Ctrl-C once one trial has ended and another is between ASHA's last rung and its last epoch, resume."""
    workdir = tmp_path_factory.mktemp("moo")
    (workdir / "moo.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    earlier = {p.pid for p in session_processes()}
    driver = subprocess.Popen(
        [PROBESWEEP, "run", "moo.yaml", "--name", "moo"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and driver.poll() is None:
            children = _children(client)
            running = [
                c for c in children
                if c.info.status == "RUNNING" and INTERRUPT_AT[0] <= _epochs(client, c) <= INTERRUPT_AT[1]
            ]  # fmt: skip
            if any(c.info.status != "RUNNING" for c in children) and running:
                break
            time.sleep(0.3)
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        os.killpg(driver.pid, signal.SIGINT)
        out, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    interrupted = {
        "returncode": driver.returncode,
        "stderr": err,
        "parent": _parent(client).info.status,
        "children": {c.data.tags["trial_id"]: c.info.status for c in _children(client)},
        "epochs": {c.data.tags["trial_id"]: _epochs(client, c) for c in _children(client)},
    }
    wait_for_exit(earlier)
    resumed = subprocess.run([PROBESWEEP, "resume", "moo"], cwd=workdir, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return workdir, client, interrupted, resumed


def test_ctrl_c_stops_cleanly_and_leaves_a_resumable_sweep(sweep):
    _, _, interrupted, _ = sweep
    assert interrupted["returncode"] == 130, interrupted["stderr"]
    assert "sweep moo interrupted: continue it with `probesweep resume moo`" in interrupted["stderr"]
    assert "Traceback" not in interrupted["stderr"]
    assert interrupted["parent"] == "KILLED"
    statuses = set(interrupted["children"].values())
    assert "RUNNING" not in statuses and "KILLED" in statuses, interrupted["children"]


def test_resumed_sweep_ran_every_trial_once(sweep):
    workdir, client, interrupted, resumed = sweep
    children = _children(client)
    assert len(children) == SAMPLES and len({c.data.tags["trial_id"] for c in children}) == SAMPLES
    assert {c.info.status for c in children} == {"FINISHED"} and _parent(client).info.status == "FINISHED"
    for child in children:  # every epoch logged once, also those a resumed trial trained again
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, max(steps) + 1)) and max(steps) <= EPOCHS, steps
        stopped = child.data.tags.get("stopped_early")
        assert (stopped is None) == (max(steps) == EPOCHS)
        assert (stopped is None) == ("grids/count" in child.data.metrics)  # explained (a BCE probe may find 0 confident grids)
    assert any("stopped_early" in c.data.tags for c in children), "ASHA stopped no trial"
    # A trial that Ctrl-C stopped continued from its last checkpoint that Ray had registered. A trial
    # logs epoch k+1 only after Ray has registered the checkpoint of epoch k (the next step waits
    # for that save), so a run with m epochs in MLflow resumes at epoch m - 1 or m.
    killed = [trial_id for trial_id, status in interrupted["children"].items() if status == "KILLED"]
    interrupted_epochs = {trial_id: interrupted["epochs"][trial_id] for trial_id in killed}
    resumed_at = {c.data.tags["trial_id"]: int(c.data.tags.get("resumed_at_epoch", -1)) for c in children}
    for trial_id, epochs in interrupted_epochs.items():
        assert epochs - 1 <= resumed_at[trial_id] <= epochs, (trial_id, epochs, resumed_at)
    assert max(interrupted_epochs.values(), default=0) >= INTERRUPT_AT[0], interrupted  # the one caught mid-training
    for child in children:  # every trial that ran to the end logged its probe, config and timings
        if "stopped_early" not in child.data.tags:
            files = {f.path for f in client.list_artifacts(child.info.run_id)}
            assert {"probe.pt", "trial_config.yaml"} <= files, files
            assert "time/train_s" in child.data.metrics, child.data.metrics
    # the Optuna study beside the sweep holds every trial once, each told its outcome
    study = optuna.load_study(study_name="moo", storage=f"sqlite:///{workdir / 'ray_results' / 'moo' / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert len(states) == SAMPLES and set(states) <= {"COMPLETE", "PRUNED"}, states
    # complete: the trials that ran to the end with a value for every objective; a trial without
    # one (no confident grid to explain) is pruned, as are the trials ASHA stopped
    scored = [c for c in children if "stopped_early" not in c.data.tags and set(OBJECTIVES) <= set(c.data.metrics)]
    assert states.count("COMPLETE") == len(scored)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE] * 2


def _non_dominated(children):
    points = {
        c.info.run_id: [c.data.metrics[m] for m in OBJECTIVES]
        for c in children
        if all(m in c.data.metrics and not math.isnan(c.data.metrics[m]) for m in OBJECTIVES)
    }
    return {
        run for run, p in points.items()
        if not any(all(a >= b for a, b in zip(q, p)) and q != p for q in points.values())
    }  # fmt: skip


def test_report_pareto_front_is_the_non_dominated_set(sweep):
    workdir, client, _, _ = sweep
    expected = _non_dominated(_children(client))
    assert expected
    front = json.loads(client.download_artifacts(_parent(client).info.run_id, "pareto.json", str(workdir)) and
                       (workdir / "pareto.json").read_text())  # fmt: skip
    assert front["objectives"] == OBJECTIVES
    assert {t["run_id"] for t in front["front"]} == expected
    report = subprocess.run([PROBESWEEP, "report", "moo"], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert f"Pareto front of val/accuracy (max), gridpg/ixg/input (max): {len(expected)} trial(s)" in report.stdout
    experiment_id = client.get_experiment_by_name("moo").experiment_id
    for run_id in expected:
        assert f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}" in report.stdout
    assert (workdir / "reports" / "moo" / "pareto.png").stat().st_size > 1000
    rows = (workdir / "reports" / "moo" / "summary.csv").read_text().splitlines()
    assert len(rows) == SAMPLES + 1
    accuracy = [float(r.split(",")[5]) for r in rows[1:]]
    assert accuracy == sorted(accuracy, reverse=True)  # best first by the first objective
