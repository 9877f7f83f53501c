"""Real processes for tests/test_cluster.py: Redis, HAProxy, ``rtcvoice serve`` nodes, one model pool.

Every child is started from the main thread through ``setpriv --pdeathsig KILL`` (when the
system has it), as tests/pg.py does for PostgreSQL: a test run that dies takes them with it.
Each writes its output to a log file in the test's temp folder; a failed wait shows its tail.

The model pool (an OpenAI-compatible chat server and an OpenAI-compatible speech server, from
tests/fake_openai.py and tests/fake_speech_servers.py) runs on a thread of its own, so it
answers the nodes whatever the test's event loop is doing. All nodes use it: nodes load no
local model, so they start in about a second.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import redis.asyncio as aioredis
from fake_openai import FakeOpenAI
from fake_speech_servers import FakeOpenAISpeech
from redis.exceptions import RedisError

from rtcvoice.cluster.workers import free_ports

API = "/api/v1/voice"
ROOT = Path(__file__).resolve().parent.parent
SPOKEN_TRANSCRIPT = "what is the capital of france"  # what the pool's STT hears in any audio
NODE_START_TIMEOUT_S = 60.0

T = TypeVar("T")


# -- small helpers ----------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """This environment without rtcvoice or OpenAI settings: the flags alone configure a node."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RTCVOICE_", "OPENAI_"))}


def _with_death_signal(argv: Sequence[str]) -> list[str]:
    setpriv = shutil.which("setpriv")
    # setpriv execs the command: the pid stays the child's own, so signals reach it directly.
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else list(argv)


def spawn(argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """A child process writing to ``log_path``. Call from the main thread: the death signal
    belongs to the thread that forks."""
    with open(log_path, "ab") as log:
        log.write(f"\n==> {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            _with_death_signal(argv),
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path | None = None) -> int:
    """The exit code of ``proc`` once it exits; AssertionError (with its log) if it does not in time."""
    try:
        return await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{what} did not exit within {timeout:.0f} s" + (f"; its log:\n{tail(log)}" if log else "")
        ) from None


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


PROBE_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, RedisError, ValueError, KeyError)


