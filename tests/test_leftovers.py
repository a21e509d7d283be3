"""Ray processes left by a killed driver are found again by id and start time, and stopped."""

import json
import subprocess
import sys

from sweeps.leftovers import PROCESS_FILE, _start_time, record_processes, stop_leftovers


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])


def test_recorded_processes_that_still_run_are_stopped_and_a_reused_id_is_left_alone(tmp_path):
    left, other = _sleeper(), _sleeper()
    try:
        assert record_processes(tmp_path) >= 2  # this test's descendants, the two sleepers among them
        recorded = json.loads((tmp_path / PROCESS_FILE).read_text())
        assert {left.pid, other.pid} <= {p["pid"] for p in recorded["processes"]}
        # the other process's id now names a process that started at another time (a reused id)
        entries = [{"pid": left.pid, "start": _start_time(left.pid)}, {"pid": other.pid, "start": _start_time(other.pid) + 1}]
        driver = {"pid": other.pid, "start": _start_time(other.pid) + 1}  # a driver that has ended
        (tmp_path / PROCESS_FILE).write_text(json.dumps({"driver": driver, "processes": entries}))
        lines = []
        assert stop_leftovers(tmp_path, lines.append, grace_s=10) == [left.pid]
        assert left.wait(timeout=10) is not None and other.poll() is None
        assert lines == [f"stopped 1 Ray processes left by the sweep's killed driver (pids {left.pid})"]
        assert not (tmp_path / PROCESS_FILE).exists() and stop_leftovers(tmp_path, lines.append) == []
    finally:
        for process in (left, other):
            process.kill()
            process.wait()


def test_a_sweep_whose_driver_still_runs_is_not_touched(tmp_path):
    import pytest

    driver, ray_process = _sleeper(), _sleeper()
    try:
        record = {"driver": {"pid": driver.pid, "start": _start_time(driver.pid)},
                  "processes": [{"pid": ray_process.pid, "start": _start_time(ray_process.pid)}]}  # fmt: skip
        (tmp_path / PROCESS_FILE).write_text(json.dumps(record))
        with pytest.raises(ChildProcessError, match=f"is still running \\(driver pid {driver.pid}\\)"):
            stop_leftovers(tmp_path, print)
        assert ray_process.poll() is None and (tmp_path / PROCESS_FILE).exists()
    finally:
        for process in (driver, ray_process):
            process.kill()
            process.wait()
