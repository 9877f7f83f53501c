"""Pass a request to the node that owns its call: plain HTTP, or a WebSocket piped both ways.

The client never learns a node's address: the node it reached relays (LiveKit's "signaling
bridge", scale.md §3.3), so the load balancer in front needs no affinity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

# Set on every relayed request: the node that receives one answers it itself, never relays it again.
HOP_HEADER = "X-Rtcvoice-Relayed-By"
# The public base URL the client used, so the owner builds ws_url for the client, not for the relay.
BASE_HEADER = "X-Rtcvoice-Public-Base"

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
}
_WS_HANDSHAKE = {
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
}


class RelayError(Exception):
    """The owner could not be reached (connection refused, reset, timed out)."""


def _request_headers(request: web.Request, node_id: str, public_base: str) -> dict[str, str]:
    headers = {
        k: v
        for k, v in request.headers.items()
        if k.lower() not in _HOP_BY_HOP
        and k.lower() not in _WS_HANDSHAKE
        and k.lower() != "sec-websocket-protocol"
    }
    headers[HOP_HEADER] = node_id
    headers[BASE_HEADER] = public_base
    peer = request.remote or ""
    forwarded = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{forwarded}, {peer}" if forwarded else peer
    return headers


async def relay_http(
    request: web.Request,
    target_url: str,
    client: aiohttp.ClientSession,
    *,
    node_id: str,
    public_base: str,
    timeout_s: float = 60.0,
) -> web.Response:
    """The owner's answer to ``request``; RelayError when the owner cannot be reached."""
    body = await request.read()
    url = target_url.rstrip("/") + request.path_qs
    try:
        async with client.request(
            request.method,
            url,
            data=body if body else None,
            headers=_request_headers(request, node_id, public_base),
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=3.0),
        ) as upstream:
            payload = await upstream.read()
            headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers.pop("Content-Encoding", None)  # aiohttp has already decoded the body
            return web.Response(status=upstream.status, body=payload, headers=headers)
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise RelayError(f"{target_url}: {exc or 'timed out'}") from exc


async def relay_websocket(
    request: web.Request,
    target_url: str,
    client: aiohttp.ClientSession,
    *,
    node_id: str,
    public_base: str,
    max_msg_size: int,
    open_sockets: set[web.WebSocketResponse] | None = None,
) -> web.StreamResponse:
    """Open the same WebSocket on the owner first, then accept the client's and pipe both ways.

    Opening upstream first means a refusal there (401, 404, 503) reaches the client as the same
    HTTP status instead of a socket that opens and closes at once. RelayError when unreachable.
    The client's socket is in ``open_sockets`` while it is piped: closing it there ends the relay
    (the owner's side is then closed with the same code).
    """
    url = target_url.rstrip("/") + request.path_qs
    url = "ws" + url[4:] if url.startswith("http") else url
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    try:
        upstream = await client.ws_connect(
            url,
            headers=_request_headers(request, node_id, public_base),
            protocols=protocols,
            autoping=True,
            heartbeat=None,
            max_msg_size=max_msg_size,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
        )
    except aiohttp.WSServerHandshakeError as exc:
        return web.json_response(
            {
                "error": {
                    "code": "relay_refused",
                    "message": f"The node holding this call refused: {exc.message}",
                }
            },
            status=exc.status or 502,
        )
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise RelayError(f"{target_url}: {exc or 'timed out'}") from exc
    downstream = web.WebSocketResponse(
        protocols=[upstream.protocol] if upstream.protocol else (), max_msg_size=max_msg_size
    )
    try:
        await downstream.prepare(request)
    except BaseException:
        await upstream.close()
        raise
    if open_sockets is not None:
        open_sockets.add(downstream)

    async def pump(source: aiohttp.ClientWebSocketResponse | web.WebSocketResponse, sink: object) -> None:
        assert isinstance(sink, (aiohttp.ClientWebSocketResponse, web.WebSocketResponse))
        async for msg in source:
            if msg.type == WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                break

    to_owner = asyncio.create_task(pump(downstream, upstream), name="relay-to-owner")
    to_client = asyncio.create_task(pump(upstream, downstream), name="relay-to-client")
    try:
        await asyncio.wait({to_owner, to_client}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if open_sockets is not None:
            open_sockets.discard(downstream)
        for task in (to_owner, to_client):
            task.cancel()
        for task in (to_owner, to_client):
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, aiohttp.ClientError):
                await task
        # Each side closes with the code the other side closed with (1000, 1008, 4xxx...).
        code_up = upstream.close_code
        code_down = downstream.close_code
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await downstream.close(code=code_up or aiohttp.WSCloseCode.GOING_AWAY)
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await upstream.close(code=code_down or aiohttp.WSCloseCode.GOING_AWAY)
    return downstream