async def wait_until(
    probe: Callable[[], Awaitable[T]], timeout: float, what: str, *, interval: float = 0.1
) -> T:
    """Poll ``probe`` until it returns something truthy (returned); AssertionError after ``timeout``.

    Connection errors and the like count as "not yet"; an AssertionError inside fails at once.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = await probe()
            if value:
                return value
            last = value
        except PROBE_ERRORS as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")
        await asyncio.sleep(interval)


def new_http() -> aiohttp.ClientSession:
    """A client that opens a new connection per request, so the balancer places each one."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=30)
    )


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def post_json(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


# -- the shared model pool -------------------------------------------------------------------------


class ModelPool:
    """One chat server and one speech (STT + TTS) server for every node, on a thread of its own.

    The chat model answers "You said <the user's last message>." so each reply names its turn.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="model-pool", daemon=True)
        self.chat: FakeOpenAI | None = None
        self.speech: FakeOpenAISpeech | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    @staticmethod
    def _reply(messages: list[dict[str, Any]]) -> str:
        last = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        return f"You said {str(last.get('content', '')).strip()}."

    def start(self) -> ModelPool:
        self._thread.start()

        async def start_servers() -> tuple[FakeOpenAI, FakeOpenAISpeech]:
            chat = await FakeOpenAI(self._reply).start()
            speech = await FakeOpenAISpeech(transcript=SPOKEN_TRANSCRIPT).start()
            return chat, speech

        self.chat, self.speech = self._run(start_servers())
        return self

    def close(self) -> None:
        async def close_servers() -> None:
            if self.chat is not None:
                await self.chat.close()
            if self.speech is not None:
                await self.speech.close()

        try:
            self._run(close_servers())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def settings(self) -> dict[str, str]:
        """The settings that put every engine on this pool (no local model is loaded)."""
        assert self.chat is not None and self.speech is not None
        return {
            "agent": "openai",
            "openai_base_url": self.chat.base_url,
            "llm_model": "fake",
            "stt": "openai",
            "tts": "openai",
            "tts_base_url": self.speech.base_url,
        }

    def node_args(self) -> list[str]:
        """The same as ``rtcvoice serve`` flags."""
        return [arg for k, v in self.settings().items() for arg in ("--" + k.replace("_", "-"), v)]

    def chat_requests(self) -> list[list[dict[str, Any]]]:
        """The messages of every chat request the pool has answered, oldest first."""
        assert self.chat is not None
        return [list(r.get("messages", [])) for r in list(self.chat.requests)]

    def asked(self, text: str) -> bool:
        """Whether a chat request's last user message contained ``text``."""
        for messages in self.chat_requests():
            users = [m for m in messages if m.get("role") == "user"]
            if users and text in str(users[-1].get("content", "")):
                return True
        return False

    @property
    def transcriptions(self) -> int:
        assert self.speech is not None
        return len(self.speech.transcriptions)

    @property
    def syntheses(self) -> int:
        assert self.speech is not None
        return len(self.speech.speech_requests)


# -- Redis ---------------------------------------------------------------------------------------


class RedisServer:
    """redis-server on a free port, in memory only (no RDB, no AOF): a restart starts it empty."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_ports()
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> aioredis.Redis:
        return aioredis.Redis(
            host="127.0.0.1", port=self.port, db=db, socket_timeout=2.0, socket_connect_timeout=2.0
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = spawn(argv, self.log)
        client = self.client()
        try:
            await wait_until(client.ping, 20, f"redis-server on port {self.port} answers PING")
        finally:
            await client.aclose()

    def kill(self) -> None:
        stop(self.proc, signal.SIGKILL)


# -- HAProxy ---------------------------------------------------------------------------------------


class HAProxy:
    """HAProxy in front of the nodes, as deploy/haproxy/haproxy.cfg puts it: least connections,
    health checks on /readyz, no stickiness. Its stats page tells which servers it sends to."""

    BACKEND = "nodes"

    def __init__(self, workdir: Path, servers: dict[str, int]) -> None:
        self.workdir = workdir
        self.servers = servers
        self.port = free_ports()
        self.stats_port = free_ports()
        self.log = workdir / "haproxy.log"
        self.cfg = workdir / "haproxy.cfg"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        lines = [
            "global",
            "    maxconn 2000",
            "defaults",
            "    mode http",
            "    timeout connect 2s",
            "    timeout client 60s",
            "    timeout server 60s",
            "    timeout tunnel 1h",
            "frontend rtcvoice",
            f"    bind 127.0.0.1:{self.port}",
            "    option forwardfor",
            f"    default_backend {self.BACKEND}",
            f"backend {self.BACKEND}",
            "    balance leastconn",
            "    option httpchk GET /readyz",
            "    http-check expect status 200",
            *(
                f"    server {name} 127.0.0.1:{port} check inter 500ms fall 2 rise 2"
                for name, port in self.servers.items()
            ),
            "listen stats",
            f"    bind 127.0.0.1:{self.stats_port}",
            "    stats enable",
            "    stats uri /stats",
        ]
        return "\n".join(lines) + "\n"

    async def start(self) -> None:
        self.cfg.write_text(self.config())
        self.proc = spawn(["haproxy", "-f", str(self.cfg), "-db"], self.log)
        async with new_http() as http:
            await wait_until(lambda: self.states(http), 20, "HAProxy answers on its stats page")

    async def states(self, http: aiohttp.ClientSession) -> dict[str, str]:
        """Each server's state as HAProxy sees it: UP, DOWN, or on its way ("UP 1/2", "DOWN 1/2")."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited ({self.proc.returncode}); its log:\n{tail(self.log)}")
        async with http.get(f"http://127.0.0.1:{self.stats_port}/stats;csv") as resp:
            text = await resp.text()
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row.get("pxname") == self.BACKEND and row.get("svname") not in ("FRONTEND", "BACKEND")
        }

    def stop(self) -> None:
        stop(self.proc, signal.SIGTERM)


# -- nodes --------------------------------------------------------------------------------------------


