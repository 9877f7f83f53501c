"""Any node answers any request: new calls go where there is room, a call's requests to its owner.

- Starting a call (``session/start``, the AI service's start, the realtime and audio-chat
  sockets, which start their call on connect): taken here when this node has room, else relayed
  to the emptiest serving node (scale.md §3.3, LiveKit's node selector).
- A call's own requests (offer, end, its WebSockets): answered here when the call is here, else
  relayed to the node that holds it; a call whose node is gone answers 410 ``session_lost``.

A relayed request carries ``HOP_HEADER`` and is always answered by the node it reaches, so a
request is relayed at most once. Socket.IO stays on the node it reaches (its long-polling
transport spans requests; its calls are text-only and cheap).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from ..cluster.proxy import HOP_HEADER, RelayError, relay_http, relay_websocket
from ..cluster.records import Ended, Lost, NodeRecord, Owner
from .ai_service import INTERNAL
from .audio_chat import AUDIO_CHAT
from .auth import request_user
from .errors import ApiError, Handler
from .fallback import REALTIME_PATH, VOICE
from .keys import NODE, SESSIONS
from .urls import public_base

log = logging.getLogger(__name__)

START_PATHS = frozenset({f"{VOICE}/session/start", f"{INTERNAL}/session/start"})
END_PATHS = frozenset({f"{VOICE}/session/end", f"{INTERNAL}/session/end"})
# Sockets whose call starts when they open (no session/start first).
OPENING_SOCKETS = (REALTIME_PATH, AUDIO_CHAT)
WS_MAX_MESSAGE = 4 * 1024 * 1024

RELAY_CLIENT = web.AppKey("relay_client", aiohttp.ClientSession)
# Clients' WebSockets this node pipes to the node holding their call. Their calls are not this
# node's (no load, no slot here), but each one runs through this node: a drain waits for them as
# for its own calls, then closes them, or aiohttp's shutdown would wait a minute or more for their
# handlers before cutting them (close_relayed_sockets).
RELAYED_SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("relayed_sockets")


async def relay_client_ctx(app: web.Application) -> AsyncIterator[None]:
    """One pooled client for node-to-node requests (keep-alive between nodes)."""
    client = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30), auto_decompress=True
    )
    app[RELAY_CLIENT] = client
    app[RELAYED_SOCKETS] = set()
    yield
    await close_relayed_sockets(app)
    await client.close()


def relayed_sockets(app: web.Application) -> int:
    """How many clients' WebSockets this node is piping to other nodes now."""
    return len(app[RELAYED_SOCKETS]) if RELAYED_SOCKETS in app else 0


async def close_relayed_sockets(app: web.Application) -> None:
    """Close every relayed WebSocket (1001 going away, on both sides): the client reconnects."""
    relayed: set[web.WebSocketResponse] = app[RELAYED_SOCKETS] if RELAYED_SOCKETS in app else set()
    sockets = tuple(relayed)
    if sockets:
        log.info("closing %d relayed WebSockets", len(sockets))
    await asyncio.gather(
        *(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"node shutting down") for ws in sockets),
        return_exceptions=True,
    )


@web.middleware
async def cluster_routing(request: web.Request, handler: Handler) -> web.StreamResponse:
    node = request.app[NODE]
    if not node.clustered:
        return await handler(request)
    path = request.path
    if path in START_PATHS:
        if HOP_HEADER in request.headers or node.has_room() or (target := await node.place()) is None:
            # Here (relayed here, or nowhere emptier: this node takes it or says it is full). The
            # claim is written before the reply, so the offer finds this node whichever it reaches.
            return await _settled(handler)(request)
        return await _relay(request, target, fallback=_settled(handler))
    if HOP_HEADER in request.headers:
        return await handler(request)
    if _opens_call(path) and _is_websocket(request):
        if node.has_room() or (target := await node.place()) is None:
            return await handler(request)
        return await _relay(request, target, fallback=handler)
    session_id = request.match_info.get("session_id")
    if session_id is None and path in END_PATHS and request.method == "POST":
        session_id = await _body_session_id(request)
    if session_id is None or request.app[SESSIONS].get(session_id) is not None:
        return await handler(request)
    found = await node.lookup(session_id)
    if isinstance(found, Owner):
        try:
            return await _relay(request, found.node)
        except RelayError as exc:
            log.warning("session %s: its node %s cannot be reached: %s", session_id[:64], found.node.id, exc)
            raise _lost(found.node.id) from None
    if isinstance(found, Lost):
        raise _lost(found.node_id)
    if isinstance(found, Ended) and path == f"{VOICE}/session/end":
        user = request_user(request)
        if user is None or found.user_id == user:
            return web.json_response(
                {
                    "session_id": session_id,
                    "ended": True,
                    "message": "Session ended successfully",
                    "reason": found.reason,
                }
            )
    return await handler(request)  # unknown or ended: the route says so in its own words


def _settled(handler: Handler) -> Handler:
    async def settled(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        await request.app[NODE].settle()
        return response

    return settled


def _opens_call(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OPENING_SOCKETS) and not path.endswith(
        ("/status", "/health")
    )


def _is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


async def _body_session_id(request: web.Request) -> str | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    value = body.get("session_id") if isinstance(body, dict) else None
    return value if isinstance(value, str) else None


async def _relay(
    request: web.Request, target: NodeRecord, *, fallback: Handler | None = None
) -> web.StreamResponse:
    app = request.app
    node = app[NODE]
    base = public_base(request)  # a client's own X-Rtcvoice-Public-Base is not taken: it is not relayed
    try:
        if _is_websocket(request):
            return await relay_websocket(
                request,
                target.url,
                app[RELAY_CLIENT],
                node_id=node.id,
                public_base=base,
                max_msg_size=WS_MAX_MESSAGE,
                open_sockets=app[RELAYED_SOCKETS],
            )
        return await relay_http(request, target.url, app[RELAY_CLIENT], node_id=node.id, public_base=base)
    except RelayError as exc:
        if fallback is None:
            raise
        # A new call: the chosen node went away since it last reported; take the call here.
        log.warning("node %s unreachable for a new call (%s); taking it here", target.id, exc)
        return await fallback(request)


def _lost(node_id: str) -> ApiError:
    return ApiError(
        410,
        "session_lost",
        f"The node that held this call ({node_id}) is gone, and the call with it. Start a new session "
        "with the same thread_id to continue the conversation.",
    )
