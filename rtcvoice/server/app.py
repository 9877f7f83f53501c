"""The aiohttp application: signaling routes, the session registry and the static web page."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import __version__
from ..conversation import AudioSink, Conversation
from ..engines import Engines, load_engines
from ..settings import Settings
from ..transports.webrtc import OfferError, WebRtcPeer, ice_servers_from_urls
from .errors import ApiError, json_errors
from .sessions import SessionRegistry, VoiceSession

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
ENGINES = web.AppKey("engines", Engines)
SESSIONS = web.AppKey("sessions", SessionRegistry)

API = "/api/v1/voice"
MAX_BODY_BYTES = 256 * 1024  # an SDP offer is a few KB; nothing on these routes needs more
MAX_SDP_CHARS = 64 * 1024


def create_app(settings: Settings, *, engines: Engines | None = None) -> web.Application:
    """The server. Pass ``engines`` to share loaded models between apps (tests); they stay yours to close."""
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_engines_ctx(engines))
    app.cleanup_ctx.append(_sessions_ctx)
    app.add_routes(
        [
            web.get(f"{API}/status", status),
            web.get(f"{API}/health", health),
            web.get(f"{API}/voices", voices),
            web.post(f"{API}/session/start", session_start),
            web.post(f"{API}/session/{{session_id}}/offer", session_offer),
            web.post(f"{API}/session/end", session_end),
        ]
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


async def _sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    registry = SessionRegistry(
        max_sessions=settings.max_sessions,
        start_timeout_s=settings.session_start_timeout_s,
        connect_timeout_s=settings.ice_connect_timeout_s,
    )
    app[SESSIONS] = registry
    yield
    # Shutdown ends every call cleanly before the engines it uses are closed.
    await registry.close_all()


# -- helpers ------------------------------------------------------------------------------------
async def _json_body(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    return body


def _optional_str(body: dict[str, Any], name: str, max_len: int = 4000) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise ApiError(400, "invalid_field", f"'{name}' must be a string of at most {max_len} characters.")
    return value


def _session_or_404(request: web.Request, session_id: str) -> VoiceSession:
    session = request.app[SESSIONS].get(session_id)
    if session is None:
        raise ApiError(
            404,
            "session_not_found",
            f"No live session {session_id[:64]!r}; start one with POST {API}/session/start.",
        )
    return session


def _ice_servers_for_client(settings: Settings) -> list[dict[str, Any]]:
    urls = settings.ice_server_urls
    return [{"urls": urls}] if urls else []


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
    body = await _json_body(request, required=False)
    registry = request.app[SESSIONS]
    if len(registry) >= registry.max_sessions:
        raise ApiError(
            503,
            "too_many_sessions",
            "The server is at its call limit; try again shortly.",
            {"Retry-After": "5"},
        )
    voice = _optional_str(body, "voice", 200)
    if voice is not None and voice not in {v.id for v in request.app[ENGINES].tts.voices()}:
        raise ApiError(400, "invalid_voice", f"Unknown voice {voice[:64]!r}; see GET {API}/voices.")
    session = registry.create(
        thread_id=_optional_str(body, "thread_id", 200),
        voice=voice,
        instructions=_optional_str(body, "instructions"),
    )
    return web.json_response(
        {
            "session_id": session.id,
            "ice_servers": _ice_servers_for_client(request.app[SETTINGS]),
            "offer_url": f"{API}/session/{session.id}/offer",
            "end_url": f"{API}/session/end",
            "expires_in": request.app[SETTINGS].session_start_timeout_s,
        }
    )


async def session_offer(request: web.Request) -> web.Response:
    session = _session_or_404(request, request.match_info["session_id"])
    body = await _json_body(request)
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
    peer = WebRtcPeer(
        session_id=session.id,
        ice_servers=ice_servers_from_urls(app[SETTINGS].ice_server_urls),
        make_conversation=_conversation_factory(app, session),
        executor=app[ENGINES].audio_executor,
    )
    registry = app[SESSIONS]
    registry.attach(session, peer)
    try:
        answer = await peer.answer(sdp, kind)
    except OfferError as exc:
        await registry.end(session.id, "bad offer")
        raise ApiError(400, "invalid_sdp", str(exc)) from None
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "session_id": session.id})


async def session_end(request: web.Request) -> web.Response:
    body = await _json_body(request)
    session_id = body.get("session_id")
    if not isinstance(session_id, str):
        raise ApiError(400, "invalid_field", "Send {'session_id': <id>}.")
    _session_or_404(request, session_id)
    await request.app[SESSIONS].end(session_id, "ended by client")
    return web.json_response({"session_id": session_id, "ended": True})


def _conversation_factory(
    app: web.Application, session: VoiceSession
) -> Callable[[AudioSink, Callable[[dict[str, Any]], None]], Conversation]:
    def make(sink: AudioSink, send: Callable[[dict[str, Any]], None]) -> Conversation:
        settings, engines = app[SETTINGS], app[ENGINES]
        conversation = Conversation(
            session_id=session.id,
            settings=settings,
            engines=engines,
            vad=engines.vad.stream(),
            sink=sink,
            send=send,
            executor=engines.audio_executor,
            thread_id=session.thread_id,
            user_id=session.user_id,
        )
        if session.voice:
            conversation.config.voice = session.voice
        if session.instructions:
            conversation.config.instructions = session.instructions
        return conversation

    return make
