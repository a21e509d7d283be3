"""A trial that fails inside Ray: FAILED in MLflow with its error, the sweep FAILED, exit code 1."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from sweeps.trainable import NOT_TRAINED_AGAIN

pytestmark = pytest.mark.slow
PROBESWEEP = str(Path(sys.executable).with_name("probesweep"))
SPEC = {
    "name": "fails",
    "backbones": ["tiny_resnet_sup"],
    # a logit bias beyond float32's range makes every logit inf: the loss is NaN at the first step
    "probe": {"loss": "ce", "head": {"type": "linear"}, "logit_bias": 1.0e39},
    "train": {"epochs": 2},
    "evaluate": {"methods": ["ixg"], "layers": ["input"], "n_grids": 2},
    "tracking": {"experiment": "fails"},
}


def test_a_diverged_trial_is_recorded_as_failed(tmp_path):
    (tmp_path / "fails.yaml").write_text(yaml.safe_dump(SPEC))
    result = subprocess.run(
        [PROBESWEEP, "run", "fails.yaml", "--name", "fails-1"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: see" in result.stderr and "1 of 1 trials failed" in result.stderr
    assert "error.txt | running 0, failed 1" in result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fails").experiment_id])
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert child.info.status == "FAILED" and parent.info.status == "FAILED"
    assert child.data.tags["error"].startswith("DivergedError: diverged: ce loss is nan in epoch 1")
    # Ray retried it (resources.max_failures 1 by default): the retry failed at once, untrained
    error = child.data.tags["error"]
    assert error.endswith(NOT_TRAINED_AGAIN) and error.count(NOT_TRAINED_AGAIN) == 1
    assert "FAILED" in result.stdout  # the results table shows the failed trial too
