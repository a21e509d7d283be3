"""MLflow tracking without Ray: the trial run is found again on retry and fails loudly."""

import pytest
from mlflow import MlflowClient

from sweeps.tracking import TrialRun, default_tracking_uri, ensure_experiment, flatten, start_sweep_run


@pytest.fixture()
def store(tmp_path):
    uri = default_tracking_uri(tmp_path)
    experiment_id = ensure_experiment(uri, "unit")
    parent = start_sweep_run(uri, experiment_id, "unit-sweep", "name: unit\n", n_trials=1)
    return uri, experiment_id, parent


def test_experiment_keeps_artifacts_beside_the_database(store, tmp_path):
    uri, experiment_id, _ = store
    experiment = MlflowClient(uri).get_experiment(experiment_id)
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "unit").as_uri()
    assert ensure_experiment(uri, "unit") == experiment_id  # found, not created twice


def test_a_retried_trial_continues_its_run(store):
    uri, experiment_id, parent = store
    with TrialRun(uri, experiment_id, parent, "t_00000", "probe_trial_t_00000") as run:
        run.log_params({"loss": "ce"})
        run.log_metrics({"val/accuracy": 0.5}, step=1)
        first = run.run_id
    with TrialRun(uri, experiment_id, parent, "t_00000", "probe_trial_t_00000") as run:
        run.log_params({"loss": "ce", "seed": "0"})  # params are write-once: only the new one is logged
        run.log_metrics({"val/accuracy": 0.75}, step=2)
        assert run.run_id == first and run.previous_status == "FINISHED"
        assert run.latest_metrics() == {"val/accuracy": 0.75}
    client = MlflowClient(uri)
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].data.params == {"loss": "ce", "seed": "0"}
    history = client.get_metric_history(first, "val/accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]


def test_a_failing_trial_is_failed_with_its_error(store):
    uri, experiment_id, parent = store
    with pytest.raises(RuntimeError):
        with TrialRun(uri, experiment_id, parent, "t_00001", "probe_trial_t_00001") as run:
            raise RuntimeError("diverged: bce loss is nan in epoch 3")
    finished = MlflowClient(uri).get_run(run.run_id)
    assert finished.info.status == "FAILED"
    assert finished.data.tags["error"] == "RuntimeError: diverged: bce loss is nan in epoch 3"


def test_flatten_nested_config():
    assert flatten({"head": {"type": "mlp", "depth": 2}, "lr": 0.01}) == {
        "head.type": "mlp", "head.depth": "2", "lr": "0.01"
    }
