"""Real servers for the tests, started with the project's own scripts and stopped by process id."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SINGLE_HOST_SERVER = REPO / "cluster" / "mlflow" / "server-single-host.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group that ``process`` leads (it and what it started), SIGKILL after ``timeout``."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:  # workers that outlived their parent (MLflow's job consumers) are still in the group
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def ray_environment() -> dict[str, str]:
    """What every Ray command of a test cluster runs with: token authentication, this
    environment's executables first on PATH (the job's driver runs `probesweep`)."""
    return {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


@contextmanager
def ray_node(*, head_port: int, num_cpus: int, dashboard_port: int | None = None):
    """A real Ray node on 127.0.0.1 (`ray start --block` in its own process group), the head when
    ``dashboard_port`` is given, else a worker joining the head at ``head_port``. Yields the
    process; the node and everything it started are stopped by its process group id."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = ray_environment()
    if dashboard_port is not None:
        subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
        role = ["--head", f"--port={head_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                "--include-dashboard=true", "--disable-usage-stats"]  # fmt: skip
    else:
        role = [f"--address=127.0.0.1:{head_port}"]
    node = subprocess.Popen(
        [ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", *role],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        yield node
    finally:
        stop_group(node)


class MlflowServer:
    """``cluster/mlflow/server-single-host.sh`` on 127.0.0.1 with its data in ``data_dir``; it can
    be stopped and started again on the same port and data (a restart)."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir, self.port = data_dir, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> str:
        """Start the server; returns its URL once /health answers."""
        env = {
            **os.environ,
            "MLFLOW_DATA_DIR": str(self.data_dir),
            "MLFLOW_PORT": str(self.port),
            "MLFLOW_BIN": str(Path(sys.executable).with_name("mlflow")),
        }
        log = self.data_dir.parent / f"mlflow-server-{self.port}.log"
        with open(log, "a") as out:
            self.process = subprocess.Popen(
                ["bash", str(SINGLE_HOST_SERVER)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return self.url
            except OSError:
                pass
            assert self.process.poll() is None, f"the MLflow server exited: see {log}"
            assert time.monotonic() < deadline, f"the MLflow server did not answer in {timeout} s: see {log}"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
            self.process = None


@contextmanager
def mlflow_server(data_dir: Path, port: int | None = None):
    """A started :class:`MlflowServer`; yields its URL and stops it (by process group) at the end."""
    server = MlflowServer(data_dir, port)
    try:
        yield server.start()
    finally:
        server.stop()
