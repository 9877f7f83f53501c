"""Socket.IO on the aiohttp app (python-socketio): the voice-session events of socket.io-client apps.

Client -> server: ``start-voice-session`` {userId, chatId}, ``voice-message`` {sessionId,
transcript}, ``end-voice-session`` {sessionId}. Server -> client: ``voice-session-started``
{sessionId, chatId}, ``voice-response`` {messageId, text}, ``error`` {code, message}, and the
extras ``voice-transcript`` and ``voice-session-ended`` {reason}. Any namespace is served: a
socket.io-client given ``http://host/api/v1/`` connects to the namespace ``/api/v1/``.

With auth on, the JWT comes as socket.io-client's ``auth: {token}``, a ``?token=`` query, or an
``Authorization`` header; without a valid one the connection is refused (the client's
``connect_error``). Sessions count toward the same limits as every other call and end when
the socket disconnects.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import socketio
from aiohttp import web

from ..conversation.events import MAX_TEXT_CHARS
from ..transports.socketio_voice import SocketIoPeer
from .auth import bearer_token
from .callers import check_capacity
from .calls import call_limits, prepare_call
from .errors import ApiError
from .keys import AUTH, SESSIONS, SETTINGS, STORE
from .sessions import SessionRegistry
from .threads import thread_for

log = logging.getLogger(__name__)

SOCKETIO = web.AppKey("socketio", socketio.AsyncServer)


@dataclass
class _Connection:
    user_id: str | None
    sessions: set[str] = field(default_factory=set)


def attach_socketio(app: web.Application, origins: frozenset[str]) -> socketio.AsyncServer:
    """Serve Socket.IO at ``/socket.io/`` on ``app``; ``origins`` are the configured CORS origins."""

    def allowed(origin: str | None, environ: dict[str, Any]) -> bool:
        same = f"{environ.get('wsgi.url_scheme', 'http')}://{environ.get('HTTP_HOST', '')}"
        return origin is None or origin == same or "*" in origins or origin in origins

    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        cors_allowed_origins=allowed,
        namespaces="*",
        logger=False,
        engineio_logger=False,
    )
    sio.attach(app, socketio_path="socket.io")
    app[SOCKETIO] = sio
    connections: dict[tuple[str, str], _Connection] = {}

    def error(code: str, message: str, **extra: Any) -> dict[str, Any]:
        return {"code": code, "message": message, **extra}

    async def emit_error(namespace: str, sid: str, code: str, message: str) -> None:
        await sio.emit("error", error(code, message), to=sid, namespace=namespace)

    async def connect(namespace: str, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        authenticator = app[AUTH]
        user = None
        if authenticator is not None:
            token = _token(environ, auth)
            if token is None:
                raise socketio.exceptions.ConnectionRefusedError(
                    error("unauthorized", "Send the JWT as io(url, {auth: {token}}) or ?token=.")
                )
            try:
                user = authenticator.user_id(token)
            except ApiError as exc:
                raise socketio.exceptions.ConnectionRefusedError(error(exc.code, exc.message)) from None
        connections[(namespace, sid)] = _Connection(user)

    async def disconnect(namespace: str, sid: str, *_reason: Any) -> None:
        connection = connections.pop((namespace, sid), None)
        if connection is not None:
            for session_id in list(connection.sessions):
                await app[SESSIONS].end(session_id, "socket_disconnected")

    async def start_voice_session(namespace: str, sid: str, data: Any = None) -> None:
        connection = connections.get((namespace, sid))
        if connection is None:
            return
        body = data if isinstance(data, dict) else {}
        try:
            session_id, thread_id = await _start(app, connection, body, namespace, sid, sio)
        except ApiError as exc:
            await emit_error(namespace, sid, exc.code, exc.message)
            return
        await sio.emit(
            "voice-session-started",
            {"sessionId": session_id, "chatId": thread_id},
            to=sid,
            namespace=namespace,
        )

    async def voice_message(namespace: str, sid: str, data: Any = None) -> None:
        connection = connections.get((namespace, sid))
        body = data if isinstance(data, dict) else {}
        transcript = body.get("transcript")
        peer = _peer(app, connection, body.get("sessionId"))
        if peer is None:
            await emit_error(
                namespace, sid, "session_not_found", "Start a session first (start-voice-session)."
            )
        elif not isinstance(transcript, str) or not transcript.strip() or len(transcript) > MAX_TEXT_CHARS:
            await emit_error(
                namespace,
                sid,
                "invalid_event",
                f"'transcript' must be text of 1 to {MAX_TEXT_CHARS} characters.",
            )
        else:
            await peer.say(transcript)

    async def end_voice_session(namespace: str, sid: str, data: Any = None) -> None:
        connection = connections.get((namespace, sid))
        named = data.get("sessionId") if isinstance(data, dict) else None
        session_id = _own_session(app[SESSIONS], connection, named)
        if connection is not None and session_id is not None:
            connection.sessions.discard(session_id)
            await app[SESSIONS].end(session_id, "client_hangup")

    sio.on("connect", connect, namespace="*")
    sio.on("disconnect", disconnect, namespace="*")
    sio.on("start-voice-session", start_voice_session, namespace="*")
    sio.on("voice-message", voice_message, namespace="*")
    sio.on("end-voice-session", end_voice_session, namespace="*")
    return sio


async def _start(
    app: web.Application,
    connection: _Connection,
    body: dict[str, Any],
    namespace: str,
    sid: str,
    sio: socketio.AsyncServer,
) -> tuple[str, str]:
    settings, registry, store = app[SETTINGS], app[SESSIONS], app[STORE]
    user = connection.user_id
    named = body.get("userId", body.get("user_id"))
    if user is None and isinstance(named, str | int) and not isinstance(named, bool) and str(named):
        user = str(named)[:200]  # unauthenticated mode: the app names its user
    check_capacity(app, user)
    chat_id = body.get("chatId", body.get("chat_id"))
    if chat_id is not None and (not isinstance(chat_id, str | int) or isinstance(chat_id, bool)):
        raise ApiError(400, "invalid_field", "'chatId' must be a string.")
    thread = await thread_for(
        store,
        str(chat_id)[:200] if chat_id is not None else None,
        user,
        create_unknown=settings.create_unknown_threads,
    )
    session = registry.create(user_id=user, thread_id=thread.id)
    make, recorder = await prepare_call(app, session_id=session.id, user_id=user, thread_id=thread.id)

    async def emit(event: str, payload: dict[str, Any]) -> None:
        await sio.emit(event, payload, to=sid, namespace=namespace)

    peer = SocketIoPeer(
        session_id=session.id, make_conversation=make, emit=emit, limits=call_limits(settings)
    )
    registry.attach(session, peer, recorder)
    connection.sessions.add(session.id)
    peer.start()
    return session.id, thread.id


def _own_session(registry: SessionRegistry, connection: _Connection | None, session_id: Any) -> str | None:
    """The connection's live session that ``session_id`` names.

    An id this connection does not hold, on a connection with exactly one live session, means
    that one: socket.io-client reconnects by itself, and a client like seed 000's then starts a
    new session (its connect handler runs again) but goes on sending the first session's id.
    Only the connection's own session can be picked, so no one reaches another connection's.
    """
    if connection is None:
        return None
    # Sessions that ended by their limits (idle, length) are forgotten here too.
    connection.sessions = {s for s in connection.sessions if registry.get(s) is not None}
    if isinstance(session_id, str) and session_id in connection.sessions:
        return session_id
    return next(iter(connection.sessions)) if len(connection.sessions) == 1 else None


def _peer(app: web.Application, connection: _Connection | None, session_id: Any) -> SocketIoPeer | None:
    session_id = _own_session(app[SESSIONS], connection, session_id)
    if session_id is None:
        return None
    session = app[SESSIONS].get(session_id)
    peer = session.peer if session is not None else None
    return peer if isinstance(peer, SocketIoPeer) else None


def _token(environ: dict[str, Any], auth: Any) -> str | None:
    if isinstance(auth, dict) and isinstance(auth.get("token"), str) and auth["token"]:
        return str(auth["token"])
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if query.get("token"):
        return query["token"][0] or None
    return bearer_token(str(environ.get("HTTP_AUTHORIZATION", "")))


async def socketio_ctx(app: web.Application) -> AsyncIterator[None]:
    """Close Socket.IO's connections at shutdown (the sessions themselves end with the registry)."""
    yield
    sio = app.get(SOCKETIO)
    if sio is not None:
        await sio.shutdown()
