"""``rtcvoice serve --workers N``: N node processes on one machine behind the one port.

Every worker listens on the public port with SO_REUSEPORT (the kernel spreads connections) and
on a port of its own, where the other workers pass it the requests for its calls. They find each
other through a registry folder the parent makes (``file://``), or the configured Redis. The
parent loads no models and holds no calls: it starts the workers, restarts one that dies, and
passes SIGTERM (drain) and SIGINT (stop now) on to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from .load import available_cpus

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # the first start may load models from a cold disk
CRASH_WINDOW_S = 30.0
PR_SET_PDEATHSIG = 1  # a worker that dies sooner than this after starting is not restarted again


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM it (drain) if the parent dies, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: an orphaned worker is stopped by hand


def worker_count(raw: str) -> int:
    """ValueError, with the fix, unless ``raw`` is a positive number or ``auto``."""
    value = raw.strip().lower()
    if value == "auto":
        return max(1, int(available_cpus()))
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"workers {raw!r} must be a number of processes (1 or more) or auto")
    return count


def _first_ephemeral_port() -> int:
    """Where the range the kernel gives outgoing connections their local ports from begins."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_ports(count: int = 1, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive ports free on ``host`` now (worker K listens on P + K).

    Taken below the ephemeral range where it can be: a port the kernel hands out for a bind to
    port 0 may next go to an outgoing connection (a health check, an HTTP client) before the
    worker that is to listen on it has started, and the worker then cannot bind it.
    """
    low = _first_ephemeral_port()
    for attempt in range(200):
        if attempt < 100 and low - count > 10_000:
            first = random.randrange(10_000, low - count)
        else:
            with socket.socket() as s:
                s.bind((host, 0))
                first = int(s.getsockname()[1])
        if first + count > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    stack.enter_context(socket.socket()).bind((host, port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports on {host or 'any address'}")


@dataclass
class Worker:
    index: int
    node_id: str
    node_url: str
    node_port: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0


class Supervisor:
    def __init__(
        self,
        serve_argv: list[str],
        *,
        count: int,
        node_id: str,
        node_host: str,
        node_port: int,
        listen_host: str,
        cluster_url: str,
        node_cpus: float,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.serve_argv = [*serve_argv, *extra_args]
        self._own_dir: Path | None = None
        if not cluster_url:
            shm = Path("/dev/shm")
            self._own_dir = Path(
                tempfile.mkdtemp(prefix="rtcvoice-workers-", dir=shm if shm.is_dir() else None)
            )
            cluster_url = f"file://{self._own_dir}"
        self.cluster_url = cluster_url
        self.node_cpus = node_cpus or max(0.1, available_cpus() / count)
        bind = "127.0.0.1" if listen_host in ("", "localhost") else listen_host
        self.workers = []
        for k in range(count):
            port = (
                node_port + k if node_port else free_ports(1, bind if bind not in ("0.0.0.0", "::") else "")
            )
            host = f"[{node_host}]" if ":" in node_host else node_host
            self.workers.append(Worker(k, f"{node_id}-w{k}", f"http://{host}:{port}", port))
        self._stopping = False

    def _argv(self, worker: Worker) -> list[str]:
        # Later flags win in argparse: these override whatever the user passed for the parent.
        return [
            sys.executable,
            "-m",
            "rtcvoice",
            "serve",
            *self.serve_argv,
            "--workers=1",
            f"--node-id={worker.node_id}",
            f"--node-url={worker.node_url}",
            f"--cluster-url={self.cluster_url}",
            f"--node-cpus={self.node_cpus}",
            f"--worker-port={worker.node_port}",
        ]

    async def _spawn(self, worker: Worker) -> None:
        # Its own session: a signal to the parent's process group (Ctrl-C, `kill %job`, systemd's
        # control-group kill) reaches the workers once, through the parent, not twice (a second
        # SIGTERM ends every call at once). The parent's death still takes them along.
        worker.process = await asyncio.create_subprocess_exec(
            *self._argv(worker), start_new_session=True, preexec_fn=_die_with_parent
        )
        worker.started = time.monotonic()

    async def _ready(self, worker: Worker) -> bool:
        """Wait until the worker answers /livez; False if it exited first."""
        assert worker.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as client:
            while time.monotonic() < deadline:
                if worker.process.returncode is not None:
                    return False
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with client.get(f"{worker.node_url}/livez") as reply:
                        if reply.status == 200:
                            return True
                await asyncio.sleep(0.2)
        return False

    def signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    async def run(self) -> int:
        """Until every worker has exited after a signal; 2 if the workers cannot start."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._stop, signal.SIGINT)
        try:
            # One worker first: a setting that cannot work is reported once, not N times, and the
            # models' files are warm in the page cache for the others.
            await self._spawn(self.workers[0])
            if not await self._ready(self.workers[0]):
                self.signal_all(signal.SIGINT)
                code = await self.workers[0].process.wait() if self.workers[0].process else 2
                return code or 2
            await asyncio.gather(*(self._spawn(w) for w in self.workers[1:]))
            ready = await asyncio.gather(*(self._ready(w) for w in self.workers[1:]))
            if not all(ready):
                log.error("a worker could not start; stopping the others")
                self.signal_all(signal.SIGINT)
                await self._wait_all()
                return 2
            log.info(
                "%d workers serving (%s); registry %s",
                len(self.workers),
                ", ".join(w.node_id for w in self.workers),
                self.cluster_url,
            )
            return await self._watch()
        finally:
            if not self._stopping:  # an error in the parent: the workers must not outlive it
                self.signal_all(signal.SIGKILL)
            await self._wait_all()
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGINT)
            if self._own_dir is not None:
                shutil.rmtree(self._own_dir, ignore_errors=True)

    def _stop(self, sig: int) -> None:
        if self._stopping and sig == signal.SIGTERM:
            sig = signal.SIGINT  # a second SIGTERM: end every call now
        self._stopping = True
        log.info("workers: passing %s on", signal.Signals(sig).name)
        self.signal_all(sig)

    async def _wait_all(self) -> None:
        await asyncio.gather(*(w.process.wait() for w in self.workers if w.process is not None))

    async def _watch(self) -> int:
        """Restart a worker that dies; return once all have exited after a signal."""
        while True:
            waits = {
                asyncio.ensure_future(w.process.wait()): w for w in self.workers if w.process is not None
            }
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if self._stopping:
                await self._wait_all()
                codes = [w.process.returncode for w in self.workers if w.process is not None]
                return max((c for c in codes if c is not None and c > 0), default=0)
            for task in done:
                worker = waits[task]
                code = task.result()
                if time.monotonic() - worker.started < CRASH_WINDOW_S:
                    log.error(
                        "worker %s exited (%s) %.0f s after it started: stopping",
                        worker.node_id,
                        code,
                        time.monotonic() - worker.started,
                    )
                    self._stopping = True
                    self.signal_all(signal.SIGINT)
                    await self._wait_all()
                    return 1
                log.error(
                    "worker %s exited (%s); starting it again (its calls are lost)", worker.node_id, code
                )
                await self._spawn(worker)


def node_host_for(listen_host: str, node_url: str, clustered_across_machines: bool, machine: str) -> str:
    """The host other workers (and nodes) reach the workers at."""
    if node_url:
        from urllib.parse import urlsplit

        return urlsplit(node_url).hostname or "127.0.0.1"
    if listen_host in ("", "0.0.0.0", "::", "*"):
        return machine if clustered_across_machines else "127.0.0.1"
    return listen_host