class Node:
    """One ``rtcvoice serve`` process: node id ``name``, HTTP on 127.0.0.1:``port``."""

    def __init__(self, name: str, port: int, args: Sequence[str], workdir: Path) -> None:
        self.id = name
        self.port = port
        self.args = list(args)
        self.extra: list[str] = []  # flags of the current run on top of ``args``
        self.log = workdir / f"node-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, extra: Sequence[str] = ()) -> None:
        assert not self.running, f"node {self.id} is already running"
        self.extra = list(extra)
        argv = [sys.executable, "-m", "rtcvoice", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = spawn([*argv, "--node-id", self.id, *self.args, *self.extra], self.log)

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = NODE_START_TIMEOUT_S) -> None:
        async def ready() -> bool:
            if not self.running:
                raise AssertionError(f"node {self.id} exited while starting; its log:\n{tail(self.log)}")
            status, data = await get_json(http, f"{self.url}/readyz")
            return status == 200 and data.get("node") == self.id

        await wait_until(ready, timeout, f"node {self.id} ready on {self.url}")

    async def status(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """Its own ``/api/v1/voice/status`` (never relayed: status is not a call's request)."""
        code, data = await get_json(http, f"{self.url}{API}/status")
        assert code == 200, data
        assert data["node"]["id"] == self.id, data["node"]
        return dict(data)

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"node {self.id} is not running"
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await wait_exit(self.proc, timeout, f"node {self.id}", self.log)

    async def stop(self) -> None:
        """SIGINT (end every call now) and wait; SIGKILL if it hangs."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.to_thread(self.proc.wait, 20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)


# -- the cluster ----------------------------------------------------------------------------------


class Cluster:
    """Redis + three nodes sharing PostgreSQL and the model pool + HAProxy in front of them."""

    def __init__(self, workdir: Path, database_url: str, pool: ModelPool, size: int = 3) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.pool = pool
        self.redis = RedisServer(workdir)
        self.http = new_http()
        self.nodes = [Node(f"n{k + 1}", free_ports(), self.node_args(), workdir) for k in range(size)]
        self.lb = HAProxy(workdir, {n.id: n.port for n in self.nodes})
        self.registry = self.redis.client()

    def node_args(self, *, redis_db: int = 0) -> list[str]:
        return [
            "--cluster-url",
            self.redis.url(redis_db),
            "--database-url",
            self.database_url,
            *self.pool.node_args(),
            "--log-level",
            "INFO",
        ]

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    def others(self, node_id: str) -> list[Node]:
        return [n for n in self.nodes if n.id != node_id]

    async def start(self) -> None:
        await self.redis.start()
        for node in self.nodes:
            node.start()
        await asyncio.gather(*(n.wait_ready(self.http) for n in self.nodes))
        await self.lb.start()
        await self.heal()

    async def heal(self) -> None:
        """Everything up again as the module started it, after a test that killed or drained a part:
        Redis answering, every node running with its usual flags, registered, and in HAProxy's rotation."""
        if not self.redis.running:
            await self.redis.start()
        for node in self.nodes:
            if node.running and node.extra:
                await node.stop()  # started with a test's own flags: back to the usual ones
            if not node.running:
                node.start()
        await asyncio.gather(*(n.wait_ready(self.http) for n in self.nodes))

        async def registered() -> bool:
            return all([await self.node_record(n.id) is not None for n in self.nodes])

        await wait_until(registered, 20, "every node registered in Redis")
        await self.wait_in_rotation([n.id for n in self.nodes])

    async def wait_in_rotation(self, node_ids: Sequence[str], timeout: float = 20.0) -> None:
        async def up() -> bool:
            states = await self.lb.states(self.http)
            return all(states.get(i) == "UP" for i in node_ids)

        await wait_until(up, timeout, f"HAProxy sends to {', '.join(node_ids)}")

    async def wait_out_of_rotation(self, node_id: str, timeout: float = 20.0) -> None:
        async def down() -> bool:
            return (await self.lb.states(self.http)).get(node_id) == "DOWN"

        await wait_until(down, timeout, f"HAProxy stops sending to {node_id}")

    # -- what Redis says ----------------------------------------------------------------------------
    async def session_value(self, session_id: str) -> dict[str, Any] | None:
        raw = await self.registry.get(f"rtcvoice:session:{session_id}")
        return json.loads(raw) if raw is not None else None

    async def owner(self, session_id: str) -> str:
        """The node Redis names as holding a live session (waits briefly for the claim)."""

        async def named() -> str | None:
            value = await self.session_value(session_id)
            return value.get("node") if value else None

        return await wait_until(named, 10, f"Redis names the owner of session {session_id}")

    async def node_record(self, node_id: str, client: aioredis.Redis | None = None) -> dict[str, Any] | None:
        raw = await (client or self.registry).get(f"rtcvoice:node:{node_id}")
        return json.loads(raw) if raw is not None else None

    async def sessions(self) -> dict[str, int]:
        """Each node's live session count, from its own /status."""
        return {n.id: (await n.status(self.http))["sessions"] for n in self.nodes}

    async def close(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes))
        self.lb.stop()
        await self.registry.aclose()
        await self.http.close()
        self.redis.kill()
