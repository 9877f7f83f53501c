"""The WebSocket fallback: the same call as WebRTC, for clients that cannot do WebRTC.

In: binary frames of PCM16 16 kHz mono (any length), and the same JSON client events as the data
channel, plus ``end_of_input`` for push-to-talk. Out: the same JSON server events, and the AI's
voice as binary frames of PCM16 mono at the call's output rate (16 kHz unless the session asked
for another; ``session.started`` states it), sent in real time with a small lead, so that a
barge-in stops it as quickly as on WebRTC (audio already sent cannot be recalled). A text-only
call (no output rate) sends no audio: its client speaks the replies itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from aiohttp import WSMsgType, web

from ..audio import STT_RATE, wav_bytes
from ..conversation import ConversationFactory
from .limits import CallLimits, RateLimiter, watch_length_and_idle
from .tracks import PlayheadSink

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_RATE = 16_000
CHUNK_S = 0.04  # audio frame size on the wire
LEAD_S = 0.2  # how far ahead of real time audio is sent: absorbs network jitter
MAX_AUDIO_FRAME_BYTES = 64 * 1024  # 2 s of 16 kHz PCM16 per frame is plenty


async def send_queued(ws: web.WebSocketResponse, outbox: asyncio.Queue[str | bytes | None]) -> None:
    """Send what is queued, in order, until None or a closed socket.

    One writer per socket keeps frames in order without a lock. A client that is gone ends the
    loop quietly: the reader sees the close and ends the call.
    """
    while True:
        item = await outbox.get()
        if item is None or ws.closed:
            return
        try:
            if isinstance(item, bytes):
                await ws.send_bytes(item)
            else:
                await ws.send_str(item)
        except ConnectionError:
            return


@dataclass(frozen=True)
class AudioOut:
    """How the AI's voice goes out on a WebSocket: rate, pacing, and raw PCM16 or a WAV per chunk."""

    sample_rate: int = DEFAULT_OUTPUT_RATE
    chunk_s: float = CHUNK_S
    lead_s: float = LEAD_S
    container: Literal["pcm16", "wav"] = "pcm16"

    def describe(self) -> dict[str, Any]:
        """For ``session.started``: what each binary frame is."""
        return {
            "format": self.container,
            "encoding": "pcm16",
            "sample_rate": self.sample_rate,
            "channels": 1,
            "frame_ms": round(self.chunk_s * 1000),
        }


class PacedPcmSink(PlayheadSink):
    """An AudioSink that sends binary frames of the AI's voice no faster than real time (plus the lead).

    A player that needs a container (decodeAudioData, ``<audio>``) takes each WAV frame as it is.
    """

    def __init__(self, send: Callable[[bytes], None], output: AudioOut) -> None:
        super().__init__()
        self.sample_rate = output.sample_rate
        self._send = send
        self._chunk_s = output.chunk_s
        self._lead_s = output.lead_s
        self._wav = output.container == "wav"
        self._clock_start: float | None = None
        self._clock_sent = 0
        self._last_pump = time.monotonic()
        self.late_frames = 0

    def flush(self) -> int:
        self._clock_start = None
        return super().flush()

    def pause(self) -> None:
        # What was already sent (the lead) still plays on the client; the rest waits here.
        self._clock_start = None
        super().pause()

    def pump(self) -> None:
        """Send what real time (plus the lead) allows; called every ``CHUNK_S``."""
        now = time.monotonic()
        last, self._last_pump = self._last_pump, now
        if self.playhead.queued == 0 or self.playhead.paused:
            self._clock_start = None  # idle: the next reply (or the resumed one) starts a new clock
            return
        if now - last > 3 * CHUNK_S and self._clock_start is not None:
            self.late_frames += 1  # the loop stalled mid-reply: the client may hear a gap
        if self._clock_start is None:
            self._clock_start, self._clock_sent = now, 0
        rate = self.sample_rate
        allowed = int((now - self._clock_start + self._lead_s) * rate) - self._clock_sent
        chunk = int(self._chunk_s * rate)
        while allowed >= chunk or (allowed > 0 and self.playhead.queued <= allowed):
            pcm = self.playhead.take(min(chunk, allowed), pad=False)
            if pcm.size == 0:
                break
            self._send(wav_bytes(pcm, rate) if self._wav else pcm.astype("<i2").tobytes())
            self._clock_sent += pcm.size
            allowed -= pcm.size


