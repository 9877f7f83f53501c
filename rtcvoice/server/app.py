"""The aiohttp application: signaling routes, the session registry and the static web page."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import __version__
from ..engines import Engines, load_engines
from ..engines.base import supports_tools
from ..native_memory import MallocTrimmer
from ..settings import Settings
from ..store import create_store
from ..tools import Toolbox
from ..transports.realtime import RealtimePeer
from ..transports.webrtc import OfferError, RelayUnavailableError, WebRtcPeer
from . import ai_service, ai_voice, audio_chat, chat, fallback, ops
from .auth import Authenticator, auth_middleware, request_user
from .bodies import json_body, optional_str
from .callers import body_user, check_capacity
from .calls import call_limits, prepare_call
from .cors import cors_middleware, parse_origins
from .errors import ApiError, json_errors
from .keys import AUTH, ENGINES, ICE, NODE, REALTIME, SESSIONS, SETTINGS, STORE, TOOLS
from .nodes import cluster_ctx, create_node, watch_sessions
from .options import call_options
from .routing import close_relayed_sockets, cluster_routing, relay_client_ctx
from .sessions import SessionRegistry, VoiceSession, session_for
from .socket_io import attach_socketio, socketio_ctx
from .threads import thread_for
from .turn import IceServers
from .urls import check_public_url, websocket_url

log = logging.getLogger(__name__)

__all__ = ["create_app", "SETTINGS", "ENGINES", "SESSIONS", "ICE", "STORE", "AUTH", "REALTIME"]

API = "/api/v1/voice"
MAX_BODY_BYTES = 256 * 1024  # an SDP offer is a few KB; nothing on these routes needs more
MAX_SDP_CHARS = 64 * 1024


def create_app(settings: Settings, *, engines: Engines | None = None) -> web.Application:
    """The server. Pass ``engines`` to share loaded models between apps (tests); they stay yours to close.

    Raises ValueError, with the fix, for settings that cannot work (ICE servers, auth keys).
    """
    auth = Authenticator.from_settings(settings)
    check_public_url(settings.public_url)
    origins = parse_origins(settings.cors_origins)
    middlewares = [
        json_errors,
        auth_middleware(
            auth,
            internal_token=settings.internal_token,
            open_realtime_user_route=settings.realtime_open_user_route,
        ),
        cluster_routing,  # innermost: a relayed request has been authenticated here and is again there
    ]
    if origins:
        middlewares.insert(0, cors_middleware(origins))  # outermost: errors get the headers too
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[AUTH] = auth
    app[ICE] = IceServers(settings)  # a bad STUN/TURN setting stops the server here, not mid-call
    app[REALTIME] = set()
    app[NODE] = create_node(app)  # a bad cluster setting stops the server here
    ops.install(app)  # metrics, readiness, tracing (a missing OpenTelemetry stops the server here)
    app.cleanup_ctx.append(_engines_ctx(engines))
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_tools_ctx)
    app.cleanup_ctx.append(relay_client_ctx)
    app.cleanup_ctx.append(cluster_ctx)  # leaves the registry after the calls below have ended
    app.cleanup_ctx.append(_sessions_ctx)
    # Calls end when shutdown starts, before aiohttp waits (a minute) for open WebSocket handlers.
    app.on_shutdown.append(_end_calls)
    app.cleanup_ctx.append(socketio_ctx)  # unwinds first: the sockets close, then the registry
    app.add_routes(
        [
            web.get(f"{API}/status", status),
            web.get(f"{API}/health", health),
            web.get(f"{API}/voices", voices),
            web.post(f"{API}/session/start", session_start),
            web.post(f"{API}/session/{{session_id}}/offer", session_offer),
            web.post(f"{API}/session/end", session_end),
            *fallback.routes(),
            *chat.routes(),
            # Other systems' contracts, served as written (README "If you run the system of ...").
            *ai_voice.routes(),
            *ai_service.routes(),
            *audio_chat.routes(),
            *ops.routes(),  # /metrics, /readyz, /livez
        ]
    )
    attach_socketio(app, origins)
    if auth is None:
        log.warning(
            "AUTH IS OFF: anyone who can reach this server can start calls and read threads. "
            "Set RTCVOICE_AUTH_JWT_SECRET or RTCVOICE_AUTH_JWT_PUBLIC_KEY before exposing it."
        )
    web_dir = Path(settings.web_dir) if settings.web_dir else Path(__file__).resolve().parents[2] / "web"
    if (web_dir / "index.html").is_file():
        index = web_dir / "index.html"

        async def root(_request: web.Request) -> web.FileResponse:
            return web.FileResponse(index)

        app.router.add_get("/", root)
        app.router.add_static("/static/", web_dir, show_index=False)
    return app


def _engines_ctx(preloaded: Engines | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if preloaded is not None:
            app[ENGINES] = preloaded
            yield
            return
        engines = await load_engines(app[SETTINGS])
        app[ENGINES] = engines
        yield
        await engines.aclose()

    return ctx


async def _tools_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    tools = await Toolbox.load(settings)  # ToolConfigError: serve says why, and does not start
    if tools and not supports_tools(app[ENGINES].agent):
        log.warning(
            "tools are set (%s), but agent=%s cannot call tools reliably (the embedded SmolLM2 "
            "cannot): they are not offered. Use --agent openai with a model that calls tools.",
            ", ".join(tools.tools),
            app[ENGINES].agent.name,
        )
    app[TOOLS] = tools
    yield
    await tools.aclose()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = create_store(app[SETTINGS])
    await store.open()
    app[STORE] = store
    yield
    await store.close()


async def _sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    registry = SessionRegistry(
        max_sessions=settings.max_sessions,
        start_timeout_s=settings.session_start_timeout_s,
        connect_timeout_s=settings.ice_connect_timeout_s,
    )
    app[SESSIONS] = registry
    trimmer = MallocTrimmer(idle=lambda: len(registry) == 0)
    registry.on_close.append(lambda _session, _reason: trimmer.call_ended())
    watch_sessions(app)
    yield
    # on_shutdown (_end_calls) has ended the calls; this ends any that a socket still open then
    # (Socket.IO) started since, before the store and engines they use close (cleanup contexts
    # unwind in reverse order).
    await close_calls(app, "server_shutdown")
    await trimmer.aclose()


async def _end_calls(app: web.Application) -> None:
    if SESSIONS in app:
        await close_calls(app, "server_shutdown")
    await close_relayed_sockets(app)


async def close_calls(app: web.Application, reason: str) -> None:
    """End every call on this node: sessions of every transport, and the realtime sockets."""
    realtime: set[RealtimePeer] = app[REALTIME]
    await asyncio.gather(app[SESSIONS].close_all(reason), *(peer.close(reason) for peer in tuple(realtime)))


# -- helpers ------------------------------------------------------------------------------------
def _ice_servers_for_client(request: web.Request, session: VoiceSession) -> list[dict[str, Any]]:
    return request.app[ICE].for_client(session.id)


def process_stats() -> dict[str, float]:
    """CPU seconds and resident memory of this server process (benchmarks read them per call)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss_mb = usage.ru_maxrss / 1024.0
    try:
        with open("/proc/self/statm") as f:
            rss_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pass  # not Linux: ru_maxrss (the peak) is the best there is
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "rss_mb": round(rss_mb, 1)}


