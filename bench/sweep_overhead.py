"""Sweep service vs plain loop: what Ray Tune, MLflow and checkpoints cost a sweep.

The same trials run in one run of this script, one at a time with 2 threads each, on warm caches:
- the baseline, a researcher's plain loop: a Python script of its own (``--plain-loop``) that
  calls the trial's functions one trial after another with nothing around them and keeps what a
  trial produces as files (its figures as PNG files, saved as MLflow's ``log_figure`` saves them;
  its probe and config); its wall time from start to exit, as a user waits for it. It runs before
  and after the service, averaged.
- ``probesweep run`` (a local Ray instance, an MLflow store, checkpoints, progress lines, the
  summary); its wall time from start to exit.
The service's time is split into where it went, from the ``time/*`` metrics that every trial
logs and the runs' own start and end times. The ratio against a plain loop that draws its figures
but saves nothing (the baseline until 2026-11-23 evening) is printed too.

    .venv/bin/python bench/sweep_overhead.py [--trials 4] [--seconds 30 | --epochs N]   # about 9 minutes

A trial's epochs are calibrated first so that it lasts ``--seconds`` in the plain loop here.

Last line: ``sweep service vs plain loop: <plain time / service time>x`` (0.9x or more: under
10% overhead).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def bench_spec(trials: int, epochs: int) -> dict:
    """``trials`` trials of one backbone and head, over seeds; 2 CPUs each, so one at a time."""
    return {
        "name": "overhead",
        "backbones": ["tiny_resnet_sup"],
        "probe": {"loss": ["bce"], "head": [{"type": "bcos", "depth": 2, "width": 256}]},
        "train": {"epochs": epochs, "batch_size": 256, "lr": 3.0e-2, "seed": list(range(trials))},
        "evaluate": {"methods": ["ixg", "gradcam"], "layers": ["input", "final"], "n_grids": 16, "confidence": 0.8},
        "resources": {"cpu": 2},
        "tracking": {"experiment": "overhead"},
    }


def plain_loop(spec) -> tuple[float, float]:
    """Every trial of ``spec``, trained, explained and saved in this process by ``run_trial`` with a
    folder as its tracker: (the seconds it took, of which writing files)."""
    from sweeps.folder_tracker import FolderTracker
    from sweeps.trial import run_trial

    torch.set_num_threads(int(spec.resources.cpu))
    saving = 0.0
    with tempfile.TemporaryDirectory(prefix="plain-loop-") as folder:
        start = time.perf_counter()
        for index, trial in enumerate(spec.trials()):
            files = FolderTracker(Path(folder) / f"trial_{index}")
            run_trial(trial, files)
            saving += files.seconds
        return time.perf_counter() - start, saving


def service(spec_data: dict, workdir: Path) -> tuple[float, list]:
    """``probesweep run`` in a fresh process: its wall time and the sweep's child runs."""
    from mlflow import MlflowClient

    (workdir / "overhead.yaml").write_text(yaml.safe_dump(spec_data, sort_keys=False))
    start = time.perf_counter()
    result = subprocess.run(
        [str(Path(sys.executable).with_name("probesweep")), "run", "overhead.yaml", "--name", "overhead"],
        cwd=workdir, capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"probesweep run failed:\n{result.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("overhead")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    return seconds, runs


def ray_start_stop() -> float:
    """One ``ray.init`` + ``ray.shutdown`` of a local instance, as the driver does them."""
    import ray

    start = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.shutdown()
    return time.perf_counter() - start


def calibrated_epochs(seconds: float) -> int:
    """The epochs that make one trial last about ``seconds`` in the plain loop on this machine now
    (its speed drifts by a third over a day): from trials of 2 and 12 epochs, after an uncounted
    one that does this process's imports."""
    from sweeps.spec import parse_spec

    plain_loop(parse_spec(bench_spec(1, 1)))
    short, _ = plain_loop(parse_spec(bench_spec(1, 2)))
    long, _ = plain_loop(parse_spec(bench_spec(1, 12)))
    per_epoch = (long - short) / 10
    return max(2, round(2 + (seconds - short) / per_epoch))


def plain_script(trials: int, epochs: int) -> tuple[float, float, float]:
    """The plain loop as a script of its own: (wall seconds of the process, seconds of its loop, of
    which writing files)."""
    from sweeps.runner import TRIAL_ENV  # the trials' allocator settings, as the service gives them

    command = [sys.executable, __file__, "--plain-loop", "--trials", str(trials), "--epochs", str(epochs)]
    start = time.perf_counter()
    result = subprocess.run(command, env={**os.environ, **TRIAL_ENV}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"the plain loop failed:\n{result.stderr[-3000:]}")
    loop, saving = (float(word) for word in result.stdout.split()[-2:])
    return wall, loop, saving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long a trial lasts in the plain loop")
    parser.add_argument("--epochs", type=int, help="per trial; default: as many as last --seconds here")
    parser.add_argument("--plain-loop", action="store_true", help="only run the plain loop and print its seconds")
    args = parser.parse_args()

    from sweeps.spec import parse_spec

    if args.epochs is None:
        args.epochs = calibrated_epochs(args.seconds)
    spec_data = bench_spec(args.trials, args.epochs)
    spec = parse_spec(spec_data)
    if args.plain_loop:
        seconds, saving = plain_loop(spec)
        loaded = [m for m in ("ray", "mlflow") if m in sys.modules]
        assert not loaded, f"a plain loop needs neither Ray nor MLflow, but it imported {loaded}"
        print(f"plain loop, of which saving files: {seconds:.3f} {saving:.3f}")
        return

    from sweeps.extraction import extract_features_here

    extract_features_here(spec, log=lambda line: None)  # both sides read warm caches

    # the plain loop before and after the service, averaged: this shared machine drifts by 10-20%
    # over minutes, and a drift would otherwise count as overhead (or hide it)
    before, before_loop, before_saving = plain_script(args.trials, args.epochs)
    with tempfile.TemporaryDirectory(prefix="overhead-") as folder:
        total, runs = service(spec_data, Path(folder))
    after, after_loop, after_saving = plain_script(args.trials, args.epochs)
    plain, saving = (before + after) / 2, (before_saving + after_saving) / 2
    startup = plain - (before_loop + after_loop) / 2
    ray_alone = ray_start_stop()

    def summed(metric: str) -> float:
        return sum(r.data.metrics.get(metric, 0.0) for r in runs)

    in_trials = sum((r.info.end_time - r.info.start_time) / 1000 for r in runs)
    parts = [
        ("plain loop script, start to exit (baseline, mean of two)", plain),
        ("  the script before the service", before),
        ("  the script after the service", after),
        ("  of which start-up: interpreter, imports, set-up", startup),
        ("  of which saving figures, probes and configs as files", saving),
        ("sweep service, start to exit", total),
        ("  trials: training", summed("time/train_s")),
        ("  trials: explaining and scoring", summed("time/evaluate_s")),
        ("  trials: MLflow logging (metrics, figures, probe)", summed("time/tracking_s")),
        ("  trials: checkpoints and tune.report", summed("time/checkpoint_s")),
        ("  trials: set-up (backbone, cached features, head)", in_trials - sum(
            summed(f"time/{k}_s") for k in ("train", "evaluate", "tracking", "checkpoint"))),
        ("  outside trials: start-up, Ray, scheduling, summary", total - in_trials),
        ("  of which one local Ray start + stop (measured alone)", ray_alone),
    ]  # fmt: skip
    print(f"{args.trials} trials of {args.epochs} epochs, one at a time, 2 threads each ({os.cpu_count()} cores here)")
    print(f"| {'part':<58} | {'seconds':>8} | {'vs plain loop':>13} |")
    print(f"|{'-' * 60}|{'-' * 10}|{'-' * 15}|")
    for name, seconds in parts:
        print(f"| {name:<58} | {seconds:8.1f} | {seconds / plain:12.3f}x |")
    print(f"per trial: plain {plain / args.trials:.1f} s, service {total / args.trials:.1f} s")
    print(f"against a plain loop that saves no files (the earlier baseline): {(plain - saving) / total:.2f}x")
    # drift-free: the trials' own training and explaining in the service, plus the plain script's
    # start-up and file writing, is what the plain loop would have taken at the machine's speed meanwhile
    work = summed("time/train_s") + summed("time/evaluate_s") + startup + saving
    print(f"counted within the service's run: extras {total - work:.1f} s, (work + script start-up + saving) / service {work / total:.2f}x")
    print(f"sweep service vs plain loop: {plain / total:.2f}x")


if __name__ == "__main__":
    main()
