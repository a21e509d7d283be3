"""Reports: the Pareto front and the order of trials on hand-computed cases; closing trial runs."""

import math

from mlflow import MlflowClient

from sweeps.report import pareto_front, sort_rows
from sweeps.tracking import TrialRun, close_trial_runs, default_tracking_uri, ensure_experiment, start_sweep_run


def test_pareto_front_of_two_maximised_objectives():
    points = [(1.0, 1.0), (2.0, 0.0), (0.0, 2.0), (1.0, 0.5), (None, 3.0), (math.nan, 9.0), (2.0, 0.0)]
    # (1, 0.5) is beaten by (1, 1); the missing and NaN points take no part; equal points both stay
    assert pareto_front(points, ["max", "max"]) == [0, 1, 2, 6]


def test_pareto_front_follows_each_direction():
    points = [(1.0, 1.0), (2.0, 0.0), (0.5, 3.0), (0.4, 0.1)]
    # minimise the first, maximise the second: (0.5, 3) beats (1, 1) and (2, 0); (0.4, 0.1) is lowest in x
    assert pareto_front(points, ["min", "max"]) == [2, 3]
    assert pareto_front(points, ["max", "min"]) == [1]
    assert pareto_front([(0.3,), (0.7,), (0.7,)], ["max"]) == [1, 2]


def test_rows_sort_by_objectives_in_order_missing_last():
    rows = [{"t": 0, "a": 0.5, "b": 2.0}, {"t": 1, "a": 0.9, "b": 5.0}, {"t": 2, "a": None, "b": 0.0},
            {"t": 3, "a": 0.9, "b": 1.0}, {"t": 4, "a": math.nan, "b": 1.0}]  # fmt: skip
    ordered = [r["t"] for r in sort_rows(rows, {"a": "max", "b": "min"})]
    assert ordered[:3] == [3, 1, 0] and set(ordered[3:]) == {2, 4}


def test_trial_runs_get_their_final_status_from_ray(tmp_path):
    uri = default_tracking_uri(tmp_path)
    experiment_id = ensure_experiment(uri, "closing")
    parent = start_sweep_run(uri, experiment_id, "closing-1", "name: closing\n", n_trials=5)
    client = MlflowClient(uri)
    run_ids = {}
    for trial_id in ("stopped", "done", "broken", "interrupted", "killed"):
        run = TrialRun(uri, experiment_id, parent, trial_id, f"probe_trial_{trial_id}").__enter__()
        run_ids[trial_id] = run.run_id
    client.set_terminated(run_ids["killed"], "KILLED")  # a trial whose thread Ray ended first
    ended = {"stopped": ("TERMINATED", 2), "done": ("TERMINATED", 4), "broken": ("ERROR", 1), "killed": ("TERMINATED", 3)}
    expected = {
        "stopped": "FINISHED", "done": "FINISHED", "broken": "FAILED", "interrupted": "KILLED", "killed": "FINISHED"
    }  # fmt: skip
    assert close_trial_runs(uri, experiment_id, parent, ended, epochs=4) == expected
    final = {t: client.get_run(r) for t, r in run_ids.items()}
    assert {t: r.info.status for t, r in final.items()} == expected
    assert {t for t, r in final.items() if "stopped_early" in r.data.tags} == {"stopped", "killed"}
    assert final["stopped"].data.tags["stopped_early"] == "2"
    assert close_trial_runs(uri, experiment_id, parent, {}, epochs=4) == expected  # closed runs stay as they are


