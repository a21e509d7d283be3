"""Reports: the Pareto front and the order of trials on hand-computed cases; closing trial runs; the
answer on the parent run, groups, the results DataFrame, a table that fits the terminal."""

import math

import pytest
from mlflow import MlflowClient

from sweeps.report import pareto_front, sort_rows
from sweeps.tracking import TrialRun, close_trial_runs, ensure_experiment, start_sweep_run


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


def test_trial_runs_get_their_final_status_from_ray(sqlite_store):
    uri = sqlite_store
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
    # a stopped trial's own thread, stopped by Ray a moment after the driver closed its run, writes
    # KILLED over it: the sweep's last pass (after Ray is shut down) finishes it again
    client.set_terminated(run_ids["stopped"], "KILLED")
    assert close_trial_runs(uri, experiment_id, parent, {}, epochs=4) == expected
    assert client.get_run(run_ids["stopped"]).info.status == "FINISHED"


def _cli(*args, cwd):
    """``probesweep ARGS`` in ``cwd``, in this process (a new one spends seconds on its imports)."""
    import io
    import os
    from contextlib import redirect_stderr, redirect_stdout
    from types import SimpleNamespace

    from sweeps.cli import run_cli

    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = run_cli(list(args))
    finally:
        os.chdir(before)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_sweeps_are_listed_and_a_mistyped_name_gets_a_suggestion(tmp_path, sqlite_store):
    from sweeps.tracking import list_sweeps, similar_sweeps

    uri = sqlite_store
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


def test_report_sorts_by_a_chosen_column_and_names_an_unknown_one(tmp_path, sqlite_store):
    from sweeps.tracking import TrialRun

    uri = sqlite_store
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


def test_a_report_whose_stored_scores_cannot_be_read_still_shows_the_trials(tmp_path, sqlite_store):
    import gzip

    from sweeps.tracking import TrialRun

    uri = sqlite_store
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
    assert "│ aaa" in result.stdout and "no effects, replicates or agreement: the trials' stored scores could not be read" in result.stdout
    assert "gridpg.csv.gz: not a score table" in result.stdout


def test_the_parent_run_holds_the_answer_best_values_and_a_results_table(tmp_path, capfd, sqlite_store):
    import torch

    from evaluation.aggatt import aggatt_bins, save_aggatt
    from sweeps.summary import DESCRIPTION_TAG, log_sweep_summary
    from sweeps.tracking import run_url

    uri = sqlite_store
    experiment_id = ensure_experiment(uri, "answer")
    objectives = {"gridpg/ixg/input": "max", "val/accuracy": "max"}
    parent = start_sweep_run(uri, experiment_id, "answer-1", "name: answer\n", n_trials=3, objectives=objectives, shared={"backbone.name": "tiny"})
    client = MlflowClient(uri)
    runs = {}
    for trial_id, loss, accuracy, score, status in (("aaa", "ce", 0.95, 0.30, "FINISHED"), ("bbb", "bce", 0.90, 0.60, "FINISHED"),
                                                    ("ccc", "bce", 0.99, 0.90, "FAILED")):  # fmt: skip
        with TrialRun(uri, experiment_id, parent, trial_id, f"probe_trial_{trial_id}", params={"backbone.name": "tiny", "probe.loss": loss}) as run:
            run.log_params({"probe.loss": loss})
            run.log_metrics({"val/accuracy": accuracy, "gridpg/ixg/input": score, "gridpg/ixg/input/ci_low": score - 0.05,
                             "gridpg/ixg/input/ci_high": score + 0.05}, step=1)  # fmt: skip
        bins = tmp_path / trial_id / "gridpg-ixg-input.npz"  # the AggAtt bins a trial stores
        bins.parent.mkdir()
        save_aggatt(aggatt_bins(torch.rand(20, 8, 8), torch.rand(20)), bins)
        client.log_artifact(run.run_id, str(bins), "aggatt")
        client.set_terminated(run.run_id, status)
        runs[trial_id] = run.run_id
    capfd.readouterr()
    front, _ = log_sweep_summary(uri, parent, objectives)
    assert "Downloading" not in capfd.readouterr().err  # no progress bar per stored file
    # the finished probes' AggAtt side by side
    assert [a.path for a in client.list_artifacts(parent, "compare")] == ["compare/aggatt-gridpg-ixg-input.png"]
    logged = client.get_run(parent)
    # the failed trial's better values do not count
    assert {k: v for k, v in logged.data.metrics.items() if k.startswith("best/")} == {"best/gridpg/ixg/input": 0.6, "best/val/accuracy": 0.95}
    assert [r["trial"] for r in front] == ["bbb", "aaa"]
    note = logged.data.tags[DESCRIPTION_TAG]
    lines = note.splitlines()
    header = next(line for line in lines if line.startswith("| probe"))
    assert header.split(" | ")[-1] == "gridpg/ixg/input |"
    table = [line for line in lines if line.startswith("| [")]
    # best first by the objectives, each probe named by what sets it apart and linked to its run
    assert [line.split("]")[0] for line in table] == ["| [bce", "| [ce", "| [bce"]
    assert f"({run_url(uri, experiment_id, runs['bbb'])})" in table[0] and "0.600 [0.55, 0.65]" in table[0] and "FAILED" in table[2]
    assert "1 failed" in lines[0] and "**Pareto front**: [bce](" in note


