"""Real servers for the tests, started with the project's own scripts and stopped by process id."""

from __future__ import annotations

import os
import shutil
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
TEAM_SERVER = REPO / "cluster" / "mlflow" / "server-team.sh"


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
    # Ports the OS picks, as `ray.init` has them: `ray start` gives every node's dashboard agent the
    # fixed port 52365 and its workers the range 10002-19999. With two nodes here, and the local Ray
    # instances of tests in the other pytest worker, the head's agent found 52365 taken (only
    # logged), and its job server then answered every `ray job submit` with "No available agent"
    # (CI, 2026-12-03)
    node = subprocess.Popen(
        [ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
         "--dashboard-agent-listen-port=0", "--min-worker-port=0", "--max-worker-port=0", *role],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        yield node
    finally:
        # a head node took 33 s to exit on SIGTERM (measured; a worker 1 s) and holds nothing a test
        # needs: SIGKILL after a second (the teardown waited the whole 5 s it had before)
        stop_group(node, timeout=1)


def _wait_until(ready, process: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    """Poll ``ready()`` until it is true; fail early, naming the log, if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        assert process.poll() is None, f"{what} exited; the end of {log}:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"{what} did not answer in {timeout} s: see {log}"
        time.sleep(0.5)


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.status == 200


class MlflowServer:
    """``cluster/mlflow/server-single-host.sh`` on 127.0.0.1 with its data in ``data_dir`` (or
    ``script`` with the settings ``env``, its log beside ``data_dir``); it can be stopped and
    started again on the same port and data (a restart)."""

    def __init__(self, data_dir: Path, port: int | None = None, script: Path = SINGLE_HOST_SERVER, env=None):
        self.data_dir, self.port = data_dir, port or free_port()
        self.script, self.env = script, env or {"MLFLOW_DATA_DIR": str(data_dir)}
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120, wait: bool = True) -> str:
        """Start the server; returns its URL once /health answers (at once without ``wait``: then
        :meth:`wait` for it, and start what else a test needs meanwhile)."""
        env = {
            **os.environ,
            **self.env,
            "MLFLOW_PORT": str(self.port),
            "MLFLOW_BIN": str(Path(sys.executable).with_name("mlflow")),
        }
        with open(self._log, "a") as out:
            self.process = subprocess.Popen(
                ["bash", str(self.script)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        if wait:
            self.wait(timeout)
        return self.url

    def wait(self, timeout: float = 120) -> None:
        """Until the started server's /health answers."""
        assert self.process is not None, "the MLflow server was not started"
        _wait_until(lambda: _answers(f"{self.url}/health"), self.process, "the MLflow server", self._log, timeout)

    @property
    def _log(self) -> Path:
        return self.data_dir.parent / f"mlflow-server-{self.port}.log"

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


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program (Debian keeps them out of PATH, under /usr/lib/postgresql/N/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(found[-1]) if found else shutil.which(name)


@contextmanager
def postgres_server(data_dir: Path):
    """A throwaway PostgreSQL server on 127.0.0.1 (``initdb``, then ``postgres`` in its own process
    group, stopped by its id), trust authentication for user ``mlflow``, database ``mlflow``.
    PostgreSQL refuses to run as root: as root it runs as the ``postgres`` system user. Yields the
    ``postgresql://`` URI."""
    import psycopg

    port, as_user = free_port(), {}
    data_dir.mkdir(parents=True)
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        # the server itself, not `runuser`, which holds SIGTERM 2 s before it passes SIGKILL on
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        os.chown(data_dir, user.pw_uid, user.pw_gid)
        for parent in data_dir.parents:  # let that user reach its folder (traverse only)
            if parent.stat().st_uid == 0 and not parent.stat().st_mode & 0o001:
                parent.chmod(parent.stat().st_mode | 0o001)
    log = data_dir.parent / "postgres.log"
    subprocess.run(
        [postgres_bin("initdb"), "-D", str(data_dir), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--no-sync"],
        stdout=subprocess.DEVNULL, stderr=open(log, "a"), check=True, **as_user,
    )  # fmt: skip
    with open(log, "a") as out:  # throwaway data: no fsync (MLflow's migrations commit hundreds of times)
        process = subprocess.Popen(
            [postgres_bin("postgres"), "-D", str(data_dir), "-h", "127.0.0.1", "-p", str(port), "-k", str(data_dir),
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **as_user,
        )  # fmt: skip
    try:
        dsn = f"host=127.0.0.1 port={port} user=mlflow"

        def ready() -> bool:
            try:
                psycopg.connect(f"{dsn} dbname=postgres").close()
                return True
            except psycopg.OperationalError:
                return False

        _wait_until(ready, process, "PostgreSQL", log, 60)
        with psycopg.connect(f"{dsn} dbname=postgres", autocommit=True) as connection:
            connection.execute("CREATE DATABASE mlflow")
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        stop_group(process)


@contextmanager
def s3_server(log_dir: Path):
    """An S3-compatible object store on 127.0.0.1 (moto's server, in its own process group,
    stopped by its id). Yields its endpoint URL; any access key is accepted."""
    port = free_port()
    log = log_dir / "s3.log"
    with open(log, "a") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until(lambda: _answers(f"{url}/moto-api/"), process, "the S3 server", log, 60)
        yield url
    finally:
        stop_group(process)
