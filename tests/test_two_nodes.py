"""A real two-node Ray cluster on this machine, a real MLflow server, a sweep submitted as a Ray job.

`ray start --head` and a second `ray start --address ...` run as separate process groups on
127.0.0.1 with token authentication; the MLflow server is `cluster/mlflow/server-single-host.sh`.
The sweep goes in with `ray job submit`, as docs/cluster.md tells users. Then the worker node is
SIGKILLed mid-sweep, and the tracking server restarts. Every process is stopped by its
process group id, also when a test fails.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT

from conftest import session_processes, wait_for_exit
from servers import MlflowServer, free_port, ray_environment, ray_node, stop_group

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
EPOCHS = 12


def spec(name: str, epochs: int, seeds: int) -> dict:
    return {
        "name": name,
        "backbones": ["tiny_resnet_sup"],
        "probe": {"loss": ["ce", "bce"], "head": [{"type": "mlp", "depth": 2, "width": 256}]},
        # a checkpoint every epoch: the test acts on a trial's logged epochs
        "train": {"epochs": epochs, "lr": 1.0e-2, "seed": list(range(seeds)), "checkpoint_every_s": 0},
        "evaluate": {"methods": ["ixg"], "layers": ["input"], "n_grids": 4, "confidence": 0.5},
        "resources": {"cpu": 1, "max_failures": 2},
        "tracking": {"experiment": name},
    }


class Cluster:
    def __init__(self, workdir: Path, dashboard: str, server: MlflowServer | None, worker):
        self.workdir, self.dashboard, self.server, self.worker = workdir, dashboard, server, worker
        self.tracking_uri = server.url if server else ""

    def submit(self, name: str, spec_data: dict, wait: bool) -> subprocess.CompletedProcess | subprocess.Popen:
        """`ray job submit` of `probesweep run` for ``spec_data`` (blocking, or a running Popen)."""
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec_data, sort_keys=False))
        command = [
            RAY, "job", "submit", f"--address={self.dashboard}", "--", "probesweep", "run", str(path), "--name", name,
            "--address", "auto", "--tracking-uri", self.tracking_uri, "--storage", str(self.workdir / "results"),
        ]  # fmt: skip
        if wait:
            return subprocess.run(command, env=ray_environment(), capture_output=True, text=True, timeout=900)
        # its own process group: stop_group ends it and what it started if a test fails midway
        return subprocess.Popen(
            command, env=ray_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )

    def nodes(self) -> list[dict]:
        listed = subprocess.run(
            [RAY, "list", "nodes", "--format=json", f"--address={self.dashboard}"],
            env=ray_environment(), capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(listed.stdout)

    def runs(self, experiment: str):
        client = MlflowClient(self.tracking_uri)
        found = client.get_experiment_by_name(experiment)
        return [] if found is None else client.search_runs([found.experiment_id])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cluster")
    head_port, dashboard_port = free_port(), free_port()
    # what earlier modules of the session still run is theirs to stop: wait for the cluster's own only
    earlier = {p.pid for p in session_processes()}
    server = MlflowServer(workdir / "mlflow")
    # Ray's default dashboard-agent port taken while the nodes start, as a local Ray instance of the
    # other pytest worker took it in CI: the nodes must not need it (if it is taken already, so be it)
    squatter = socket.socket()
    with contextlib.suppress(OSError):
        squatter.bind(("127.0.0.1", DEFAULT_DASHBOARD_AGENT_LISTEN_PORT))
        squatter.listen()
    try:
        server.start(wait=False)  # it starts while the Ray nodes do
        with ray_node(head_port=head_port, num_cpus=1, dashboard_port=dashboard_port):
            with ray_node(head_port=head_port, num_cpus=1) as worker:
                dashboard = f"http://127.0.0.1:{dashboard_port}"
                deadline = time.monotonic() + 120
                # both nodes up and the job server answering
                while True:
                    try:
                        nodes = Cluster(workdir, dashboard, None, worker).nodes()
                        if sum(n["state"] == "ALIVE" for n in nodes) == 2:
                            break
                    except (subprocess.CalledProcessError, json.JSONDecodeError):
                        pass
                    assert time.monotonic() < deadline, "the two Ray nodes did not come up"
                    time.sleep(1)
                # the job server takes jobs once the head's agent is up, which can come after the
                # nodes are listed ("No available agent to submit job")
                deadline = time.monotonic() + 120
                while (probe := subprocess.run(
                    [RAY, "job", "submit", f"--address={dashboard}", "--", "true"],
                    env=ray_environment(), capture_output=True, text=True, timeout=120,
                )).returncode:  # fmt: skip
                    assert time.monotonic() < deadline, f"the Ray job server took no job:\n{probe.stderr[-2000:]}"
                    time.sleep(1)
                squatter.close()
                server.wait()
                yield Cluster(workdir, dashboard, server, worker)
    finally:
        squatter.close()
        server.stop()
        wait_for_exit(earlier)


def _children(runs):
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _steps(tracking_uri: str, run_id: str) -> list[int]:
    return [m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")]


def test_one_job_extracts_on_both_nodes_runs_trials_there_and_loses_nothing_to_a_restart_or_a_lost_node(cluster):
    """One job for three properties (a job costs one to two minutes here): its features are extracted
    on both nodes and its two trials start one on each; the worker node is SIGKILLed past its trial's
    second checkpoint and that trial resumes on the head from its checkpoint; the tracking server
    restarts while the head's trial logs. Every epoch of every trial arrives in MLflow once."""
    # features of their own (float16, small shards): extracted by this sweep, not found in the cache
    sweep = spec("spread", epochs=EPOCHS, seeds=1) | {"features": {"shard_rows": 128}}
    sweep["train"] |= {"feature_dtype": "float16"}
    node_ips = {n["node_id"]: n["node_ip"] for n in cluster.nodes()}
    worker_id = next(n["node_id"] for n in cluster.nodes() if not n["is_head_node"])
    job = cluster.submit("spread", sweep, wait=False)
    try:
        deadline = time.monotonic() + 300
        while True:  # both trials started (their node tagged), the worker node's past its second checkpoint
            children = _children(cluster.runs("spread"))
            on_worker = [c for c in children if c.data.tags.get("node_id") == worker_id]
            started = len(children) == 2 and all("node_id" in c.data.tags for c in children)
            if started and any(len(_steps(cluster.tracking_uri, c.info.run_id)) >= 3 for c in on_worker):
                break
            assert job.poll() is None and time.monotonic() < deadline, "no trial ran on the worker node: " + job.communicate()[0][-3000:]
            time.sleep(0.3)
        started_on = {c.data.tags["node_id"] for c in children}
        lost_run = on_worker[0].info.run_id
        os.killpg(cluster.worker.pid, signal.SIGKILL)  # the worker node and all it started, at once
        cluster.worker.wait()
        cluster.server.stop()  # while the head's trial logs to it; then again on the same port and store
        time.sleep(2)  # and the start takes seconds more: the head's trial logs epochs meanwhile
        cluster.server.start()
        output, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            stop_group(job)
    assert job.returncode == 0, output[-3000:]
    assert started_on == set(node_ips)  # a trial on each node
    runs = cluster.runs("spread")
    children = _children(runs)
    assert len(children) == 2 and len({c.data.tags["trial_id"] for c in children}) == 2  # one run per trial
    assert {r.info.status for r in runs} == {"FINISHED"}
    for child in children:  # every final metric and every epoch arrived, each once
        assert {"val/accuracy", "gridpg/ixg/input", "grids/count"} <= set(child.data.metrics)
        steps = _steps(cluster.tracking_uri, child.info.run_id)
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (child.data.tags["node_id"], steps)
        assert child.data.tags["node_ip"] == node_ips[child.data.tags["node_id"]], child.data.tags
    resumed = MlflowClient(cluster.tracking_uri).get_run(lost_run)
    # resumed, not restarted: epoch 3 was logged after Ray had registered the checkpoint of epoch 2
    assert int(resumed.data.tags["resumed_at_epoch"]) >= 2, resumed.data.tags
    assert resumed.data.tags["node_id"] != worker_id
    manifests = [json.loads(m.read_text()) for m in Path(os.environ["PROBESWEEP_CACHE"]).glob("features/*/digits-*-float16-*/manifest.json")]
    assert {m["split"] for m in manifests} == {"train", "val"} and all(m["shard_rows"] == 128 for m in manifests)
    assert {s["node"] for m in manifests for s in m["shards"]} == set(node_ips), output[-3000:]  # shards from both nodes