def _cli(*args, cwd):
    import subprocess
    import sys
    from pathlib import Path

    probesweep = str(Path(sys.executable).with_name("probesweep"))
    return subprocess.run([probesweep, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_sweeps_are_listed_and_a_mistyped_name_gets_a_suggestion(tmp_path):
    from sweeps.tracking import list_sweeps, similar_sweeps

    uri = default_tracking_uri(tmp_path)
    experiment_id = ensure_experiment(uri, "listing")
    first = start_sweep_run(uri, experiment_id, "mini-20261201-1200", "name: mini\n", n_trials=4)
    MlflowClient(uri).set_terminated(first, "FINISHED")
    start_sweep_run(uri, experiment_id, "demo-20261201-1300", "name: demo\n", n_trials=12)
    listed = list_sweeps(uri)
    assert [(s["sweep"], s["status"], s["trials"], s["experiment"]) for s in listed] == [
        ("demo-20261201-1300", "RUNNING", "12", "listing"), ("mini-20261201-1200", "FINISHED", "4", "listing")
    ]  # fmt: skip
    assert listed[0]["ended"] == "-" and listed[1]["ended"] != "-"
    assert similar_sweeps(uri, "mini") == ["mini-20261201-1200"] and similar_sweeps(uri, "demo-20261201-1330") == ["demo-20261201-1300"]
    shown = _cli("ls", cwd=tmp_path)
    assert shown.returncode == 0 and "mini-20261201-1200" in shown.stdout and "FINISHED" in shown.stdout
    missing = _cli("report", "mini", cwd=tmp_path)
    assert missing.returncode == 2 and "no sweep named 'mini'" in missing.stderr and "did you mean 'mini-20261201-1200'?" in missing.stderr
    nowhere = _cli("ls", cwd=tmp_path / "..")
    assert nowhere.returncode == 2 and "no sweeps: there is no MLflow store here" in nowhere.stderr


def test_report_sorts_by_a_chosen_column_and_names_an_unknown_one(tmp_path):
    from sweeps.tracking import TrialRun

    uri = default_tracking_uri(tmp_path)
    experiment_id = ensure_experiment(uri, "sorting")
    parent = start_sweep_run(uri, experiment_id, "sorting-1", "name: sorting\n", n_trials=3)
    client = MlflowClient(uri)
    for trial_id, accuracy, score in (("aaa", 0.9, 0.2), ("bbb", 0.8, 0.6), ("ccc", 0.7, 0.4)):
        run = TrialRun(uri, experiment_id, parent, trial_id, f"probe_trial_{trial_id}").__enter__()
        client.log_metric(run.run_id, "val/accuracy", accuracy)
        client.log_metric(run.run_id, "gridpg/ixg/input", score)
        client.set_terminated(run.run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")

    def order(*args):
        result = _cli("report", "sorting-1", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return [t for line in result.stdout.splitlines() for t in ("aaa", "bbb", "ccc") if line.startswith(f"│ {t}")]

    assert order() == ["aaa", "bbb", "ccc"]  # the objectives: val/accuracy
    assert order("--sort", "gridpg/ixg/input") == ["bbb", "ccc", "aaa"]
    assert order("--sort", "gridpg/ixg/input:min") == ["aaa", "ccc", "bbb"]
    bad = _cli("report", "sorting-1", "--sort", "gridpg/ixg/inptu", cwd=tmp_path)
    assert bad.returncode == 2 and "--sort: unknown column 'gridpg/ixg/inptu'" in bad.stderr and "did you mean 'gridpg/ixg/input'?" in bad.stderr


def test_a_report_whose_stored_scores_cannot_be_read_still_shows_the_trials(tmp_path):
    import gzip

    from sweeps.tracking import TrialRun

    uri = default_tracking_uri(tmp_path)
    experiment_id = ensure_experiment(uri, "unreadable")
    parent = start_sweep_run(uri, experiment_id, "unreadable-1", "name: unreadable\n", n_trials=1)
    client = MlflowClient(uri)
    run = TrialRun(uri, experiment_id, parent, "aaa", "probe_trial_aaa").__enter__()
    client.log_metric(run.run_id, "val/accuracy", 0.9)
    table = tmp_path / "gridpg.csv.gz"
    table.write_bytes(gzip.compress(b"not,a,score,table\n"))
    client.log_artifact(run.run_id, str(table), "scores")
    client.set_terminated(run.run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    result = _cli("report", "unreadable-1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "│ aaa" in result.stdout and "no effects or replicates: the trials' stored scores could not be read" in result.stdout
    assert "gridpg.csv.gz: not a score table" in result.stdout
