"""Sweep service vs plain loop: what Ray Tune, MLflow and checkpoints cost a sweep.

The same trials run in one run of this script, one at a time with 2 threads each, on warm caches:
- the baseline, a researcher's plain loop: a Python script of its own (``--plain-loop``) that
  calls the trial's functions one trial after another with nothing around them; its wall time
  from start to exit, as a user waits for it. It runs before and after the service, averaged.
- ``probesweep run`` (a local Ray instance, an MLflow store, checkpoints, progress lines, the
  summary); its wall time from start to exit.
- for reference, the plain loop inside this warm process (no interpreter start, imports already
  done): the baseline of the runs before 2026-11-23.
The service's time is split into where it went, from the ``time/*`` metrics that every trial
logs and the runs' own start and end times.

    .venv/bin/python bench/sweep_overhead.py [--trials 4] [--epochs 60]      # about 8 minutes

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


class NoTracking:
    """Stands in for the trial's MLflow run in the plain loop: figures are drawn, then dropped."""

    seconds = 0.0

    def log_figure(self, figure, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        plt.close(figure)


def plain_loop(spec) -> float:
    """Every trial of ``spec``, trained and explained in this process: the seconds it took."""
    from probing.model import ProbedModel
    from sweeps.runner import trial_param_space
    from sweeps.trainable import _evaluate, _trial_inputs

    torch.set_num_threads(int(spec.resources.cpu))
    shared = trial_param_space(spec, runtime={})
    start = time.perf_counter()
    for trial in spec.trials():
        config = {**shared, **trial, "train": {**shared["train"], **trial["train"]}}
        backbone, val, loss, trainer = _trial_inputs(config)
        while trainer.epoch < spec.train.epochs:
            trainer.run_epoch()
        _evaluate(ProbedModel(backbone, trainer.head.eval()), val, loss, config["evaluate"], NoTracking())
    return time.perf_counter() - start


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


def plain_script(trials: int, epochs: int) -> tuple[float, float]:
    """The plain loop as a script of its own: (wall seconds of the process, seconds of its loop)."""
    from sweeps.runner import TRIAL_ENV  # the trials' allocator settings, as the service gives them

    command = [sys.executable, __file__, "--plain-loop", "--trials", str(trials), "--epochs", str(epochs)]
    start = time.perf_counter()
    result = subprocess.run(command, env={**os.environ, **TRIAL_ENV}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"the plain loop failed:\n{result.stderr[-3000:]}")
    return wall, float(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=60, help="per trial; 60 makes a trial about 30 s here")
    parser.add_argument("--plain-loop", action="store_true", help="only run the plain loop and print its seconds")
    args = parser.parse_args()

    from sweeps.spec import parse_spec

    spec_data = bench_spec(args.trials, args.epochs)
    spec = parse_spec(spec_data)
    if args.plain_loop:
        seconds = plain_loop(spec)
        loaded = [m for m in ("ray", "mlflow") if m in sys.modules]
        assert not loaded, f"a plain loop needs neither Ray nor MLflow, but it imported {loaded}"
        print(f"plain loop: {seconds:.3f}")
        return

    from sweeps.runner import prepare_caches

    prepare_caches(spec, log=lambda line: None)  # both sides read warm caches

    # the plain loop before and after the service, averaged: this shared machine drifts by 10-20%
    # over minutes, and a drift would otherwise count as overhead (or hide it)
    (before, before_loop) = plain_script(args.trials, args.epochs)
    with tempfile.TemporaryDirectory(prefix="overhead-") as folder:
        total, runs = service(spec_data, Path(folder))
    (after, after_loop) = plain_script(args.trials, args.epochs)
    plain = (before + after) / 2
    plain_loop(parse_spec(bench_spec(1, 1)))  # this process's first trial imports and sets up what trials use
    warm = plain_loop(spec)
    ray_alone = ray_start_stop()

    def summed(metric: str) -> float:
        return sum(r.data.metrics.get(metric, 0.0) for r in runs)

    in_trials = sum((r.info.end_time - r.info.start_time) / 1000 for r in runs)
    parts = [
        ("plain loop script, start to exit (baseline, mean of two)", plain),
        ("  the script before the service", before),
        ("  the script after the service", after),
        ("  of which start-up: interpreter, imports, set-up", plain - (before_loop + after_loop) / 2),
        ("plain loop in this warm process (no start-up)", warm),
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
    print(f"service vs the plain loop in a warm process: {warm / total:.2f}x")
    # drift-free: the trials' own training and explaining in the service, plus the plain script's
    # start-up, is what the plain loop would have taken at the speed the machine had meanwhile
    work = summed("time/train_s") + summed("time/evaluate_s")
    startup = plain - (before_loop + after_loop) / 2
    print(f"counted within the service's run: extras {total - work:.1f} s, (work + script start-up) / service {(work + startup) / total:.2f}x")
    print(f"sweep service vs plain loop: {plain / total:.2f}x")


if __name__ == "__main__":
    main()
