"""This server as a node: its name, its address for other nodes, its registry, and draining."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from ..cluster.backends import RegistryError, backend_kind, open_backend
from ..cluster.load import available_cpus
from ..cluster.node import ClusterNode
from ..cluster.records import check_node_id
from ..settings import Settings
from .keys import METRICS, NODE, REALTIME, SESSIONS, SETTINGS
from .ops import transport_name
from .sessions import VoiceSession

log = logging.getLogger(__name__)

__all__ = [
    "RegistryError",
    "check_node_url",
    "cluster_ctx",
    "create_node",
    "drain",
    "machine_address",
    "node_identity",
    "watch_sessions",
]


def machine_address() -> str:
    """This machine's address on its default route (no packet is sent), else 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routable, never answered
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def default_node_id(port: int) -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-.") or "node"
    return f"{host[:80]}-{port}"


def default_node_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::", "*"):
        host = machine_address()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def node_identity(settings: Settings) -> tuple[str, str]:
    """(node id, node URL) from the settings; ValueError, with the fix, for cluster settings that
    cannot work. Cheap: checked before the models load."""
    node_id = settings.node_id.strip() or default_node_id(settings.port)
    check_node_id(node_id)
    url = settings.node_url.strip() or default_node_url(settings.host, settings.port)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"node_url {url!r} must be http://HOST:PORT, the address other nodes reach this one at"
        )
    cluster_url = settings.cluster_url.strip()
    if cluster_url and backend_kind(cluster_url) == "redis" and not settings.database_url.strip():
        raise ValueError(
            "cluster_url is a Redis registry for nodes on many machines, but threads are in SQLite "
            f"({settings.db_path}), a file one machine holds: set database_url=postgresql://... so every "
            "node reads and writes the same threads (cluster_url=file:///DIR is for nodes on one machine)"
        )
    return node_id, url


def create_node(app: web.Application) -> ClusterNode:
    """This app's node (ValueError as ``node_identity``); it registers when the app starts."""
    settings = app[SETTINGS]
    node_id, url = node_identity(settings)
    cluster_url = settings.cluster_url.strip()

    def count_calls() -> int:
        return (len(app[SESSIONS]) if SESSIONS in app else 0) + len(app[REALTIME])

    return ClusterNode(
        node_id=node_id,
        url=url,
        backend=open_backend(cluster_url) if cluster_url else None,
        max_calls=settings.max_sessions,
        load_threshold=settings.load_threshold,
        count_calls=count_calls,
        cpus=settings.node_cpus or available_cpus(),
    )


async def cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    """Register (RegistryError when the registry cannot be reached), then leave it at shutdown."""
    node = app[NODE]
    await node.start()
    yield
    await node.stop()


def watch_sessions(app: web.Application) -> None:
    """The node claims each session opened here and records how each ended; metrics count calls."""
    node, registry, metrics = app[NODE], app[SESSIONS], app[METRICS]
    registry.id_prefix = node.session_prefix
    registry.on_open.append(lambda session: node.claim(session.id))
    registry.on_attach.append(lambda session, peer: metrics.call_started(transport_name(peer)))

    def closed(session: VoiceSession, reason: str) -> None:
        node.release(session.id, reason, session.user_id)
        if session.peer is not None:  # a call, not a session that was never dialled
            metrics.call_ended(reason)

    registry.on_close.append(closed)


async def check_node_url(node: ClusterNode, timeout_s: float = 5.0) -> None:
    """ValueError unless this node answers at the URL it gives other nodes (its /livez names it)."""
    if not node.clustered:
        return
    problem = ""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as client:
            async with client.get(f"{node.url}/livez") as reply:
                data = await reply.json(content_type=None) if reply.status == 200 else {}
                if not isinstance(data, dict) or data.get("node") != node.id:
                    problem = f"it answered {reply.status} as {data.get('node') if isinstance(data, dict) else None!r}"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        problem = str(exc) or "timed out"
    if problem:
        raise ValueError(
            f"node_url {node.url} does not reach this node ({problem}): other nodes could not pass it "
            "requests for its calls. Set node_url (RTCVOICE_NODE_URL) to an address they can reach."
        )


async def drain(app: web.Application, timeout_s: float, stop_now: asyncio.Event) -> None:
    """Take no new calls; let running ones finish for up to ``timeout_s`` (or until ``stop_now``),
    then end the rest with reason ``drain`` so their clients reconnect elsewhere on their thread.

    The WebSockets this node relays to other nodes' calls are waited for too: the client's call
    runs through this node, and ends when its socket here closes."""
    from .app import close_calls
    from .routing import close_relayed_sockets, relayed_sockets

    node = app[NODE]
    await node.drain()
    deadline = time.monotonic() + timeout_s
    stopped = asyncio.ensure_future(stop_now.wait())
    try:
        while (node.calls() or relayed_sockets(app)) and not stopped.done():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait({stopped}, timeout=min(0.5, left))
    finally:
        stopped.cancel()
    if node.calls():
        log.info("node %s: ending %d calls (drain)", node.id, node.calls())
        await close_calls(app, "drain")
    await close_relayed_sockets(app)
