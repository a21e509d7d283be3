"""The files under cluster/: launcher YAMLs against Ray's own schema, KubeRay manifests by
structure, the job's entrypoint parsed by the real `probesweep` command line, the server scripts'
refusals."""

import json
import os
import shlex
import subprocess
from pathlib import Path

import click
import jsonschema
import pytest
import ray.autoscaler
import typer.main
import yaml

from servers import REPO
from sweeps.cli import app
from sweeps.spec import load_spec

CLUSTER = REPO / "cluster"
LAUNCHER_FILES = sorted((CLUSTER / "ray").glob("*.yaml"))
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_files_are_valid_for_ray():
    assert [p.name for p in LAUNCHER_FILES] == ["aws-gpu.yaml", "onprem.yaml"]
    for path in LAUNCHER_FILES:
        config = yaml.safe_load(path.read_text())
        jsonschema.validate(config, RAY_SCHEMA)
        # token authentication on every node, the dashboard on loopback
        starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
        assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
        assert any("pip install --quiet -e ~/probesweep" in c for c in config["setup_commands"])
    assert yaml.safe_load(LAUNCHER_FILES[1].read_text())["provider"]["type"] == "local"
    gpu = yaml.safe_load(LAUNCHER_FILES[0].read_text())["available_node_types"]["gpu_worker"]["node_config"]
    assert gpu["InstanceType"].startswith(("g", "p"))  # an AWS GPU instance family


def test_schema_check_catches_a_broken_launcher_file():
    config = yaml.safe_load(LAUNCHER_FILES[1].read_text())
    config["worker_start_ray_comands"] = config.pop("worker_start_ray_commands")  # a typo
    with pytest.raises(jsonschema.ValidationError, match="'worker_start_ray_comands' was unexpected"):
        jsonschema.validate(config, RAY_SCHEMA)


def _containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    _containers(head["template"])
    (gpu_group,) = spec["workerGroupSpecs"]
    assert gpu_group["groupName"] and gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    for container in _containers(gpu_group["template"]):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_kuberay_raycluster_manifest():
    manifest = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    _check_cluster_spec(manifest["spec"])


def test_kuberay_rayjob_runs_a_valid_probesweep_command(tmp_path, monkeypatch):
    manifest = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert manifest["spec"]["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(manifest["spec"]["rayClusterSpec"])

    program, command, *args = shlex.split(manifest["spec"]["entrypoint"])
    assert (program, command) == ("probesweep", "run")
    group = typer.main.get_command(app)
    with click.Context(group) as parent:  # parses like the CLI does: unknown options fail here
        context = group.get_command(parent, "run").make_context("run", list(args), parent=parent)
    params = context.params
    assert params["address"] == "auto" and params["tracking_uri"].startswith("http://") and params["storage"].startswith("/")

    # the spec it names is shipped and valid in the job's environment
    env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]
    for name in ("IMAGENET_ROOT", "WEIGHTS_DIR"):
        assert name in env
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    for checkpoint in ("dino_resnet50_pretrain.pth", "moco_v2_800ep_pretrain.pth.tar", "byol_r50.pth", "RN50.pt", "bcos_resnet_50.pth"):
        (tmp_path / "WEIGHTS_DIR" / checkpoint).write_bytes(b"")
    assert load_spec(REPO / params["config"]).n_trials() == 60


def test_team_server_script_refuses_what_it_cannot_serve():
    script = str(CLUSTER / "mlflow" / "server-team.sh")
    env = {"PATH": os.environ["PATH"]}
    missing = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "set MLFLOW_BACKEND_STORE_URI=postgresql://" in missing.stderr
    sqlite = subprocess.run(
        ["bash", script], capture_output=True, text=True,
        env={**env, "MLFLOW_BACKEND_STORE_URI": "sqlite:///m.db", "MLFLOW_ARTIFACTS_DESTINATION": "s3://b/a"},
    )  # fmt: skip
    assert sqlite.returncode == 2 and "must be a postgresql:// URI, got sqlite://..." in sqlite.stderr
    local = subprocess.run(
        ["bash", script], capture_output=True, text=True,
        env={**env, "MLFLOW_BACKEND_STORE_URI": "postgresql://u:p@db/mlflow", "MLFLOW_ARTIFACTS_DESTINATION": "/srv/a"},
    )  # fmt: skip
    assert local.returncode == 2 and "must be an s3:// URI, got /srv/a" in local.stderr
