"""End to end: `probesweep run` on a real local Ray instance and a real MLflow store, read back.

The sweep runs as a user runs it (the console script in a fresh process); MLflow is then read
with its client. Nothing may be left running afterwards.
"""

import csv
import gzip
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from conftest import command_line, session_processes
from sweeps.tracking import SWEEP_TAG

pytestmark = pytest.mark.slow
PROBESWEEP = str(Path(sys.executable).with_name("probesweep"))
EPOCHS = 4
SPEC = {
    "name": "e2e",
    "data": {"dataset": "digits"},
    "backbones": ["tiny_resnet_sup"],
    "probe": {"loss": ["ce", "bce"], "head": [{"type": "linear"}]},
    # checkpoint_every_s 0: every epoch is reported (and shown with its ETA)
    "train": {"epochs": EPOCHS, "batch_size": 256, "lr": 1.0e-2, "seed": [0, 1], "checkpoint_every_s": 0},
    "evaluate": {
        "methods": ["ixg", "gradcam"],
        "layers": ["input", "final"],
        "metrics": ["gridpg", "difull", "compactness", "complexity", "deletion", "insertion"],
        "n_grids": 8,
        "confidence": 0.8,
        # raw maps: DiFull's "a gradient method scores 1" holds before smoothing (the reference's
        # 129 px Gaussian spreads a map over all cells of these 64 px grids)
        "smoothing": "none",
    },
    "tracking": {"experiment": "e2e"},
}
SCORED = ("gridpg/", "difull/", "compactness/", "complexity/", "deletion/", "insertion/")
FINAL_METRICS = {
    "val/accuracy", "grids/count", "gridpg/ixg/input", "gridpg/ixg/final", "gridpg/gradcam/final", "difull/ixg/input"
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, session_root):
    workdir = tmp_path_factory.mktemp("e2e")
    (workdir / "e2e.yaml").write_text(yaml.safe_dump(SPEC))
    # the address of a cluster that `ray start` left behind and that is gone: the sweep must start
    # its own Ray instead of trying to join it
    from ray._common.utils import get_ray_address_file

    stale = Path(get_ray_address_file(None))
    assert stale.is_relative_to(os.environ["RAY_TMPDIR"])  # this session's, not the machine's
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("127.0.0.1:9")
    result = subprocess.run(
        [PROBESWEEP, "run", "e2e.yaml", "--name", "e2e-sweep"], cwd=workdir, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir, result


def test_sweep_prints_results_and_the_ui_command(sweep):
    workdir, result = sweep
    assert result.stderr.count("[") >= 4 and "[4/4]" in result.stderr  # one progress line per trial
    last = next(line for line in result.stderr.splitlines() if line.startswith("[4/4]"))
    assert "| running 0, failed 0, best val acc 0." in last  # the sweep's state after the last trial
    # before the first trial ends: its start, and its epochs with the trial's ETA (the sweep's needs
    # every running trial's pace, "?" until then)
    lines = result.stderr.splitlines()
    before = lines[: next(i for i, line in enumerate(lines) if line.startswith("[1/"))]
    assert any(re.fullmatch(r"\[0/4\] \w+ tiny_resnet_sup (ce|bce) linear starts \(\d running\)", line) for line in before), before
    assert any(re.search(r": epoch [123]/4, \d+ s, ETA \d+ s \| sweep ETA (\d+ s|\?)$", line) for line in before), before
    assert "gridpg/ixg/input" in result.stdout and result.stdout.count("FINISHED") == 4
    # two seeds of each loss: the replicates' table and the loss effect (per method and layer)
    assert "seed replicates" in result.stdout and "paired effects" in result.stdout
    assert "loss bce - ce" in result.stdout and "effects have a Holm-adjusted p below 0.05" in result.stdout
    ui_line = f"ui --backend-store-uri sqlite:///{workdir / 'mlflow.db'} --host 127.0.0.1 --port 5000 --workers 1"
    assert ui_line in result.stdout
    assert "snapshotting" not in result.stderr  # Ray's own chatter goes to the sweep's log file
    assert (workdir / "ray_results" / "e2e-sweep" / "driver.log").is_file()


def test_rays_auth_token_is_readable_by_its_owner_only(sweep):
    token = Path(os.environ["HOME"]) / ".ray" / "auth_token"  # Ray 2.60 writes it 0644
    assert token.is_file() and token.stat().st_mode & 0o777 == 0o600


def test_mlflow_holds_one_parent_and_four_finished_children(sweep):
    workdir, _ = sweep
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags[SWEEP_TAG] == "e2e-sweep"
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert len({c.data.tags["trial_id"] for c in children}) == 4
    assert sorted((c.data.params["probe.loss"], c.data.params["probe.seed"]) for c in children) == [("bce", "0"), ("bce", "1"), ("ce", "0"), ("ce", "1")]
    # named by what sets them apart; what they have alike is on the parent only
    assert sorted(c.info.run_name for c in children) == ["bce-seed0", "bce-seed1", "ce-seed0", "ce-seed1"]
    assert parents[0].data.params["probe.head.type"] == "linear" and parents[0].data.params["backbone.name"] == "tiny_resnet_sup"
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"summary.csv", "pareto.png", "effects.csv", "effects.png", "agreement.csv", "agreement-gridpg.png", "compare"} <= parent_artifacts
    compared = {a.path for a in client.list_artifacts(parents[0].info.run_id, "compare")}
    # per metric, method and layer: the probes' AggAtt and their explanations of the same grids
    assert "compare/aggatt-gridpg-ixg-input.png" in compared and "compare/examples-gridpg-ixg-input.png" in compared
    assert len(compared) == 12
    for child in children:
        assert child.info.status == "FINISHED"
        assert "probe.head.type" not in child.data.params and "backbone.name" not in child.data.params
        assert child.data.tags["node_ip"] and child.data.tags["hostname"]
        metrics = child.data.metrics
        assert FINAL_METRICS <= metrics.keys(), sorted(metrics)
        assert all(math.isfinite(v) for v in metrics.values())
        # the 8 candidate grids are shared; each probe scores those it is confident on
        assert metrics["val/accuracy"] > 0.8 and 1 <= metrics["grids/count"] <= metrics["grids/candidates"] == 8
        assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k.startswith(("gridpg/", "difull/")))
        scores = [k for k in metrics if k.startswith(SCORED) and k.count("/") == 2]
        # the interval is about the score (up to the float sums of the resampled means)
        assert len(scores) == 18 and all(metrics[f"{k}/ci_low"] - 1e-6 <= metrics[k] <= metrics[f"{k}/ci_high"] + 1e-6 for k in scores)
        stored = {a.path for a in client.list_artifacts(child.info.run_id, "scores")}
        assert stored == {f"scores/{metric[:-1]}.csv.gz" for metric in SCORED}
        assert 0 < metrics["compactness/ixg/input"] < 1
        assert all(0 <= metrics[f"{m}/{pair}"] <= 1 for m in ("deletion", "insertion") for pair in ("ixg/input", "gradcam/final"))
        assert metrics["difull/ixg/input"] > 0.999  # no other cell can reach the logit: a gradient method scores 1
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "aggatt")}
        keys = ("gridpg-ixg-input", "gridpg-ixg-final", "gridpg-gradcam-final", "difull-ixg-input", "difull-ixg-final", "difull-gradcam-final")
        assert artifacts == {f"aggatt/{key}.{kind}" for key in keys for kind in ("png", "npz")}  # the figure and its bins
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.step for m in history] == list(range(1, EPOCHS + 1))  # one value per epoch


