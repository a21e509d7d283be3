"""Two nodes vs one node, same cores: what spreading a sweep over Ray nodes costs.

The same sweep (default: the shipped demo, 12 trials of 1 CPU) runs twice in one run of this
script, each time through ``probesweep run --address`` on a real Ray cluster of this machine
(``ray start`` processes, token authentication, 127.0.0.1): one node with 2 CPUs, then two nodes
with 1 CPU each. Both read warm feature caches and log to their own SQLite store.

    .venv/bin/python bench/cluster_scaling.py [--spec sweeps/configs/demo.yaml]

Last line: ``two nodes vs one node, same cores: <two-node throughput / one-node throughput>x``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from servers import free_port, ray_environment, ray_node  # noqa: E402  (the tests' own cluster helpers)


def wait_for_nodes(port: int, count: int, timeout: float = 120) -> None:
    """Until ``count`` nodes are alive in the cluster whose GCS is at ``port``."""
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = subprocess.run(
            [sys.executable, "-c", probe, f"127.0.0.1:{port}"], env=ray_environment(), capture_output=True, text=True
        )
        if alive.returncode == 0 and alive.stdout.strip() == str(count):
            return
        time.sleep(1)
    raise SystemExit(f"{count} Ray node(s) did not come up in {timeout} s")


def sweep_on(spec: Path, cpus_per_node: list[int], workdir: Path) -> tuple[float, int, float]:
    """Run ``spec`` on a fresh cluster with these nodes: (wall seconds, trials, summed trial seconds)."""
    from mlflow import MlflowClient

    port = free_port()
    with ExitStack() as nodes:
        nodes.enter_context(ray_node(head_port=port, num_cpus=cpus_per_node[0], dashboard_port=free_port()))
        for cpus in cpus_per_node[1:]:
            nodes.enter_context(ray_node(head_port=port, num_cpus=cpus))
        wait_for_nodes(port, len(cpus_per_node))
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        start = time.perf_counter()
        result = subprocess.run(
            [str(Path(sys.executable).with_name("probesweep")), "run", str(spec), "--name", "scaling",
             "--address", f"127.0.0.1:{port}", "--tracking-uri", uri, "--storage", str(workdir / "results")],
            cwd=workdir, env=ray_environment(), capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"the sweep failed on {cpus_per_node}:\n{result.stderr[-3000:]}")
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    busy = sum((r.info.end_time - r.info.start_time) / 1000 for r in children)
    nodes_used = len({r.data.tags.get("node_id") for r in children})
    print(f"  {len(cpus_per_node)} node(s) {cpus_per_node} CPUs: {len(children)} trials on {nodes_used} node(s) in {wall:.0f} s")
    return wall, len(children), busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "sweeps" / "configs" / "demo.yaml")
    args = parser.parse_args()

    from sweeps.extraction import extract_features_here
    from sweeps.spec import load_spec

    extract_features_here(load_spec(args.spec), log=lambda line: None)  # both clusters read warm caches
    results = {}
    for label, cpus in (("one node, 2 CPUs (baseline)", [2]), ("two nodes, 1 CPU each", [1, 1])):
        with tempfile.TemporaryDirectory(prefix="scaling-") as folder:
            results[label] = sweep_on(args.spec, cpus, Path(folder))
    baseline = next(iter(results.values()))
    print(f"sweep: {args.spec.name}")
    print("| cluster | wall s | trials/hour | summed trial s | vs one node |")
    print("|---|---|---|---|---|")
    for label, (wall, trials, busy) in results.items():
        throughput = trials / wall * 3600
        print(f"| {label} | {wall:.0f} | {throughput:.0f} | {busy:.0f} | {baseline[0] / wall * trials / baseline[1]:.2f}x |")
    (one_wall, one_trials, _), (two_wall, two_trials, _) = results.values()
    print(f"two nodes vs one node, same cores: {(two_trials / two_wall) / (one_trials / one_wall):.2f}x")


if __name__ == "__main__":
    main()
