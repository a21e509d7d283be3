"""Ray processes that outlive a killed driver, found again by process id and stopped.

A local sweep's Ray instance (GCS, raylet, agents, workers) runs as the driver's descendants. When
the driver is killed (SIGKILL, an OOM kill), some of them linger: two Ray agents outlived a killed
driver by over 35 s. After Ray starts, the driver records its descendants' ids and start times in
the sweep's folder; ``probesweep resume`` stops those still alive before it starts Ray again. The
start time (``/proc/PID/stat``, field 22) guards against a reused process id. Linux only (``/proc``);
elsewhere nothing is recorded.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Callable

__all__ = ["PROCESS_FILE", "record_processes", "stop_leftovers"]

PROCESS_FILE = "ray_processes.json"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the fields after the command name: state first
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has ended; start time: field 22


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            stack += children
    return found


def record_processes(folder: Path) -> int:
    """Write the ids and start times of this process's descendants to ``folder``; how many."""
    if not Path("/proc/self/stat").exists():
        return 0
    processes = [{"pid": p, "start": s} for p in _descendants(os.getpid()) if (s := _start_time(p)) is not None]
    driver = {"pid": os.getpid(), "start": _start_time(os.getpid())}
    (folder / PROCESS_FILE).write_text(json.dumps({"driver": driver, "processes": processes}))
    return len(processes)


def stop_leftovers(folder: Path, log: Callable[[str], None], grace_s: float = 1.0) -> list[int]:
    """Stop (SIGTERM, then SIGKILL after ``grace_s``) the recorded processes that still run with
    the recorded start time; the ids stopped. Raises ``ChildProcessError`` (an ``OSError``: one
    line, exit 2) while the recorded driver itself still runs: that sweep has not died.

    A short grace: a killed driver's dashboard and runtime-environment agents had not exited 10 s
    after SIGTERM (measured), and its workers exit at once."""
    record = folder / PROCESS_FILE
    if not record.is_file():
        return []
    recorded = json.loads(record.read_text())
    driver = recorded["driver"]
    if driver["pid"] != os.getpid() and _start_time(driver["pid"]) == driver["start"]:
        raise ChildProcessError(
            f"the sweep in {folder} is still running (driver pid {driver['pid']}): wait for it, or stop it with Ctrl-C"
        )
    alive = [p["pid"] for p in recorded["processes"] if _start_time(p["pid"]) == p["start"]]
    for pid in alive:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_start_time(pid) is not None for pid in alive):
        time.sleep(0.1)
    for pid in alive:
        if _start_time(pid) is not None:
            os.kill(pid, signal.SIGKILL)
    if alive:
        log(f"stopped {len(alive)} Ray processes left by the sweep's killed driver (pids {', '.join(map(str, alive))})")
    record.unlink()
    return alive
