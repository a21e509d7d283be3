"""MLflow tracking without Ray: the trial run is found again on retry and fails loudly."""

import pytest
from mlflow import MlflowClient

from sweeps.tracking import TrialRun, ensure_experiment, start_sweep_run
from sweeps.trial import flatten


@pytest.fixture()
def store(sqlite_store):
    uri = sqlite_store
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
    with TrialRun(uri, experiment_id, parent, "t_00001", "probe_trial_t_00001") as retried:  # Ray's retry finds it
        assert retried.previous_status == "FAILED"
        assert retried.previous_error == "RuntimeError: diverged: bce loss is nan in epoch 3"


def test_flatten_nested_config():
    assert flatten({"head": {"type": "mlp", "depth": 2}, "lr": 0.01}) == {
        "head.type": "mlp", "head.depth": "2", "lr": "0.01"
    }


def test_metrics_kept_for_later_are_written_by_flush_and_when_the_trial_is_stopped(store):
    uri, experiment_id, parent = store
    client = MlflowClient(uri)
    with pytest.raises(SystemExit):  # how Ray ends a trial that the scheduler stops
        with TrialRun(uri, experiment_id, parent, "t_00002", "probe_trial_t_00002") as run:
            for step in range(1, 4):
                run.log_metrics({"train/loss": 1.0 / step}, step=step, later=True)
            assert client.get_metric_history(run.run_id, "train/loss") == []  # not written yet
            run.flush()
            assert run.last_step("train/loss") == 3
            run.log_metrics({"train/loss": 0.2}, step=4, later=True)
            run.log_metrics({"train/loss": 0.1, "val/accuracy": 0.9}, step=5, later=True)
            raise SystemExit(1)
    history = client.get_metric_history(run.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3), (4, 0.2), (5, 0.1)]
    assert client.get_run(run.run_id).info.status == "KILLED" and run.last_step("val/accuracy") == 5


def test_a_flush_of_many_epochs_is_split_into_batches_mlflow_accepts(store):
    uri, experiment_id, parent = store
    with TrialRun(uri, experiment_id, parent, "t_00003", "probe_trial_t_00003") as run:
        for step in range(1, 1101):  # 2200 values: MLflow takes at most 1000 per batch
            run.log_metrics({"train/loss": 1.0, "val/loss": 2.0}, step=step, later=True)
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run.run_id, "val/loss")]
    assert sorted(steps) == list(range(1, 1101))


@pytest.mark.parametrize("stop", [SystemExit, KeyboardInterrupt])
def test_a_trial_stopped_after_it_logged_everything_is_finished(store, stop):
    """ASHA stops a trial at its last report (its max_t), and Ctrl-C may come after it: a trial
    that had logged all it logs is FINISHED, one stopped before that KILLED."""
    uri, experiment_id, parent = store
    statuses = []
    for trial_id, complete in (("t_00004", True), ("t_00005", False)):
        with pytest.raises(stop):
            with TrialRun(uri, experiment_id, parent, trial_id, f"probe_trial_{trial_id}") as run:
                run.log_metrics({"val/accuracy": 0.9}, step=1, later=True)
                run.complete = complete
                raise stop()
        statuses.append(MlflowClient(uri).get_run(run.run_id).info.status)
    assert statuses == ["FINISHED", "KILLED"]


def test_a_resumed_trial_loads_the_newest_kept_checkpoint_when_ray_names_a_deleted_one(tmp_path):
    """Ray's experiment snapshot lags by seconds and may name a checkpoint that Ray has since
    deleted (it keeps two): the trial then loads the newest one beside it, not nothing."""
    from sweeps.trainable import STATE_FILE, kept_state

    for index in (3, 10, 11):  # zero-padded as Ray names them: 000010 sorts after 000003
        (tmp_path / f"checkpoint_{index:06d}").mkdir()
        (tmp_path / f"checkpoint_{index:06d}" / STATE_FILE).write_bytes(b"state")
    assert kept_state(tmp_path / "checkpoint_000003") == tmp_path / "checkpoint_000003" / STATE_FILE  # Ray's own
    assert kept_state(tmp_path / "checkpoint_000009") == tmp_path / "checkpoint_000011" / STATE_FILE  # deleted
    assert kept_state(tmp_path / "empty" / "checkpoint_000001") is None