@pytest.fixture(scope="module")
def report(sweep) -> subprocess.CompletedProcess:
    """`probesweep report` of the sweep, once for the tests that read it (seconds of CLI each)."""
    workdir, _ = sweep
    return subprocess.run([PROBESWEEP, "report", "e2e-sweep"], cwd=workdir, capture_output=True, text=True, timeout=120)


def test_report_reads_the_sweep_back(sweep, report):
    workdir, _ = sweep
    assert report.returncode == 0, report.stderr
    assert "sweep e2e-sweep (FINISHED)" in report.stdout
    assert sum(line.startswith("│") and "FINISHED" in line for line in report.stdout.splitlines()) == 4
    agreement = {f"agreement-{metric[:-1]}.png" for metric in SCORED}  # three (method, layer) columns each
    assert {p.name for p in (workdir / "reports" / "e2e-sweep").iterdir()} == {"summary.csv", "pareto.png", "effects.csv", "effects.png", "agreement.csv"} | agreement
    assert "gridpg: agreement" in report.stdout
    missing = subprocess.run([PROBESWEEP, "report", "nope"], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no sweep named 'nope'" in missing.stderr


def test_the_reports_loss_effect_is_the_paired_difference_of_the_stored_rows(sweep, report, tmp_path):
    workdir, _ = sweep
    assert report.returncode == 0, report.stderr
    reported = {
        row["score"]: row for row in csv.DictReader((workdir / "reports" / "e2e-sweep" / "effects.csv").open())
        if row["factor"] == "loss"
    }  # fmt: skip
    assert set(reported) == {
        f"{metric}{pair}" for metric in SCORED for pair in ("ixg/input", "ixg/final", "gradcam/final")
    }
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    tables = {}
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    for run in (r for r in runs if "mlflow.parentRunId" in r.data.tags):
        path = client.download_artifacts(run.info.run_id, "scores/gridpg.csv.gz", str(tmp_path / run.info.run_id))
        with gzip.open(path, "rt") as stream:  # by hand: grid means of the ixg / input rows
            stored = list(csv.DictReader(stream))
        for pair in (("ixg", "input"), ("gradcam", "final")):
            rows = [r for r in stored if (r["method"], r["layer"]) == pair]
            grids = {int(r["grid"]) for r in rows}
            tables[run.data.params["probe.loss"], run.data.params["probe.seed"], pair] = {
                g: sum(float(r["score"]) for r in rows if int(r["grid"]) == g) / sum(int(r["grid"]) == g for r in rows) for g in grids
            }
    per_grid: dict[int, list[float]] = {}
    for seed in ("0", "1"):
        ce, bce = tables["ce", seed, ("ixg", "input")], tables["bce", seed, ("ixg", "input")]
        for g in ce.keys() & bce.keys():
            per_grid.setdefault(g, []).append(bce[g] - ce[g])
    by_hand = sum(sum(d) / len(d) for d in per_grid.values()) / len(per_grid)
    effect = reported["gridpg/ixg/input"]
    assert float(effect["mean"]) == pytest.approx(by_hand, abs=1e-5) and int(effect["units"]) == len(per_grid)
    assert float(effect["ci_low"]) <= float(effect["mean"]) <= float(effect["ci_high"]) and effect["pairs"] == "2"
    # the agreement of IxG at the input and Grad-CAM at the final layer: Spearman per probe, then the mean
    from scipy.stats import spearmanr

    rhos = []
    for loss, seed in {(loss, seed) for loss, seed, _ in tables}:
        ixg, gradcam = tables[loss, seed, ("ixg", "input")], tables[loss, seed, ("gradcam", "final")]
        shared = sorted(ixg.keys() & gradcam.keys())
        rhos.append(spearmanr([ixg[g] for g in shared], [gradcam[g] for g in shared]).statistic)
    agreement = {
        (row["a"], row["b"]): row for row in csv.DictReader((workdir / "reports" / "e2e-sweep" / "agreement.csv").open())
        if row["metric"] == "gridpg"
    }  # fmt: skip
    row = agreement["ixg/input", "gradcam/final"]
    assert float(row["spearman"]) == pytest.approx(np.nanmean(rhos), abs=1e-5) and int(row["probes"]) == sum(not np.isnan(r) for r in rhos)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_command_serves_the_sweep_over_http(sweep):
    import json
    import signal
    import urllib.request

    import psutil

    workdir, _ = sweep
    port = _free_port()
    with open(workdir / "ui.log", "w") as said:
        server = subprocess.Popen(
            [PROBESWEEP, "ui", "--port", str(port)], cwd=workdir, stdout=subprocess.DEVNULL, stderr=said,
            start_new_session=True,  # its own process group: stopped below with everything it started
        )
    try:
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name=e2e", timeout=5) as reply:
                    experiment = json.load(reply)["experiment"]
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not start"
                time.sleep(0.5)
        request = urllib.request.Request(
            f"{base}/runs/search",
            data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            runs = json.load(reply)["runs"]
        assert len(runs) == 5  # the sweep and its four trials
        assert sum(any(m["key"] == "gridpg/ixg/input" for m in r["data"].get("metrics", [])) for r in runs) == 4
        newest = f"the newest sweep, e2e-sweep: http://127.0.0.1:{port}/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning"
        assert newest in (workdir / "ui.log").read_text()
        # without MLflow's job runner (GenAI features): the server and its one worker only
        started = [command_line(p) for p in psutil.Process(server.pid).children(recursive=True)]
        assert len(started) <= 2 and not [c for c in started if "mlflow.server.jobs" in c], started
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_nothing_is_left_running(sweep):  # last in this file: after the UI test too
    deadline = time.monotonic() + 30  # Ray and the UI are signalled; give them a moment to exit
    while session_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [p.info["name"] for p in session_processes()] == []
