"""``rtcvoice bench --nodes N --workers W``: the servers the bench starts, and what each node did.

N ``rtcvoice serve`` processes share a ``file://`` registry folder and one SQLite file, each on a
port of its own. Every call enters through the first one, as through a load balancer with no
affinity: session/start is taken there or relayed to an emptier node, and the media then flows
to the node that holds the call. With W workers each of those processes is W nodes behind one
port. During a level the bench reads every node's ``/api/v1/voice/status`` twice a second (the
calls it holds, its process CPU), and its own CPU: from these come the calls per node at the
peak, the CPU-seconds per call-second, how close each node ran to its share, and whether the
caller itself had enough CPU for the figure to be about the nodes (scale.md §4.3).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .bench_cpu import CpuGroup, CpuShares, Throttle
from .cluster.workers import free_ports

STATUS = "/api/v1/voice/status"
SAMPLE_S = 0.5
# The caller must not be what runs out: above this fraction of its share (its own CPU use over
# the busiest stretch of a level) the run is marked invalid (scale.md §4.3).
CALLER_LIMIT = 0.8
START_TIMEOUT_S = 300.0  # three nodes loading Whisper at once, each on 0.4 CPU


@dataclass
class Server:
    """One ``rtcvoice serve`` process the bench started: one node, or W workers behind one port."""

    proc: subprocess.Popen[bytes]
    url: str  # where calls enter
    nodes: list[str]  # each node's own URL (the workers' own ports)
    cpus: float | None  # the CPU share it is held to; None: unlimited
    hold: CpuGroup | list[int] | None  # its cgroup, or the cores it is pinned to


@dataclass
class Cluster:
    servers: list[Server]
    folder: str  # registry folder and SQLite file (removed at stop)

    @property
    def entry(self) -> str:
        return self.servers[0].url

    def probes(self) -> list[Probe]:
        return [
            Probe(
                url,
                s.cpus / len(s.nodes) if s.cpus else None,
                s.hold if isinstance(s.hold, CpuGroup) else None,
            )
            for s in self.servers
            for url in s.nodes
        ]

    def stop(self) -> None:
        # SIGINT: stop now (SIGTERM would drain, which waits for calls a failed level left).
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGINT)
        for server in self.servers:
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def pop_workers(serve_args: list[str]) -> tuple[list[str], int | None]:
    """``--workers N`` taken out of the server's flags (the bench starts and reads the workers itself)."""
    out, workers, skip = [], None, False
    for i, arg in enumerate(serve_args):
        if skip:
            skip = False
            continue
        if arg == "--workers" and i + 1 < len(serve_args):
            workers, skip = int(serve_args[i + 1]), True
        elif arg.startswith("--workers="):
            workers = int(arg.split("=", 1)[1])
        else:
            out.append(arg)
    return out, workers


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


@contextlib.asynccontextmanager
async def one_server(server: str | None, serve_args: list[str]) -> AsyncIterator[str]:
    """``server`` when given; else one ``rtcvoice serve`` with ``serve_args``, stopped on the way out.

    For the benches that measure one call or one node (--turn-taking, --long-call, --memory)."""
    if server:
        yield server
        return
    shares = CpuShares.detect(False)
    try:
        cluster = await asyncio.to_thread(
            start_cluster, serve_args, nodes=1, workers=1, node_cpus=None, shares=shares
        )
        try:
            yield cluster.entry
        finally:
            await asyncio.to_thread(cluster.stop)
    finally:
        shares.close()


def start_cluster(
    serve_args: list[str], *, nodes: int, workers: int, node_cpus: float | None, shares: CpuShares
) -> Cluster:
    """Start the nodes, each held to ``node_cpus`` when given, and wait until every one answers."""
    folder = tempfile.mkdtemp(prefix="rtcvoice-bench-")
    args = list(serve_args)
    if not _has_flag(args, "--db-path"):
        # The benchmark's calls are not worth keeping: their threads go to a throwaway database.
        args += ["--db-path", os.path.join(folder, "bench.db")]
    clustered = nodes > 1 or workers > 1
    if node_cpus and not _has_flag(args, "--stt-threads"):
        # Whisper starts a thread per core it sees; on a slice of a core they only take turns.
        args += ["--stt-threads", str(max(1, math.ceil(node_cpus / workers)))]
    servers: list[Server] = []
    try:
        for k in range(1, nodes + 1):
            port = free_ports(1)
            url = f"http://127.0.0.1:{port}"
            node_args = [*args, "--port", str(port)]
            own = [url]
            if clustered:
                registry = os.path.join(folder, "registry")
                node_args += ["--cluster-url", f"file://{registry}", "--node-id", f"bench-n{k}"]
            if workers > 1:
                first = free_ports(workers)
                node_args += ["--workers", str(workers), "--node-port", str(first)]
                own = [f"http://127.0.0.1:{first + w}" for w in range(workers)]
            elif clustered:
                node_args += ["--node-url", url]
            if node_cpus:
                node_args += ["--node-cpus", f"{node_cpus / workers:g}"]
            proc = subprocess.Popen(
                [sys.executable, "-m", "rtcvoice", "serve", "--log-level", "WARNING", *node_args],
                stdout=subprocess.DEVNULL,
                stderr=None,
            )
            hold = shares.place(proc.pid, f"node{k}", node_cpus)
            cpus = float(len(hold)) if isinstance(hold, list) else node_cpus if hold is not None else None
            servers.append(Server(proc, url, own, cpus, hold))
        _wait_ready(servers)
    except BaseException:
        Cluster(servers, folder).stop()
        raise
    return Cluster(servers, folder)


