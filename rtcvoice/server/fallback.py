"""Calls for clients without WebRTC: the session WebSocket, the realtime-style WebSocket, plain HTTP."""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from ..audio import float_to_int16, wav_bytes
from ..conversation.events import MAX_TEXT_CHARS
from ..conversation.history import context_window
from ..conversation.replies import aclose_stream
from ..engines.agents import check_model
from ..engines.base import AgentContext, ChatMessage, EngineError
from ..transports.realtime import DIALECTS, MAX_MESSAGE_BYTES, RealtimePeer
from ..transports.websocket import AudioOut, WebSocketPeer
from .auth import request_user
from .bodies import json_body, optional_str
from .callers import body_user
from .calls import call_limits, prepare_call
from .errors import ApiError
from .keys import ENGINES, METRICS, REALTIME, SESSIONS, SETTINGS, STORE
from .sessions import SessionRegistry, VoiceSession, session_for
from .threads import ThreadRecorder, load_history, thread_for

log = logging.getLogger(__name__)

VOICE = "/api/v1/voice"
REALTIME_PATH = "/api/v1/streaming/realtime"
HEARTBEAT_S = 20.0  # WebSocket pings: a vanished client is noticed within ~2 heartbeats


async def session_ws(request: web.Request) -> web.StreamResponse:
    """GET /voice/session/{id}/ws: the WebSocket fallback for a started session."""
    registry = request.app[SESSIONS]
    session = session_for(registry, request.match_info["session_id"], request_user(request))
    if session.peer is not None:
        raise ApiError(
            409, "already_connected", "This session already has a connection; start a new session."
        )
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=256 * 1024)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "websocket_required", "Connect with a WebSocket (Upgrade: websocket).")
    make, recorder = await prepare_call(
        request.app,
        session_id=session.id,
        user_id=session.user_id,
        thread_id=session.thread_id,
        options=session.options,
    )
    await ws.prepare(request)
    settings = request.app[SETTINGS]
    options = session.options
    peer = WebSocketPeer(
        session_id=session.id,
        ws=ws,
        make_conversation=make,
        executor=request.app[ENGINES].audio_executor,
        limits=call_limits(settings),
        output=AudioOut(sample_rate=options.output_sample_rate or settings.ws_output_sample_rate)
        if options.speaks
        else None,
    )
    await serve_socket(registry, session, peer, recorder)
    return ws


async def serve_socket(
    registry: SessionRegistry, session: VoiceSession, peer: WebSocketPeer, recorder: ThreadRecorder
) -> None:
    """Run a session's WebSocket call until it closes; the session ends with it."""
    registry.attach(session, peer, recorder)
    try:
        await peer.run()
    finally:
        await registry.end(session.id, "websocket_closed")


async def realtime_ws(request: web.Request) -> web.StreamResponse:
    """GET /streaming/realtime[/{user_id}]: one realtime-style connection, on a new or named thread."""
    user = request_user(request)
    path_user = request.match_info.get("user_id")
    if user is not None and path_user is not None and path_user != user:
        raise ApiError(403, "forbidden", "The user in the path is not the user of the token.")
    user = user if user is not None else path_user
    dialect = request.query.get("dialect")
    if dialect is not None and dialect not in DIALECTS:
        raise ApiError(400, "invalid_field", f"'dialect' must be one of {', '.join(DIALECTS)}.")
    thread = await thread_for(
        request.app[STORE],
        request.query.get("thread_id"),
        user,
        create_unknown=request.app[SETTINGS].create_unknown_threads,
    )
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "websocket_required", "Connect with a WebSocket (Upgrade: websocket).")
    connection_id = uuid.uuid4().hex
    make, recorder = await prepare_call(
        request.app, session_id=connection_id, user_id=user, thread_id=thread.id
    )
    await ws.prepare(request)
    peer = RealtimePeer(
        connection_id=connection_id,
        ws=ws,
        make_conversation=make,
        dialect=dialect,
    )
    connections, metrics = request.app[REALTIME], request.app[METRICS]
    connections.add(peer)
    metrics.call_started("realtime")
    try:
        await peer.run()
    finally:
        connections.discard(peer)
        metrics.call_ended("websocket_closed")
        await recorder.aclose()
    return ws


