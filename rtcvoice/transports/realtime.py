"""A realtime-style WebSocket: whole inputs in, streamed text and audio out, JSON only.

For backends and apps that already speak this shape of protocol (``/api/v1/streaming/realtime``).
It comes in two dialects, one per connection:

**nested** (the realtime voice API's own documented messages; pcm16 is 24 kHz both ways, as in
OpenAI's Realtime API, whose format names that API reuses):

in:  ``session.update`` {session_update: {voice, language, instructions, temperature,
     max_response_output_tokens}}, ``conversation.item.input`` {conversation_item_input:
     {type: input_text, text} | {type: input_audio_buffer, audio: base64 pcm16}},
     ``ping`` {ping: {timestamp}}, ``interrupt``
out: ``session.update`` {session: {id, voice, language, ...}}, ``response.delta`` {response:
     {delta: {content}, timestamp}}, ``response.audio`` {response: {audio, timestamp}},
     ``response.done`` {response: {usage: {input_tokens, output_tokens}, text, interrupted,
     timestamp}}, ``error`` {error: {code, message}}, ``pong`` {timestamp}

**flat** (rtcvoice's first version, kept for its clients; pcm16 16 kHz in, 24 kHz out):

in:  ``session.update`` {session: {...}}, ``conversation.item.input`` {input_text} or
     {input_audio_buffer}, ``interrupt``, ``ping``
out: ``session.update``, ``input.transcript``, ``response.delta`` {delta}, ``response.audio``
     {audio, sample_rate}, ``response.done`` {text, interrupted, usage}, ``error`` {code, message},
     ``pong``

Both also send ``input.transcript`` {text} (what an audio input was heard as), ``metrics`` and
``thread.updated``, which clients that do not know them ignore; ``usage`` is null where the agent
reports none.

Tools (README "Tools"): a client declares its own in ``session.update`` (``tools``, OpenAI's
format); every call the model makes is sent as ``response.function_call_arguments.done``
{call_id, name, arguments (JSON text), client}, and each outcome as ``tool_result``. A call of the
client's own tool (``client`` true) is answered with ``conversation.item.create`` {item: {type:
function_call_output, call_id, output}} (or rtcvoice's ``tool_result`` {id, result | error}).

``?dialect=nested|flat`` picks one; otherwise the first message that uses a dialect's own keys
decides (``session_update`` / ``conversation_item_input`` / ``ping.timestamp`` are nested), so
either client works unchanged. The greeting ``session.update`` is the same in both (its
``dialect`` is null until the client has said; every later one states it and its rates).

Each input is one turn: no voice activity detection, so it also suits push-to-talk clients.
The same Conversation does the work, so history, threads and barge-in behave as on WebRTC.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from ..audio import STT_RATE, Int16Audio, resample_pcm
from ..conversation import ConversationFactory
from ..conversation.events import MAX_TEXT_CHARS, MAX_TOKENS_LIMIT
from .tracks import PlayheadSink
from .websocket import send_queued

log = logging.getLogger(__name__)

Dialect = Literal["nested", "flat"]
DIALECTS: tuple[Dialect, ...] = ("nested", "flat")
OUTPUT_RATE = 24_000
INPUT_RATES: dict[Dialect, int] = {"nested": 24_000, "flat": STT_RATE}
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # ~2 min of base64 24 kHz audio in one input
MAX_INPUT_SECONDS = 120


class ImmediateSink(PlayheadSink):
    """Audio goes out as soon as it is made: a realtime client buffers and plays it itself."""

    sample_rate = OUTPUT_RATE

    def __init__(self, send: Callable[[Int16Audio], None]) -> None:
        super().__init__()
        self._send = send

    def write(self, pcm: Int16Audio) -> int:
        position = self.playhead.write(pcm)
        if not self.playhead.paused:
            self._send(self.playhead.take(int(pcm.size), pad=False))
        return position

    def resume(self) -> None:
        # What the client already has plays on; what was made during the pause goes out now.
        super().resume()
        if self.playhead.queued:
            self._send(self.playhead.take(self.playhead.queued, pad=False))


def detect_dialect(data: dict[str, Any]) -> Dialect | None:
    """The dialect a client message is written in, where its keys say."""
    if "session_update" in data or "conversation_item_input" in data or isinstance(data.get("ping"), dict):
        return "nested"
    if "session" in data or "input_text" in data or "input_audio_buffer" in data:
        return "flat"
    return None


class RealtimePeer:
    def __init__(
        self,
        *,
        connection_id: str,
        ws: web.WebSocketResponse,
        make_conversation: ConversationFactory,
        dialect: Dialect | None = None,
    ) -> None:
        self.connection_id = connection_id
        self.ws = ws
        self.dialect = dialect
        self._outbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.sink = ImmediateSink(self._send_audio)
        self.conversation = make_conversation(self.sink, self._translate)
        self._hang_up: asyncio.Task[None] | None = None  # the AI hung up (end_call): closing

        def hang_up(reason: str) -> None:
            self._hang_up = asyncio.create_task(
                self.close(reason), name=f"realtime-hang-up-{self.connection_id}"
            )

        self.conversation.request_end = hang_up
        self._closed = False
        self.end_reason: str | None = None  # why it closed, once it has (the registry records it)
        self._writer: asyncio.Task[None] | None = None

    @property
    def nested(self) -> bool:
        return self.dialect == "nested"

    @property
    def input_rate(self) -> int:
        return INPUT_RATES[self.dialect or "flat"]

    # -- out --------------------------------------------------------------------------------------
    def _send(self, event: dict[str, Any]) -> None:
        self._outbox.put_nowait(json.dumps(event, separators=(",", ":")))

    def _send_response(self, kind: str, flat: dict[str, Any], nested: dict[str, Any]) -> None:
        if self.nested:
            self._send({"type": kind, "response": {**nested, "timestamp": time.time()}})
        else:
            self._send({"type": kind, **flat})

    def _send_audio(self, pcm: Int16Audio) -> None:
        audio = base64.b64encode(pcm.astype("<i2").tobytes()).decode("ascii")
        self._send_response(
            "response.audio",
            {"audio": audio, "sample_rate": OUTPUT_RATE, "format": "pcm16"},
            {"audio": audio},
        )

    def _translate(self, event: dict[str, Any]) -> None:
        """Conversation events, in this protocol's words."""
        kind = event.get("type")
        turn_id = event.get("turn_id")
        if kind == "session.started" or kind == "session.updated":
            self._send({"type": "session.update", "session": self._session_state()})
        elif kind == "final_transcript":
            self._send({"type": "input.transcript", "text": event.get("text", ""), "turn_id": turn_id})
        elif kind == "ai_text":
            text = event.get("text", "")
            self._send_response(
                "response.delta",
                {"delta": text, "turn_id": turn_id},
                {"delta": {"content": text}, "turn_id": turn_id},
            )
        elif kind == "end_of_response":
            done = {
                "text": event.get("text", ""),
                "interrupted": event.get("interrupted", False),
                "usage": event.get("usage"),
                "turn_id": turn_id,
            }
            self._send_response("response.done", done, done)
        elif kind == "error":
            self._error(str(event.get("code", "error")), str(event.get("message", "")))
        elif kind == "tool_call":
            # OpenAI Realtime's words for a function call the model made; ``client``: this
            # client declared the tool, and answers with a function_call_output item.
            arguments = event.get("arguments")
            call = {
                "call_id": event.get("id"),
                "name": event.get("name"),
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                "client": bool(event.get("client")),
                "turn_id": turn_id,
            }
            self._send_response("response.function_call_arguments.done", call, call)
        elif kind in ("pong", "metrics", "thread.updated", "tool_result"):
            self._send(event)

    def _session_state(self) -> dict[str, Any]:
        c = self.conversation
        config = c.config
        return {
            "id": self.connection_id,
            "thread_id": c.thread_id,
            "voice": config.voice,
            "language": config.language,
            "speed": config.speed,
            "instructions": config.instructions,
            "model": config.model,
            "temperature": config.temperature,
            "max_response_output_tokens": config.max_tokens,
            "output_audio": {"format": "pcm16", "sample_rate": OUTPUT_RATE},
            "input_audio": {"format": "pcm16", "sample_rate": self.input_rate},
            # None until the client's first message says (the rates above are then the flat ones).
            "dialect": self.dialect,
        }

    def _error(self, code: str, message: str) -> None:
        if self.nested:
            self._send({"type": "error", "error": {"code": code, "message": message}})
        else:
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
                        "This endpoint takes JSON text messages; audio goes base64 in the input message.",
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
        if self.dialect is None:
            self.dialect = detect_dialect(data)
        kind = data["type"]
        if kind == "ping":
            self._on_ping(data)
        elif kind == "interrupt":
            await self.conversation.interrupt(reason="client")
        elif kind == "session.update":
            await self._on_session_update(data)
        elif kind == "conversation.item.input":
            await self._on_input(data)
        elif kind == "tool_result":  # the answer to a tool_call (client: true) of a tool it declared
            await self.conversation.handle_client_message(json.dumps(data))
        elif kind == "conversation.item.create":  # the same answer, as OpenAI Realtime words it
            await self._on_item(data)
        else:
            self._error("unknown_event", f"Unknown message type {kind[:64]!r}.")

    def _on_ping(self, data: dict[str, Any]) -> None:
        ping = data.get("ping")
        if self.nested:
            sent = ping.get("timestamp") if isinstance(ping, dict) else None
            stamp = sent if isinstance(sent, int | float) and not isinstance(sent, bool) else time.time()
            self._send({"type": "pong", "timestamp": stamp})
        else:
            self._send({"type": "pong", "id": data.get("id")})

    async def _on_session_update(self, data: dict[str, Any]) -> None:
        session = data.get("session_update", data.get("session", {}))
        if not isinstance(session, dict):
            self._error("invalid_event", "session.update needs an object of settings.")
            return
        session = dict(session)
        if "max_response_output_tokens" in session:
            limit = session.pop("max_response_output_tokens")
            # OpenAI's "inf": as long as this server allows.
            session["max_tokens"] = MAX_TOKENS_LIMIT if limit == "inf" else limit
        thread_id = session.pop("thread_id", None)
        if thread_id is not None:
            await self.conversation.handle_client_message(
                json.dumps({"type": "set_thread", "thread_id": thread_id})
            )
        await self.conversation.handle_client_message(json.dumps({"type": "session.update", **session}))

    async def _on_item(self, data: dict[str, Any]) -> None:
        item = data.get("item")
        if not isinstance(item, dict) or item.get("type") != "function_call_output":
            self._error("invalid_event", "conversation.item.create takes a function_call_output item.")
            return
        output = item.get("output")
        try:
            result = json.loads(output) if isinstance(output, str) else output
        except json.JSONDecodeError:
            result = output  # plain text is a result too
        answer = {"type": "tool_result", "id": item.get("call_id"), "result": result}
        await self.conversation.handle_client_message(json.dumps(answer))

    async def _on_input(self, data: dict[str, Any]) -> None:
        item = data.get("conversation_item_input")
        if isinstance(item, dict):
            kind = item.get("type")
            text = item.get("text") if kind == "input_text" else None
            audio = item.get("audio") if kind == "input_audio_buffer" else None
        else:
            text, audio = data.get("input_text"), data.get("input_audio_buffer")
        if isinstance(text, str) and text.strip():
            if len(text) > MAX_TEXT_CHARS:
                self._error("message_too_large", f"input_text is limited to {MAX_TEXT_CHARS} characters.")
                return
            await self.conversation.respond_to_text(text)
        elif isinstance(audio, str) and audio:
            pcm = self._decode_audio(audio)
            if pcm is not None:
                await self.conversation.respond_to_audio(resample_pcm(pcm, self.input_rate, STT_RATE))
        else:
            self._error(
                "invalid_event",
                "conversation.item.input needs conversation_item_input {type: input_text, text} or "
                "{type: input_audio_buffer, audio}.",
            )

    def _decode_audio(self, audio: str) -> Int16Audio | None:
        rate = self.input_rate
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            self._error("invalid_audio", f"The audio must be base64 PCM16 mono at {rate} Hz.")
            return None
        if len(raw) % 2 or len(raw) > MAX_INPUT_SECONDS * rate * 2:
            self._error(
                "invalid_audio",
                f"The audio must be whole PCM16 samples at {rate} Hz, at most {MAX_INPUT_SECONDS} s.",
            )
            return None
        return np.frombuffer(raw, dtype="<i2").astype(np.int16)

    async def _write_loop(self) -> None:
        await send_queued(self.ws, self._outbox)

    async def close(self, reason: str = "ended") -> None:
        """Close once; ``reason`` drain closes with 1012 (service restart): reconnect elsewhere."""
        if self._closed:
            return
        self._closed = True
        self.end_reason = reason
        await self.conversation.aclose()
        self._outbox.put_nowait(None)
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), 1.0)
            except (TimeoutError, ConnectionError):
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
        if not self.ws.closed:
            if reason == "drain":
                await self.ws.close(code=WSCloseCode.SERVICE_RESTART, message=b"drain")
            else:
                await self.ws.close()
