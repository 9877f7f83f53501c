"""A realtime-style WebSocket: whole inputs in, streamed text and audio out, JSON only.

For backends and apps that already speak this shape of protocol (``/api/v1/streaming/realtime``):

in:  ``session.update`` {session: {instructions, voice, language, speed, thread_id}},
     ``conversation.item.input`` {input_audio_buffer: base64 PCM16 16 kHz mono} or {input_text},
     ``interrupt``, ``ping``
out: ``session.update`` (the settings in force), ``input.transcript``, ``response.delta``
     {delta}, ``response.audio`` {audio: base64 PCM16 at ``sample_rate``}, ``response.done``
     {text, interrupted, usage}, ``error`` {code, message}, ``pong``

Each input is one turn: no voice activity detection, so it also suits push-to-talk clients.
The same Conversation does the work, so history, threads and barge-in behave as on WebRTC.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from ..audio import Int16Audio
from ..conversation import ConversationFactory
from ..conversation.events import MAX_TEXT_CHARS
from .tracks import PlayheadSink
from .websocket import send_queued

log = logging.getLogger(__name__)

OUTPUT_RATE = 24_000
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # ~4 min of base64 16 kHz audio in one input
MAX_INPUT_SECONDS = 120


class ImmediateSink(PlayheadSink):
    """Audio goes out as soon as it is made: a realtime client buffers and plays it itself."""

    sample_rate = OUTPUT_RATE

    def __init__(self, send: Callable[[Int16Audio], None]) -> None:
        super().__init__()
        self._send = send

    def write(self, pcm: Int16Audio) -> int:
        position = self.playhead.write(pcm)
        self._send(self.playhead.take(int(pcm.size), pad=False))
        return position


class RealtimePeer:
    def __init__(
        self, *, connection_id: str, ws: web.WebSocketResponse, make_conversation: ConversationFactory
    ) -> None:
        self.connection_id = connection_id
        self.ws = ws
        self._outbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.sink = ImmediateSink(self._send_audio)
        self.conversation = make_conversation(self.sink, self._translate)
        self._closed = False
        self._writer: asyncio.Task[None] | None = None

    # -- out --------------------------------------------------------------------------------------
    def _send(self, event: dict[str, Any]) -> None:
        self._outbox.put_nowait(json.dumps(event, separators=(",", ":")))

    def _send_audio(self, pcm: Int16Audio) -> None:
        audio = base64.b64encode(pcm.astype("<i2").tobytes()).decode("ascii")
        self._send({"type": "response.audio", "audio": audio, "sample_rate": OUTPUT_RATE, "format": "pcm16"})

    def _translate(self, event: dict[str, Any]) -> None:
        """Conversation events, in this protocol's words."""
        kind = event.get("type")
        if kind == "session.started" or kind == "session.updated":
            self._send({"type": "session.update", "session": self._session_state()})
        elif kind == "final_transcript":
            self._send(
                {"type": "input.transcript", "text": event.get("text", ""), "turn_id": event.get("turn_id")}
            )
        elif kind == "ai_text":
            self._send(
                {"type": "response.delta", "delta": event.get("text", ""), "turn_id": event.get("turn_id")}
            )
        elif kind == "end_of_response":
            self._send(
                {
                    "type": "response.done",
                    "text": event.get("text", ""),
                    "interrupted": event.get("interrupted", False),
                    "usage": event.get("usage"),
                    "turn_id": event.get("turn_id"),
                }
            )
        elif kind in ("error", "pong", "metrics", "thread.updated"):
            self._send(event)

    def _session_state(self) -> dict[str, Any]:
        c = self.conversation
        return {
            "id": self.connection_id,
            "thread_id": c.thread_id,
            "voice": c.config.voice,
            "language": c.config.language,
            "speed": c.config.speed,
            "instructions": c.config.instructions,
            "output_audio": {"format": "pcm16", "sample_rate": OUTPUT_RATE},
            "input_audio": {"format": "pcm16", "sample_rate": 16_000},
        }

    def _error(self, code: str, message: str) -> None:
        self._send({"type": "error", "code": code, "message": message})

    # -- in ---------------------------------------------------------------------------------------
    async def run(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name=f"realtime-out-{self.connection_id}")
        self.conversation.start()
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self._error(
                        "invalid_message",
                        "This endpoint takes JSON text messages; audio goes base64 in input_audio_buffer.",
                    )
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            await self.close()

    async def _on_text(self, raw: str) -> None:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            self._error("invalid_json", "Messages must be JSON objects with a string 'type'.")
            return
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            self._error("invalid_event", "Messages must be JSON objects with a string 'type'.")
            return
        kind = data["type"]
        if kind == "ping":
            self._send({"type": "pong", "id": data.get("id")})
        elif kind == "interrupt":
            await self.conversation.interrupt(reason="client")
        elif kind == "session.update":
            session = data.get("session", {})
            if not isinstance(session, dict):
                self._error("invalid_event", "session.update needs a 'session' object.")
                return
            thread_id = session.pop("thread_id", None)
            if thread_id is not None:
                await self.conversation.handle_client_message(
                    json.dumps({"type": "set_thread", "thread_id": thread_id})
                )
            await self.conversation.handle_client_message(json.dumps({"type": "session.update", **session}))
        elif kind == "conversation.item.input":
            await self._on_input(data)
        else:
            self._error("unknown_event", f"Unknown message type {kind[:64]!r}.")

    async def _on_input(self, data: dict[str, Any]) -> None:
        text, audio = data.get("input_text"), data.get("input_audio_buffer")
        if isinstance(text, str) and text.strip():
            if len(text) > MAX_TEXT_CHARS:
                self._error("message_too_large", f"input_text is limited to {MAX_TEXT_CHARS} characters.")
                return
            await self.conversation.respond_to_text(text)
        elif isinstance(audio, str) and audio:
            try:
                raw = base64.b64decode(audio, validate=True)
            except (binascii.Error, ValueError):
                self._error("invalid_audio", "input_audio_buffer must be base64 PCM16 16 kHz mono.")
                return
            if len(raw) % 2 or len(raw) > MAX_INPUT_SECONDS * 32_000:
                self._error(
                    "invalid_audio",
                    f"input_audio_buffer must be whole PCM16 samples, at most {MAX_INPUT_SECONDS} s.",
                )
                return
            await self.conversation.respond_to_audio(np.frombuffer(raw, dtype="<i2").astype(np.int16))
        else:
            self._error("invalid_event", "conversation.item.input needs input_text or input_audio_buffer.")

    async def _write_loop(self) -> None:
        await send_queued(self.ws, self._outbox)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.conversation.aclose()
        self._outbox.put_nowait(None)
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), 1.0)
            except (TimeoutError, ConnectionError):
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
        if not self.ws.closed:
            await self.ws.close()