class WebSocketPeer:
    """One WebSocket call. :meth:`run` returns when the socket closes; :meth:`close` is idempotent."""

    def __init__(
        self,
        *,
        session_id: str,
        ws: web.WebSocketResponse,
        make_conversation: ConversationFactory,
        executor: Any = None,
        limits: CallLimits | None = None,
        output: AudioOut | None = AudioOut(),
    ) -> None:
        self.session_id = session_id
        self.ws = ws
        self._outbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.output = output
        self.sink: PacedPcmSink | None = None
        if output is not None:
            self.sink = PacedPcmSink(self._outbox.put_nowait, output)
        self.conversation = make_conversation(self.sink, self._send_event)
        # The AI hung up: closed from a task of its own (kept with the others; close() spares itself).
        self.conversation.request_end = lambda reason: self._tasks.append(
            asyncio.create_task(self.close(reason), name=f"ws-hang-up-{self.session_id}")
        )
        self._executor = executor
        self.connected = asyncio.Event()
        self.connected.set()
        self.done = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.end_reason: str | None = None  # why it closed, once it has (the registry records it)
        self.limits = limits or CallLimits()
        self._rate = RateLimiter(self.limits.event_rate_per_s, self.limits.event_burst)

    @property
    def late_frames(self) -> int:
        return self.sink.late_frames if self.sink is not None else 0

    @property
    def concealed_ms(self) -> float:
        return 0.0  # a TCP stream loses nothing to conceal

    def _send_event(self, event: dict[str, Any]) -> None:
        self._outbox.put_nowait(json.dumps(event, separators=(",", ":")))

    async def run(self) -> None:
        conversation = self.conversation
        self._tasks = [
            asyncio.create_task(self._write_loop(), name=f"ws-out-{self.session_id}"),
            asyncio.create_task(self._pace_loop(), name=f"ws-pace-{self.session_id}"),
            # A vanished client is the heartbeat's to notice (aiohttp closes the socket when its
            # pings go unanswered).
            watch_length_and_idle(
                self.limits,
                last_activity=lambda: conversation.last_activity,
                end=self.close,
                name=f"ws-watchdog-{self.session_id}",
            ),
        ]
        self.conversation.start(
            input_audio={"format": "pcm16", "sample_rate": STT_RATE},
            output_audio=self.output.describe() if self.output is not None else None,
        )
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.BINARY:
                    await self._on_audio(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    if self._rate.allow():
                        await self.on_text(msg.data)
                    else:
                        self._send_event(
                            {
                                "type": "error",
                                "session_id": self.session_id,
                                "code": "rate_limited",
                                "message": f"At most {self.limits.event_rate_per_s:.0f} events a second; this one was dropped.",
                            }
                        )
                elif msg.type == WSMsgType.ERROR:
                    log.info("session %s: websocket error %s", self.session_id, self.ws.exception())
                    break
        finally:
            await self.close()

    async def on_text(self, raw: str) -> None:
        """A client event (a dialect of this socket translates its own messages here)."""
        await self.conversation.handle_client_message(raw)

    async def _on_audio(self, data: bytes) -> None:
        if len(data) % 2 or len(data) > MAX_AUDIO_FRAME_BYTES:
            self._send_event(
                {
                    "type": "error",
                    "session_id": self.session_id,
                    "code": "invalid_audio",
                    "message": f"Binary frames are PCM16 mono 16 kHz: an even number of bytes, at most {MAX_AUDIO_FRAME_BYTES}.",
                }
            )
            return
        await self.conversation.push_audio(np.frombuffer(data, dtype="<i2").astype(np.int16))

    async def _write_loop(self) -> None:
        await send_queued(self.ws, self._outbox)

    async def _pace_loop(self) -> None:
        if self.sink is None:
            return
        while True:
            self.sink.pump()
            await asyncio.sleep(CHUNK_S / 2)

    async def close(self, reason: str = "ended") -> None:
        if self._closed:
            return
        self._closed = True
        self.end_reason = reason
        await self.conversation.aclose()
        self._send_event({"type": "session.ended", "session_id": self.session_id, "reason": reason})
        # Let what is already queued (the last events of the call) reach the client.
        self._outbox.put_nowait(None)
        if self._tasks:
            try:
                await asyncio.wait_for(asyncio.shield(self._tasks[0]), 1.0)
            except (TimeoutError, ConnectionError):
                log.info("session %s: could not deliver the last events", self.session_id)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        if not self.ws.closed:
            await self.ws.close()
        self.done.set()