# -- routes -------------------------------------------------------------------------------------
async def status(request: web.Request) -> web.Response:
    engines, settings = request.app[ENGINES], request.app[SETTINGS]
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "sessions": len(request.app[SESSIONS]),
            "max_sessions": settings.max_sessions,
            "engines": {"stt": engines.stt.name, "agent": engines.agent.name, "tts": engines.tts.name},
            "process": process_stats(),
            "late_frames": request.app[SESSIONS].late_frames,
            "concealed_ms": request.app[SESSIONS].concealed_ms,
            "node": request.app[NODE].status(),
        }
    )


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy", "sessions": len(request.app[SESSIONS])})


async def voices(request: web.Request) -> web.Response:
    tts = request.app[ENGINES].tts
    settings = request.app[SETTINGS]
    return web.json_response(
        {"voices": [v.as_dict() for v in tts.voices()], "default": settings.tts_voice or tts.default_voice}
    )


async def session_start(request: web.Request) -> web.Response:
    """POST /voice/session/start: a session for a WebRTC offer or the session WebSocket."""
    body = await json_body(request, required=False)
    app = request.app
    registry, settings = app[SESSIONS], app[SETTINGS]
    user = body_user(request, body)
    check_capacity(app, user)
    options = call_options(app[ENGINES], body)
    thread_id = optional_str(body, "thread_id", 200) or optional_str(body, "threadId", 200)
    thread = await thread_for(app[STORE], thread_id, user, create_unknown=settings.create_unknown_threads)
    session = registry.create(user_id=user, thread_id=thread.id, options=options)
    return web.json_response(
        {
            "session_id": session.id,
            "thread_id": thread.id,
            "ice_servers": _ice_servers_for_client(request, session),
            "offer_url": f"{API}/session/{session.id}/offer",
            "end_url": f"{API}/session/end",
            "ws_url": websocket_url(request, f"{API}/session/{session.id}/ws"),
            "expires_in": settings.session_start_timeout_s,
            "language": options.language or settings.language,
            "session_type": options.session_type,
        }
    )


