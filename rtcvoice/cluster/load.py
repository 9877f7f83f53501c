"""How busy this node is: its process's CPU time over wall time, as a fraction of the CPUs it may use."""

from __future__ import annotations

import os
import time
from pathlib import Path


def available_cpus() -> float:
    """CPUs this process may run on: its affinity, capped by a cgroup CPU quota (v2 or v1) if any."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    quota = _cgroup_quota()
    return min(cpus, quota) if quota else cpus


def _cgroup_quota() -> float | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":  # cgroup v2: "max 100000" or "50000 100000"
            try:
                quota, period = Path(f"/sys/fs/cgroup{path}/cpu.max").read_text().split()
            except (OSError, ValueError):
                continue
            if quota != "max":
                return int(quota) / int(period)
        elif "cpu" in controllers.split(","):  # cgroup v1
            base = Path("/sys/fs/cgroup") / controllers
            if not base.exists():
                base = Path("/sys/fs/cgroup/cpu")
            try:
                quota_us = int((base / path.lstrip("/") / "cpu.cfs_quota_us").read_text())
                period_us = int((base / path.lstrip("/") / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota_us > 0:
                return quota_us / period_us
    return None


class LoadMeter:
    """CPU busy fraction between two samples; ``sample()`` is cheap enough for every heartbeat."""

    def __init__(self, cpus: float) -> None:
        self.cpus = max(0.05, cpus)
        self._cpu = time.process_time()
        self._wall = time.monotonic()
        self.load = 0.0

    def sample(self) -> float:
        cpu, wall = time.process_time(), time.monotonic()
        elapsed = wall - self._wall
        if elapsed >= 1.0:  # shorter windows are noise: one transcription would read as a full CPU
            self.load = round(max(0.0, (cpu - self._cpu) / elapsed / self.cpus), 3)
            self._cpu, self._wall = cpu, wall
        return self.load
