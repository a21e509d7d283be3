"""Test isolation: own HOME, temp dirs and caches; no telemetry; no process left running.

The environment is set before any test module imports Ray or MLflow (conftest runs first).
RAY_TMPDIR is a short path under /tmp because Ray's socket paths must stay under 108 bytes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

# under the machine's temp dir, also in an xdist worker (which inherits the TMPDIR set below):
# short, since Ray puts its sockets under RAY_TMPDIR
os.environ.setdefault("PROBESWEEP_TEST_TMP", tempfile.gettempdir())
_ROOT = Path(tempfile.mkdtemp(prefix="ps-", dir=os.environ["PROBESWEEP_TEST_TMP"]))
for _name in ("home", "tmp", "ray", "cache"):
    (_ROOT / _name).mkdir()
# `make test` runs two workers on two cores, where an OpenMP thread that waits and spins (the
# default) takes the core from the other worker's processes: the whole suite in two workers took
# 481.7 s and 926 CPU-s with passive waits, 729.1 s and 1,394.5 CPU-s without (2026-12-03)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.update(
    HOME=str(_ROOT / "home"),
    TMPDIR=str(_ROOT / "tmp"),
    RAY_TMPDIR=str(_ROOT / "ray"),
    PROBESWEEP_CACHE=str(_ROOT / "cache"),  # shared by the whole session: the backbone trains once
    RAY_USAGE_STATS_ENABLED="0",
    MLFLOW_DISABLE_TELEMETRY="true",
    DO_NOT_TRACK="1",
)
tempfile.tempdir = None  # re-read TMPDIR

# The embedded backbones' pre-trained weights (minutes of every session otherwise, a fresh clone in
# CI included): shipped with the tests for the current recipe and code, and kept per machine for
# others. Their files are named by probing.backbones.pretraining_key (a hash of the recipe and the
# code), so a change to either pre-trains again, once per machine. Copied in at the start, new ones
# kept at the end.
SHIPPED_BACKBONES = Path(__file__).resolve().parent / "data" / "backbones"
BACKBONE_STORE = Path(__file__).resolve().parents[1] / ".test-cache" / "backbones"
_SESSION_BACKBONES = _ROOT / "cache" / "backbones"


def _copy_backbones(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for weights in source.glob("*.pt"):
        checksum = weights.with_suffix(".sha256")
        if checksum.is_file() and not (target / weights.name).exists():
            for part in (checksum, weights):  # the weights last: a file without its checksum is never read
                partial = target / f"{part.name}.{os.getpid()}.tmp"  # the workers of a session copy at once
                shutil.copyfile(part, partial)
                os.replace(partial, target / part.name)


def pytest_configure(config):
    for store in (SHIPPED_BACKBONES, BACKBONE_STORE):
        _copy_backbones(store, _SESSION_BACKBONES)


# The modules that take longest (measured on 2 cores, 2026-12-03) first: `make test`'s two workers
# (`--dist loadfile --no-loadscope-reorder`) take the next module when one ends, so the long ones
# start early and the short ones fill the gaps. The rest keep their order after these.
LONGEST_FIRST = (
    "test_two_nodes.py", "test_e2e.py", "test_optuna_sweep.py", "test_resume.py", "test_tracking_server.py",
    "test_extraction.py", "test_voc_sweep.py", "test_method_families.py", "test_trial.py", "test_failed_trial.py",
    "test_zoo.py", "test_hostile_inputs.py", "test_method_properties.py", "test_grid_models.py", "test_team_server.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order is kept


def pytest_unconfigure(config):
    try:
        _copy_backbones(_SESSION_BACKBONES, BACKBONE_STORE)
    except OSError:  # a read-only checkout: the next session pre-trains again
        pass
    shutil.rmtree(_ROOT, ignore_errors=True)


@pytest.fixture(autouse=True)
def _torch_threads_left_as_found():
    """torch's thread count is process-wide: a test that changed it would run every later test of
    the session on other threads (a test that left one thread made tests/test_zoo.py after it take
    37 s instead of 27 s)."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    yield
    if before is not None:
        assert torch.get_num_threads() == before, "the test changed torch's thread count and left it changed"


@pytest.fixture(scope="session")
def session_root() -> Path:
    """The session's private folder (HOME, TMPDIR, RAY_TMPDIR and the cache live under it)."""
    return _ROOT


def session_processes() -> list:
    """Live processes started during this test session (Ray's GCS, raylet, workers, MLflow, ...).

    They are recognised by the RAY_TMPDIR they inherited from this session's environment; the
    test process itself (which set it after starting) is excluded.
    """
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("RAY_TMPDIR") == os.environ["RAY_TMPDIR"]:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def command_line(process) -> str:
    """A process's command line; empty for one that exited meanwhile."""
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def wait_for_exit(earlier: set[int], timeout: float = 60) -> list:
    """Wait until the session processes started since ``earlier`` (their pids, taken before) have
    exited; returns those still alive after ``timeout`` s. Processes of earlier tests (the test
    process's own multiprocessing resource tracker lives until the session ends) are not waited
    for: that cost a full minute per call."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in session_processes() if p.pid not in earlier]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="session")
def _empty_mlflow_db(session_root) -> Path:
    from mlflow import MlflowClient

    path = session_root / "empty-mlflow" / "mlflow.db"
    path.parent.mkdir()
    MlflowClient(f"sqlite:///{path}").search_experiments()  # MLflow creates its tables here, once
    return path


@pytest.fixture()
def sqlite_store(tmp_path, _empty_mlflow_db) -> str:
    """An empty MLflow store where a sweep run in ``tmp_path`` keeps it (``default_tracking_uri``):
    a copy of one made once per session, because MLflow's creation of its tables takes about a
    second (more than most tests that use a store)."""
    from sweeps.spec_files import default_tracking_uri

    shutil.copyfile(_empty_mlflow_db, tmp_path / "mlflow.db")
    return default_tracking_uri(tmp_path)
