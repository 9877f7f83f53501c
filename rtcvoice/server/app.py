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
from ..settings import Settings
from ..store import create_store
from ..transports.webrtc import OfferError, RelayUnavailableError, WebRtcPeer
from . import chat, fallback
from .auth import Authenticator, auth_middleware, request_user
from .bodies import json_body, optional_str
from .calls import call_limits, prepare_call
from .errors import ApiError, json_errors
from .keys import AUTH, ENGINES, ICE, REALTIME, SESSIONS, SETTINGS, STORE
from .sessions import SessionRegistry, VoiceSession, session_for
from .threads import owned_thread
from .turn import IceServers

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
    app = web.Application(middlewares=[json_errors, auth_middleware(auth)], client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[AUTH] = auth
    app[ICE] = IceServers(settings)  # a bad STUN/TURN setting stops the server here, not mid-call
    app[REALTIME] = set()
    app.cleanup_ctx.append(_engines_ctx(engines))
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_sessions_ctx)
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
        ]
    )
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
    yield
    # Shutdown ends every call cleanly (and finishes writing its messages) before the store and
    # the engines it uses are closed: cleanup contexts unwind in reverse order.
    await registry.close_all()
    realtime = app[REALTIME]
    await asyncio.gather(*(peer.close() for peer in tuple(realtime)))


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
    body = await json_body(request, required=False)
    registry = request.app[SESSIONS]
    if len(registry) >= registry.max_sessions:
        raise ApiError(
            503,
            "too_many_sessions",
            "The server is at its call limit; try again shortly.",
            {"Retry-After": "5"},
        )
    voice = optional_str(body, "voice", 200)
    if voice is not None and voice not in {v.id for v in request.app[ENGINES].tts.voices()}:
        raise ApiError(400, "invalid_voice", f"Unknown voice {voice[:64]!r}; see GET {API}/voices.")
    user = request_user(request)
    if user is None:
        user = optional_str(body, "user_id", 200)  # unauthenticated mode: the app may name its user
    limit = request.app[SETTINGS].max_sessions_per_user
    if user is not None and registry.count_for(user) >= limit:
        raise ApiError(
            429,
            "too_many_sessions_for_user",
            f"This user already has {limit} calls open; end one first.",
            {"Retry-After": "5"},
        )
    thread_id = optional_str(body, "thread_id", 200)
    store = request.app[STORE]
    thread = (
        await owned_thread(store, thread_id, user)
        if thread_id
        else await store.create_thread(user, "Voice call")
    )
    session = registry.create(
        user_id=user,
        thread_id=thread.id,
        voice=voice,
        instructions=optional_str(body, "instructions"),
    )
    return web.json_response(
        {
            "session_id": session.id,
            "thread_id": thread.id,
            "ice_servers": _ice_servers_for_client(request, session),
            "offer_url": f"{API}/session/{session.id}/offer",
            "end_url": f"{API}/session/end",
            "ws_url": f"{API}/session/{session.id}/ws",
            "expires_in": request.app[SETTINGS].session_start_timeout_s,
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
    app = request.app
    make_conversation, recorder = await prepare_call(
        app,
        session_id=session.id,
        user_id=session.user_id,
        thread_id=session.thread_id,
        voice=session.voice,
        instructions=session.instructions,
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
    session_for(request.app[SESSIONS], session_id, request_user(request))
    await request.app[SESSIONS].end(session_id, "client_hangup")
    return web.json_response({"session_id": session_id, "ended": True})