async def session_offer(request: web.Request) -> web.Response:
    session = session_for(request.app[SESSIONS], request.match_info["session_id"], request_user(request))
    body = await json_body(request)
    sdp, kind = body.get("sdp"), body.get("type", "offer")
    if not isinstance(sdp, str) or not sdp.strip():
        raise ApiError(400, "invalid_sdp", "Send {'sdp': <offer SDP string>, 'type': 'offer'}.")
    if len(sdp) > MAX_SDP_CHARS:
        raise ApiError(413, "sdp_too_large", f"The SDP offer is limited to {MAX_SDP_CHARS} characters.")
    if not isinstance(kind, str):
        raise ApiError(400, "invalid_sdp", "'type' must be 'offer'.")
    if session.peer is not None:
        raise ApiError(
            409, "already_offered", "This session already has a peer connection; start a new session."
        )
    if not session.options.speaks:
        raise ApiError(
            400,
            "invalid_session_type",
            "A session_type 'text' session has no audio: use its WebSocket (ws_url), not WebRTC.",
        )
    app = request.app
    make_conversation, recorder = await prepare_call(
        app,
        session_id=session.id,
        user_id=session.user_id,
        thread_id=session.thread_id,
        options=session.options,
    )
    peer = WebRtcPeer(
        session_id=session.id,
        ice_servers=app[ICE].for_server_peer(session.id),
        relay_only=app[ICE].server_relay_only,
        make_conversation=make_conversation,
        executor=app[ENGINES].audio_executor,
        jitter_frames=app[SETTINGS].jitter_buffer_frames,
        limits=call_limits(app[SETTINGS]),
        max_media_sections=app[SETTINGS].max_media_sections,
    )
    registry = app[SESSIONS]
    registry.attach(session, peer, recorder)
    try:
        answer = await peer.answer(sdp, kind)
    except OfferError as exc:
        await registry.end(session.id, "bad_offer")
        raise ApiError(400, "invalid_sdp", str(exc)) from None
    except RelayUnavailableError as exc:
        await registry.end(session.id, "relay_unavailable")
        raise ApiError(503, "relay_unavailable", str(exc), {"Retry-After": "5"}) from None
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "session_id": session.id})


async def session_end(request: web.Request) -> web.Response:
    body = await json_body(request)
    session_id = body.get("session_id")
    if not isinstance(session_id, str):
        raise ApiError(400, "invalid_field", "Send {'session_id': <id>}.")
    registry, user = request.app[SESSIONS], request_user(request)
    answer: dict[str, Any] = {
        "session_id": session_id,
        "ended": True,
        "message": "Session ended successfully",
    }
    # Ending a call that already ended (its socket closed first) is done, not an error. A live
    # session comes first: a backend may open a new one under an id it used before.
    already = registry.ended_reason(session_id, user) if registry.get(session_id) is None else None
    if already is not None:
        return web.json_response({**answer, "reason": already})
    session_for(registry, session_id, user)
    await registry.end(session_id, "client_hangup")
    return web.json_response({**answer, "reason": "client_hangup"})
