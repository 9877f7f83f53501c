"""CPU shares for ``rtcvoice bench``: each node process, and the caller, held to a slice of the machine.

On a 2-core machine more nodes can only carry more calls if each node gets a fixed slice of it:
unlimited, one node already uses both cores and the figure would be about the machine, not about
nodes (shared/research/scale.md §4.3). As root, with a cgroup CPU controller (v1
``cpu.cfs_quota_us``, or v2 ``cpu.max``), every process gets a group with a quota of its own.
Otherwise whole cores by affinity where there are enough of them, else no limit; the report
says which (``CpuShares.method``).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Method = Literal["cgroup-v1", "cgroup-v2", "affinity", "none"]

# The quota is enforced per period: a node that spends its share early in a period waits for the
# next. One would expect a short period to be kinder to paced audio, but measured here (one call,
# node at 0.5 CPU) a 10 ms period gave 35-47 late frames per call and 100 ms (the kernel's and
# Docker's default) none: with the kernel's 5 ms bandwidth slice per CPU, a 5 ms quota is handed
# out in one piece and the other CPU's threads wait. So the default stays.
PERIOD_US = 100_000
MIN_QUOTA_US = 1_000  # the kernel refuses smaller quotas
# A quota is a ceiling, not a floor: on a shared machine other processes would take some of a
# node's slice whenever they are busy, and the figure would follow them. Each group gets the
# weight of this many ordinary processes per CPU of its share, so it reaches its quota first;
# the others keep whatever the bench's quotas leave of the machine.
WEIGHT_PER_CPU = 10
PREFIX = "rtcvoice-bench-"


@dataclass(frozen=True)
class Throttle:
    periods: int  # enforcement periods in which the group ran
    throttled: int  # of them, periods in which it hit its quota
    throttled_s: float  # time its tasks waited for the next period


@dataclass
class CpuGroup:
    """One cgroup with a CPU quota. v1 keeps accounting in a separate hierarchy (cpuacct)."""

    name: str
    cpus: float
    cpu_dir: Path
    acct_dir: Path | None  # v1 cpuacct (can be ``cpu_dir`` when mounted together); None on v2
    v2: bool
    cores: list[int] = field(default_factory=list)  # the cores it is pinned to

    def add(self, pid: int) -> None:
        """Move a process (all its threads: cgroup.procs) into the group."""
        for d in dict.fromkeys(d for d in (self.cpu_dir, self.acct_dir) if d is not None):
            (d / "cgroup.procs").write_text(f"{pid}\n")

    def usage_s(self) -> float | None:
        """CPU seconds used by the group's processes since it was made."""
        try:
            if self.v2:
                return _stat(self.cpu_dir)["usage_usec"] / 1e6
            if self.acct_dir is not None:
                return int((self.acct_dir / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError, KeyError):
            pass
        return None

    def throttle(self) -> Throttle | None:
        try:
            stat = _stat(self.cpu_dir)
        except (OSError, ValueError):
            return None
        waited = stat.get("throttled_usec", 0) / 1e6 if self.v2 else stat.get("throttled_time", 0) / 1e9
        return Throttle(stat.get("nr_periods", 0), stat.get("nr_throttled", 0), waited)


def _stat(d: Path) -> dict[str, int]:
    out = {}
    for line in (d / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        out[key] = int(value)
    return out


def _mounts() -> tuple[Path | None, Path | None, Path | None]:
    """(v1 cpu mount, v1 cpuacct mount, v2 mount with the cpu controller)."""
    cpu = acct = v2 = None
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None, None, None
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        where, kind, opts = Path(parts[1]), parts[2], parts[3].split(",")
        if kind == "cgroup":
            if "cpu" in opts and cpu is None:
                cpu = where
            if "cpuacct" in opts and acct is None:
                acct = where
        elif kind == "cgroup2" and v2 is None:
            with contextlib.suppress(OSError):
                if "cpu" in (where / "cgroup.controllers").read_text().split():
                    v2 = where
    return cpu, acct, v2


def _own_path(controller: str) -> str:
    """This process's cgroup path in the hierarchy of ``controller`` ("" for the v2 one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            mine = controller in controllers.split(",") if controller else controllers == ""
            if mine:
                return path.lstrip("/")
    return ""


class CpuShares:
    """Makes the groups (or pins cores), and takes every group away again at exit, Ctrl-C included."""

    def __init__(self, method: Method, reason: str, period_us: int = PERIOD_US) -> None:
        self.period_us = period_us
        self.method: Method = method
        self.reason = reason
        self.groups: list[CpuGroup] = []
        self._bases: list[Path] = []  # the bench's own parent group, per hierarchy
        self._homes: list[Path] = []  # where this process was, per hierarchy (it goes back there)
        self._next_core = 0
        self._given: dict[int, float] = {}  # core -> CPU share of the groups pinned to it
        self._all_cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._closed = False

    @classmethod
    def detect(cls, wanted: bool, period_us: int = PERIOD_US) -> CpuShares:
        if not wanted:
            return cls("none", "no --node-cpus or --caller-cpus given")
        if os.name != "posix" or os.geteuid() != 0:
            return cls._affinity_or_none("not root: cgroups need root")
        cpu, acct, v2 = _mounts()
        tag = f"{PREFIX}{os.getpid()}"
        if cpu is not None:
            shares = cls(
                "cgroup-v1",
                f"cgroup v1 quotas ({cpu}), period {period_us / 1000:g} ms, each group pinned to the fewest cores that hold its share",
                period_us,
            )
            try:
                for mount, controller in ((cpu, "cpu"), (acct, "cpuacct")):
                    if mount is None or (mount == cpu and controller == "cpuacct"):
                        continue
                    home = mount / _own_path(controller)
                    _remove_stale(home)
                    base = home / tag
                    base.mkdir()
                    shares._bases.append(base)
                    shares._homes.append(home)
                    if controller == "cpu":  # the groups' weights count against their siblings only
                        (base / "cpu.shares").write_text(f"{shares._weight(shares.machine_cpus) * 1024}\n")
            except OSError as exc:
                shares.close()
                return cls._affinity_or_none(f"cgroup v1 unusable: {exc}")
            atexit.register(shares.close)
            return shares
        if v2 is not None:
            shares = cls(
                "cgroup-v2",
                f"cgroup v2 cpu.max ({v2}), period {period_us / 1000:g} ms, each group pinned to the fewest cores that hold its share",
                period_us,
            )
            try:
                home = v2 / _own_path("")
                _remove_stale(home)
                # Children get cpu.max only where every parent hands the controller down; a group
                # that holds processes itself cannot (the "no internal processes" rule).
                (home / "cgroup.subtree_control").write_text("+cpu")
                base = home / tag
                base.mkdir()
                shares._bases.append(base)
                shares._homes.append(home)
                (base / "cgroup.subtree_control").write_text("+cpu")
                (base / "cpu.weight").write_text(
                    f"{min(10_000, shares._weight(shares.machine_cpus) * 100)}\n"
                )
            except OSError as exc:
                shares.close()
                return cls._affinity_or_none(f"cgroup v2 unusable: {exc}")
            atexit.register(shares.close)
            return shares
        return cls._affinity_or_none("no cgroup CPU controller mounted")

    @classmethod
    def _affinity_or_none(cls, why: str) -> CpuShares:
        if hasattr(os, "sched_setaffinity"):
            return cls("affinity", f"{why}; whole cores by affinity where there are enough")
        return cls("none", f"{why}; no affinity either: unlimited")

    @property
    def limits(self) -> bool:
        return self.method != "none"

    def place(self, pid: int, name: str, cpus: float | None) -> CpuGroup | list[int] | None:
        """Hold ``pid`` to ``cpus``: its group, the cores it is pinned to, or None (unlimited).

        A group is also pinned to as few cores as hold its share. Its quota is spent by all its
        threads together: on two cores a node whose Whisper thread and event loop are both busy
        spends a 50 ms quota in 25 ms and then stalls for 75, longer than the 60 ms the paced audio
        track allows, where a core half as fast would never stall. On one core the longest stall
        is the period less the quota.
        """
        if cpus and self.method in ("cgroup-v1", "cgroup-v2"):
            group = self._group(name, cpus)
            group.add(pid)
            group.cores = self._least_used(cpus)
            _pin(pid, group.cores)
            return group
        if cpus and self.method == "affinity":
            cores = self._cores(math.ceil(cpus))
            if cores:
                _pin(pid, cores)
                return cores
        if self._all_cores:
            # A child inherits the caller's cores; unlimited means every core again.
            _pin(pid, self._all_cores)
        return None

    def _least_used(self, cpus: float) -> list[int]:
        """The ``ceil(cpus)`` cores with the least share given out so far (the groups spread out)."""
        count = min(len(self._all_cores), max(1, math.ceil(cpus)))
        cores = sorted(self._all_cores, key=lambda c: (self._given.get(c, 0.0), c))[:count]
        for core in cores:
            self._given[core] = self._given.get(core, 0.0) + cpus / count
        return sorted(cores)

    @property
    def machine_cpus(self) -> float:
        return float(len(self._all_cores) or os.cpu_count() or 1)

    def _group(self, name: str, cpus: float) -> CpuGroup:
        dirs = []
        for base in self._bases:
            d = base / name
            d.mkdir(exist_ok=True)
            dirs.append(d)
        cpu_dir = dirs[0]
        period = max(self.period_us, math.ceil(MIN_QUOTA_US / max(cpus, 1e-3)))
        quota = max(MIN_QUOTA_US, round(cpus * period))
        weight = self._weight(cpus)
        if self.method == "cgroup-v2":
            (cpu_dir / "cpu.max").write_text(f"{quota} {period}\n")
            (cpu_dir / "cpu.weight").write_text(f"{min(10_000, weight * 100)}\n")
            group = CpuGroup(name, cpus, cpu_dir, None, True)
        else:
            (cpu_dir / "cpu.cfs_period_us").write_text(f"{period}\n")
            (cpu_dir / "cpu.cfs_quota_us").write_text(f"{quota}\n")
            (cpu_dir / "cpu.shares").write_text(f"{weight * 1024}\n")
            group = CpuGroup(name, cpus, cpu_dir, dirs[1] if len(dirs) > 1 else cpu_dir, False)
        self.groups.append(group)
        return group

    @staticmethod
    def _weight(cpus: float) -> int:
        return max(1, round(cpus * WEIGHT_PER_CPU))

    def _cores(self, count: int) -> list[int]:
        """The next ``count`` cores nobody holds yet; [] when the machine has no more."""
        allowed = self._all_cores
        if self._next_core + count > len(allowed):
            self.method, self.reason = "none", f"{self.reason}; not enough cores: unlimited"
            return []
        cores = allowed[self._next_core : self._next_core + count]
        self._next_core += count
        return cores

    def close(self) -> None:
        """Everything back where it was, groups removed; idempotent (atexit calls it too)."""
        if self._closed:
            return
        self._closed = True
        if self._given and self._all_cores:
            _pin(os.getpid(), self._all_cores)  # the caller was pinned with its group
        for base, home in zip(self._bases, self._homes, strict=False):
            for child in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
                _empty_into(child, home)
                _rmdir(child)
            _rmdir(base)


def _pin(pid: int, cores: list[int]) -> None:
    """Every thread of ``pid`` (threads started later inherit it from the one that starts them)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cores)


def _empty_into(group: Path, home: Path) -> None:
    """Move whatever still runs in ``group`` (this process, a straggler) back to ``home``."""
    with contextlib.suppress(OSError):
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (home / "cgroup.procs").write_text(f"{pid}\n")


def _rmdir(d: Path) -> None:
    # A group whose last process just exited can be busy for a moment.
    for _ in range(20):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def _remove_stale(home: Path) -> None:
    """Groups left by a bench that was killed (SIGKILL skips its cleanup) are removed when empty."""
    with contextlib.suppress(OSError):
        for base in home.glob(f"{PREFIX}*"):
            pid = base.name[len(PREFIX) :]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                for child in base.iterdir():
                    if child.is_dir():
                        _empty_into(child, home)
                        _rmdir(child)
                _rmdir(base)