def _wait_ready(servers: list[Server]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = [(url, s) for s in servers for url in dict.fromkeys([s.url, *s.nodes])]
    while waiting:
        if time.monotonic() > deadline:
            raise SystemExit(f"rtcvoice bench: {waiting[0][0]} did not start within {START_TIMEOUT_S:.0f} s")
        url, server = waiting[0]
        if server.proc.poll() is not None:
            raise SystemExit(
                f"rtcvoice bench: the server at {server.url} exited with {server.proc.returncode}"
            )
        try:
            with urllib.request.urlopen(url + STATUS, timeout=5):
                waiting.pop(0)
        except OSError:
            time.sleep(0.3)


# -- what each node did during a level -------------------------------------------------------------
@dataclass
class NodePoint:
    node_id: str
    calls: int
    cpu_s: float
    late_frames: int
    rss_mb: float


@dataclass
class Point:
    t: float
    nodes: list[NodePoint | None]  # None: the node did not answer this time
    caller_cpu_s: float
    caller_wait_s: float  # time the caller's event loop waited for a core (run queue)
    caller_throttle: Throttle | None
    throttles: list[Throttle | None]  # per server, when it has a cgroup


@dataclass
class NodeUse:
    node: str
    url: str
    calls_peak: int
    call_s: float  # calls held, integrated over the level
    cpu_s: float
    cpu_s_per_call_s: float | None
    cpus: float | None  # its share
    busy_cpus: float | None  # CPUs used while every call of the level was up
    busy_of_share: float | None
    throttled: float | None  # share of enforcement periods in which the server hit its quota
    late_frames: int
    rss_mb: float


@dataclass
class CallerUse:
    cpu_s: float
    busy_cpus: float | None
    cpus: float  # its share (its group's quota, its cores, or what the nodes leave)
    busy_of_share: float | None
    loop_wait: float | None  # fraction of the busy stretch its event loop waited for a core
    throttled: float | None
    valid: bool


@dataclass(frozen=True)
class Probe:
    """A node to read during a level: its own URL, its CPU share and the cgroup that holds it."""

    url: str
    cpus: float | None
    group: CpuGroup | None  # the server's: its workers share it


@dataclass
class Sampler:
    """Polls the nodes and the caller's own CPU every ``SAMPLE_S`` while a level runs."""

    probes: list[Probe]
    caller: CpuGroup | None
    points: list[Point] = field(default_factory=list)

    async def __aenter__(self) -> Sampler:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        await self._sample()
        self._task = asyncio.create_task(self._loop(), name="bench-sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        try:
            await self._sample()
        finally:
            await self._http.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_S)
            await self._sample()

    async def _node(self, url: str) -> NodePoint | None:
        try:
            async with self._http.get(url + STATUS) as reply:
                data: dict[str, Any] = await reply.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        node = data.get("node") or {}
        process = data.get("process") or {}
        return NodePoint(
            node_id=str(node.get("id", url)),
            calls=int(node.get("calls", data.get("sessions", 0))),
            cpu_s=float(process.get("cpu_s", 0.0)),
            late_frames=int(data.get("late_frames", 0)),
            rss_mb=float(process.get("rss_mb", 0.0)),
        )

    async def _sample(self) -> None:
        nodes = await asyncio.gather(*(self._node(p.url) for p in self.probes))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.points.append(
            Point(
                t=time.monotonic(),
                nodes=list(nodes),
                caller_cpu_s=usage.ru_utime + usage.ru_stime,
                caller_wait_s=_loop_wait_s(),
                caller_throttle=self.caller.throttle() if self.caller is not None else None,
                throttles=[p.group.throttle() if p.group is not None else None for p in self.probes],
            )
        )


def _loop_wait_s() -> float:
    """Run-queue wait of this process's main thread (the event loop, where aiortc does its work)."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def busy_window(points: list[Point], concurrency: int) -> tuple[int, int]:
    """First and last sample while every call of the level was up (else while any was)."""
    totals = [sum(n.calls for n in p.nodes if n is not None) for p in points]
    for need in (concurrency, 1):
        held = [i for i, total in enumerate(totals) if total >= need]
        if len(held) >= 2 and points[held[-1]].t - points[held[0]].t >= 1.0:
            return held[0], held[-1]
    return 0, len(points) - 1


def node_use(sampler: Sampler, concurrency: int) -> list[NodeUse]:
    points = sampler.points
    if len(points) < 2:
        return []
    a, b = busy_window(points, concurrency)
    span = max(1e-6, points[b].t - points[a].t)
    out = []
    for k, probe in enumerate(sampler.probes):
        seen = [(p.t, n) for p in points if (n := p.nodes[k]) is not None]
        if len(seen) < 2:
            continue
        call_s = sum(n0.calls * (t1 - t0) for (t0, n0), (t1, _) in zip(seen, seen[1:], strict=False))
        cpu_s = seen[-1][1].cpu_s - seen[0][1].cpu_s
        first, last = points[a].nodes[k], points[b].nodes[k]
        busy = (last.cpu_s - first.cpu_s) / span if first is not None and last is not None else None
        out.append(
            NodeUse(
                node=seen[-1][1].node_id,
                url=probe.url,
                calls_peak=max(n.calls for _, n in seen),
                call_s=round(call_s, 1),
                cpu_s=round(cpu_s, 2),
                cpu_s_per_call_s=round(cpu_s / call_s, 3) if call_s > 0 else None,
                cpus=probe.cpus,
                busy_cpus=_round(busy),
                busy_of_share=_round(busy / probe.cpus if busy is not None and probe.cpus else None),
                throttled=_throttled(points[a].throttles[k], points[b].throttles[k]),
                late_frames=seen[-1][1].late_frames - seen[0][1].late_frames,
                rss_mb=seen[-1][1].rss_mb,
            )
        )
    return out


def caller_use(sampler: Sampler, concurrency: int, share: float) -> CallerUse:
    points = sampler.points
    a, b = busy_window(points, concurrency) if len(points) >= 2 else (0, 0)
    span = points[b].t - points[a].t if points else 0.0
    busy = (points[b].caller_cpu_s - points[a].caller_cpu_s) / span if span > 0 else None
    wait = (points[b].caller_wait_s - points[a].caller_wait_s) / span if span > 0 else None
    of_share = busy / share if busy is not None and share > 0 else None
    return CallerUse(
        cpu_s=round(points[-1].caller_cpu_s - points[0].caller_cpu_s, 2) if points else 0.0,
        busy_cpus=_round(busy),
        cpus=share,
        busy_of_share=_round(of_share),
        loop_wait=_round(wait),
        throttled=_throttled(points[a].caller_throttle, points[b].caller_throttle) if points else None,
        valid=of_share is None or of_share <= CALLER_LIMIT,
    )


def _throttled(a: Throttle | None, b: Throttle | None) -> float | None:
    if a is None or b is None or b.periods <= a.periods:
        return None
    return round((b.throttled - a.throttled) / (b.periods - a.periods), 3)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


# -- configurations compared -------------------------------------------------------------------
def summarize(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration (nodes, workers, shares): capacities, medians, ratios to one node / one worker.

    Works on the JSON reports, so runs from separate invocations can be put together.
    """
    groups: dict[tuple[int, int, float | None, float | None], list[dict[str, Any]]] = {}
    for r in reports:
        s = r.get("settings", {})
        key = (
            int(s.get("nodes", 1)),
            int(s.get("workers", 1)),
            s.get("node_cpus"),
            s.get("caller_cpus") if s.get("caller_held") else None,
        )
        groups.setdefault(key, []).append(r)
    rows = []
    for (nodes, workers, node_cpus, caller_cpus), runs in sorted(groups.items(), key=lambda kv: kv[0][:2]):
        caps = [int(r["capacity"]) for r in runs]
        at_cap = [_level(r, r["capacity"]) for r in runs]
        at_knee = [_level(r, r.get("knee")) or _last(r) for r in runs]
        costs = [c for lv in at_cap if lv is not None and (c := _cost(lv)) is not None]
        rows.append(
            {
                "nodes": nodes,
                "workers": workers,
                "node_cpus": node_cpus,
                "caller_cpus": caller_cpus,
                "cpu_limit": runs[0].get("settings", {}).get("cpu_limit", {}).get("method"),
                "capacities": caps,
                "capacity": statistics.median(caps),
                "valid": [bool(r.get("valid", True)) for r in runs],
                "cpu_s_per_call_s": round(statistics.median(costs), 3) if costs else None,
                "calls_per_node_at_capacity": [
                    [n["calls_peak"] for n in lv["nodes"]] if lv else [] for lv in at_cap
                ],
                "knees": [r.get("knee") for r in runs],
                "node_use_at_knee": [
                    [n["busy_of_share"] for n in lv["nodes"]] if lv else [] for lv in at_knee
                ],
                "node_cpus_at_knee": [[n["busy_cpus"] for n in lv["nodes"]] if lv else [] for lv in at_knee],
                "node_throttled_at_knee": [
                    [n["throttled"] for n in lv["nodes"]] if lv else [] for lv in at_knee
                ],
                "caller_use_at_knee": [
                    (lv.get("caller") or {}).get("busy_of_share") if lv else None for lv in at_knee
                ],
            }
        )
    ratios = {}
    for row in rows:
        for field_, label in (("nodes", "nodes"), ("workers", "workers")):
            if row[field_] == 1:
                continue
            base = next(
                (
                    b
                    for b in rows
                    if b[field_] == 1
                    and all(
                        b[k] == row[k]
                        for k in ("nodes", "workers", "node_cpus", "caller_cpus")
                        if k != field_
                    )
                ),
                None,
            )
            if base is not None and base["capacity"]:
                name = f"{label} {row[field_]} / 1" + (
                    f" (workers {row['workers']})" if field_ == "nodes" else ""
                )
                ratios[name] = round(row["capacity"] / base["capacity"], 2)
    return {"configurations": rows, "ratios": ratios}


def _level(report: dict[str, Any], concurrency: object) -> dict[str, Any] | None:
    return next((lv for lv in report.get("levels", []) if lv["concurrency"] == concurrency), None)


def _last(report: dict[str, Any]) -> dict[str, Any] | None:
    levels = report.get("levels", [])
    return levels[-1] if levels else None


def _cost(level: dict[str, Any]) -> float | None:
    """CPU-seconds per call-second over all nodes of a level (nodes without calls add their idle CPU)."""
    nodes = level.get("nodes", [])
    call_s = sum(n["call_s"] for n in nodes)
    return sum(n["cpu_s"] for n in nodes) / call_s if call_s > 0 else None


def summary_text(summary: dict[str, Any]) -> str:
    lines = []
    for row in summary["configurations"]:
        shares = (
            f"node {_num(row['node_cpus'])} CPU, caller {_num(row['caller_cpus'])} CPU ({row['cpu_limit']})"
            if row["node_cpus"] or row["caller_cpus"]
            else "unlimited (the whole machine, caller included)"
        )
        lines.append(
            f"nodes {row['nodes']}, workers {row['workers']}, {shares}: capacity "
            f"{', '.join(map(str, row['capacities']))} (median {row['capacity']:g}), valid "
            f"{', '.join('yes' if v else 'NO' for v in row['valid'])}, "
            f"{_num(row['cpu_s_per_call_s'])} CPU-s per call-second"
        )
        for i, calls in enumerate(row["calls_per_node_at_capacity"]):
            knee = row["knees"][i]
            where = f"the knee ({knee} calls)" if knee else "the last level"
            if row["node_cpus"]:
                use = "/".join(_pct(u) for u in row["node_use_at_knee"][i])
                throttled = "/".join(_pct(u) for u in row["node_throttled_at_knee"][i])
                used = f"nodes used {use} of their share, throttled in {throttled} of periods"
            else:
                used = f"nodes used {'/'.join(_num(u) for u in row['node_cpus_at_knee'][i])} CPU"
            lines.append(
                f"  run {i + 1}: calls per node at capacity {'/'.join(map(str, calls)) or '-'}; at {where} "
                f"{used}; caller {_pct(row['caller_use_at_knee'][i])} of its share"
            )
    for name, ratio in summary["ratios"].items():
        lines.append(f"capacity ratio {name}: {ratio:.2f}")
    costs = [r["cpu_s_per_call_s"] for r in summary["configurations"] if r["cpu_s_per_call_s"]]
    if costs:
        cost = statistics.median(costs)
        lines.append(
            f"projection: {cost:.3f} CPU-s per call-second, so a node carries about 0.7 x cores / {cost:.3f} "
            f"= {0.7 / cost:.1f} calls per core (0.7: LiveKit's sysload_limit)"
        )
    return "\n".join(lines)


def _pct(v: object) -> str:
    return "-" if not isinstance(v, float | int) else f"{v:.0%}"


def _num(v: object) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float | int) else str(v)