def test_a_results_table_too_long_for_a_description_keeps_its_best_rows():
    from sweeps.summary import MAX_DESCRIPTION, results_markdown

    rows = [{"_run_id": str(i), "_name": f"probe{i}", "trial": str(i), "status": "FINISHED", "val/accuracy": 1 - i / 1000,
             "gridpg/ixg/input": 0.5} for i in range(400)]  # fmt: skip
    note = results_markdown(rows, {"val/accuracy": "max"}, [], {}, "sweep big")
    shown = [line for line in note.splitlines() if line.startswith("| [")]
    assert len(note) <= MAX_DESCRIPTION and 10 < len(shown) < 400
    assert shown[0].startswith("| [probe0]") and f"*{400 - len(shown)} more in `summary.csv`*" in note


def test_report_groups_by_a_column_and_the_results_are_a_whole_dataframe(tmp_path, sqlite_store):
    import csv
    import io

    from sweeps.results import results

    uri = sqlite_store
    experiment_id = ensure_experiment(uri, "grouping")
    shared = {"backbone.name": "tiny", "probe.head.type": "linear"}
    parent = start_sweep_run(uri, experiment_id, "grouping-1", "name: grouping\n", n_trials=3, shared=shared)
    client = MlflowClient(uri)
    for trial_id, loss, lr, score in (("aaa", "ce", "0.1", 0.2), ("bbb", "bce", "0.1", 0.6), ("ccc", "bce", "0.01", 0.4)):
        own = {"probe.loss": loss, "train.lr": lr}
        with TrialRun(uri, experiment_id, parent, trial_id, f"probe_trial_{trial_id}", params=shared | own) as run:
            run.log_params(shared | own)
            run.log_metrics({"val/accuracy": 0.9, "gridpg/ixg/input": score}, step=1)
    client.set_terminated(parent, "FINISHED")

    grouped = _cli("report", "grouping-1", "--group-by", "loss", "--group-by", "train.lr", cwd=tmp_path)
    assert grouped.returncode == 0, grouped.stderr
    lines = [" ".join(line.replace("│", " ").split()) for line in grouped.stdout.splitlines()]
    # per group: trials, mean val/accuracy, mean GridPG (bce: (0.6 + 0.4) / 2)
    assert "bce 2 0.900 0.500" in lines and "ce 1 0.900 0.200" in lines
    assert "0.1 2 0.900 0.400" in lines and "0.01 1 0.900 0.400" in lines
    bad = _cli("report", "grouping-1", "--group-by", "los", cwd=tmp_path)
    assert bad.returncode == 2 and "--group-by: unknown column 'los'" in bad.stderr and "did you mean 'loss'?" in bad.stderr

    frame = results("grouping-1", uri)
    assert list(frame["run_name"]) == ["ce-lr0.1", "bce-lr0.1", "bce-lr0.01"]  # in the order they started
    assert set(frame["params.backbone.name"]) == {"tiny"}  # the parent's shared params, in every row
    assert frame.groupby("params.probe.loss")["metrics.gridpg/ixg/input"].mean().to_dict() == pytest.approx({"bce": 0.5, "ce": 0.2})
    with pytest.raises(ValueError, match="no sweep named 'grouping'; did you mean 'grouping-1'"):
        results("grouping", uri)
    written = _cli("results", "grouping-1", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    table = list(csv.DictReader(io.StringIO(written.stdout)))
    assert [(r["params.probe.loss"], r["params.probe.head.type"], float(r["metrics.gridpg/ixg/input"])) for r in table] == [
        ("ce", "linear", 0.2), ("bce", "linear", 0.6), ("bce", "linear", 0.4)
    ]  # fmt: skip


def test_a_table_wider_than_the_terminal_leaves_out_whole_metric_columns_but_the_sort_ones():
    from rich.console import Console

    from sweeps.report import fitting_metrics, render_table

    scores = [f"gridpg/method{i}/layer{i}" for i in range(12)]
    rows = [{"trial": f"t{t}", "status": "FINISHED", "val/accuracy": 0.9, **{s: 0.1 * t for s in scores}} for t in range(3)]
    shown = fitting_metrics(rows, 160, keep=[scores[-1]])
    assert scores[-1] in shown and 0 < len(shown) < len(scores)
    assert shown == [s for s in sorted(scores) if s in shown]  # in the table's order
    assert Console(width=100_000).measure(render_table(rows, metrics=shown)).maximum <= 160
    assert fitting_metrics(rows, 100_000) == sorted(scores)