async def realtime_status(request: web.Request) -> web.Response:
    engines = request.app[ENGINES]
    return web.json_response(
        {
            "status": "ok",
            "connections": len(request.app[REALTIME]),
            "engines": {"stt": engines.stt.name, "agent": engines.agent.name, "tts": engines.tts.name},
        }
    )


async def realtime_health(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy", "connections": len(request.app[REALTIME])})


@dataclass(frozen=True)
class TranscriptAnswer:
    thread_id: str
    user_message_id: str
    message_id: str
    text: str
    model: str


async def answer_transcript(request: web.Request, body: dict[str, Any]) -> TranscriptAnswer:
    """Store the caller's transcript in its thread, ask the agent, store and return the reply.

    Fields in snake_case or camelCase (``chat_id``/``chatId``, ``user_id``/``userId``,
    ``model_name``/``modelName``). A chat id the store does not know is the app's own: its thread
    is made on first use (``create_unknown_threads``).
    """
    transcript = optional_str(body, "transcript", MAX_TEXT_CHARS)
    if not transcript or not transcript.strip():
        raise ApiError(400, "invalid_field", "'transcript' must be a non-empty string.")
    user = body_user(request, body)
    chat_id = optional_str(body, "chat_id", 200) or optional_str(body, "chatId", 200)
    model = optional_str(body, "model_name", 200) or optional_str(body, "modelName", 200)
    store, engines, settings = request.app[STORE], request.app[ENGINES], request.app[SETTINGS]
    if model is not None:
        try:
            check_model(engines.agent, model)
        except EngineError as exc:
            raise ApiError(400, exc.code, str(exc)) from None
    thread = await thread_for(
        store, chat_id, user, create_unknown=settings.create_unknown_threads, title=transcript[:60]
    )
    history = await load_history(store, thread.id)
    messages: list[ChatMessage] = [{"role": "system", "content": settings.system_prompt}]
    messages += context_window(history, settings.max_history_messages)
    messages.append({"role": "user", "content": transcript.strip()})
    user_message = await store.add_message(thread.id, "user", transcript.strip(), content_type="voice")
    context = AgentContext(
        session_id=f"http-{user_message.id}", thread_id=thread.id, user_id=user, model=model
    )
    stream = engines.agent.stream(messages, context)
    try:
        async with asyncio.timeout(settings.llm_timeout_s * 2):
            text = "".join([delta async for delta in stream]).strip()
    except (EngineError, TimeoutError) as exc:
        raise ApiError(
            502, getattr(exc, "code", "agent_timeout"), f"The agent could not answer: {exc or 'timed out'}"
        ) from None
    finally:
        await aclose_stream(stream)
    reply = await store.add_message(thread.id, "assistant", text, content_type="text")
    return TranscriptAnswer(thread.id, user_message.id, reply.id, text, model or engines.agent.name)


async def process_transcript(request: web.Request) -> web.Response:
    """POST /voice/process-transcript: text in, the AI's reply out, both stored in the thread."""
    body = await json_body(request)
    answer = await answer_transcript(request, body)
    reply: dict[str, object] = {
        "message_id": answer.message_id,
        "user_message_id": answer.user_message_id,
        "chat_id": answer.thread_id,
        "text": answer.text,
        "model_name": answer.model,
    }
    if body.get("with_audio", False) is True and answer.text:
        reply["audio_wav_base64"] = await _speak_wav(request, answer.text)
    return web.json_response(reply)


async def _speak_wav(request: web.Request, text: str) -> str:
    tts = request.app[ENGINES].tts
    try:
        chunks = [chunk async for chunk in tts.synthesize(text)]
    except EngineError as exc:
        raise ApiError(502, exc.code, f"Text-to-speech failed: {exc}") from None
    pcm = float_to_int16(np.concatenate(chunks)) if chunks else np.zeros(0, np.int16)
    return base64.b64encode(wav_bytes(pcm, tts.sample_rate)).decode("ascii")


def routes() -> list[web.RouteDef]:
    return [
        web.get(f"{VOICE}/session/{{session_id}}/ws", session_ws),
        web.post(f"{VOICE}/process-transcript", process_transcript),
        web.get(REALTIME_PATH, realtime_ws),
        web.get(f"{REALTIME_PATH}/status", realtime_status),
        web.get(f"{REALTIME_PATH}/health", realtime_health),
        web.get(f"{REALTIME_PATH}/{{user_id}}", realtime_ws),
    ]
