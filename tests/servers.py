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


@contextmanager
def mlflow_server(data_dir: Path, port: int | None = None, timeout: float = 120):
    """``cluster/mlflow/server-single-host.sh`` on 127.0.0.1; yields its URL once /health answers."""
    port = port or free_port()
    env = {
        **os.environ,
        "MLFLOW_DATA_DIR": str(data_dir),
        "MLFLOW_PORT": str(port),
        "MLFLOW_BIN": str(Path(sys.executable).with_name("mlflow")),
    }
    log = open(data_dir.parent / f"mlflow-server-{port}.log", "w")
    server = subprocess.Popen(
        ["bash", str(SINGLE_HOST_SERVER)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, f"the MLflow server exited: see {log.name}"
            assert time.monotonic() < deadline, f"the MLflow server did not answer in {timeout} s: see {log.name}"
            time.sleep(0.5)
        yield url
    finally:
        stop_group(server)
        log.close()