def _unwritable_experiment(uri: str) -> str:
    """An experiment whose artifacts would go under a regular file: every upload fails, even as root."""
    return MlflowClient(uri).create_experiment("unwritable", artifact_location="file:///dev/null/artifacts")


def test_an_artifact_that_cannot_be_saved_is_a_warning_and_the_scores_are_logged(store):
    import matplotlib.pyplot as plt

    uri, _, parent = store
    experiment_id = _unwritable_experiment(uri)
    with TrialRun(uri, experiment_id, parent, "t_00009", "probe_trial_t_00009") as run:
        run.log_metrics({"gridpg/ixg/input": 0.42}, step=3, later=True)
        figure = plt.figure()
        assert run.log_figure(figure, "aggatt/x.png") is False and run.log_text("a", "trial_config.yaml") is False
        run.complete = True
        run.flush()
    finished = MlflowClient(uri).get_run(run.run_id)
    assert finished.info.status == "FINISHED" and finished.data.metrics == {"gridpg/ixg/input": 0.42}
    assert finished.data.tags["warning.artifacts"].startswith("aggatt/x.png not saved: ")
    assert figure.number not in plt.get_fignums()  # the figure was freed all the same


def test_a_sweep_run_whose_start_fails_is_not_left_running(store):
    from sweeps.tracking import start_sweep_run

    uri, _, _ = store
    experiment_id = _unwritable_experiment(uri)
    with pytest.raises(Exception):  # noqa: B017 (the artifact store's own error)
        start_sweep_run(uri, experiment_id, "s", "name: s\n", 1)
    (run,) = MlflowClient(uri).search_runs([experiment_id])
    assert run.info.status == "FAILED"


def test_a_trial_run_is_named_by_what_sets_it_apart_and_logs_only_its_own_params(sqlite_store):
    from sweeps.report import trial_rows

    uri = sqlite_store
    experiment_id = ensure_experiment(uri, "names")
    shared = {"backbone.name": "tiny_resnet_sup", "probe.head.type": "bcos", "probe.head.depth": "2", "train.lr": "0.001"}
    parent = start_sweep_run(uri, experiment_id, "names-1", "name: names\n", n_trials=2, shared=shared)
    own = {"probe.loss": "bce", "probe.head.width": "256", "probe.seed": "1", "train.weight_decay": "0.00012345"}
    with TrialRun(uri, experiment_id, parent, "t_00000", "probe_trial_t_00000", params=shared | own) as run:
        run.log_params(shared | own)
    with TrialRun(uri, experiment_id, parent, "t_00001", "probe_trial_t_00001", params=shared) as alike:
        alike.log_params(shared)
    client = MlflowClient(uri)
    named = client.get_run(run.run_id)
    # the loss, then the head's label (its width varies), then the other varied params by their last name part
    assert named.info.run_name == "bce-bcos-d2-w256-seed1-weight_decay0.000123"
    assert named.data.params == own  # the shared ones are the parent's
    assert client.get_run(parent).data.params.items() >= shared.items()
    assert client.get_run(alike.run_id).info.run_name == "probe_trial_t_00001"  # nothing sets it apart: Ray's name
    rows = {r["trial"]: r for r in trial_rows(uri, parent)}  # the report puts them together again
    assert (rows["t_00000"]["backbone"], rows["t_00000"]["loss"], rows["t_00000"]["head"]) == ("tiny_resnet_sup", "bce", "bcos-d2-w256")
    assert rows["t_00001"]["head"] == "bcos-d2"


def test_a_figure_with_a_key_is_also_an_image_the_chart_view_shows_across_runs(store):
    import matplotlib.pyplot as plt

    uri, experiment_id, parent = store
    with TrialRun(uri, experiment_id, parent, "t_00010", "probe_trial_t_00010") as run:
        figure, axes = plt.subplots(figsize=(2, 1), dpi=50)
        assert run.log_figure(figure, "aggatt/gridpg-ixg-input.png", key="aggatt/gridpg/ixg/input") is True
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(run.run_id, "aggatt")] == ["aggatt/gridpg-ixg-input.png"]
    images = [a.path for a in client.list_artifacts(run.run_id, "images")]
    # MLflow's keyed image files: the key ("/" as "~"), its step, a full image and a thumbnail
    assert len(images) == 2 and all(p.startswith("images/aggatt~gridpg~ixg~input+step+0+") for p in images), images
    assert {p.rsplit(".", 1)[1] for p in images} == {"png", "webp"}
    assert figure.number not in plt.get_fignums()
