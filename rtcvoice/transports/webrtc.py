"""The WebRTC transport: one aiortc peer connection per call.

Inbound: the client's Opus track, decoded by aiortc (in its decoder thread), resampled to 16 kHz
mono in the audio executor and fed to the conversation. Outbound: an :class:`OpusAudioTrack` on
the same transceiver. Events: a data channel the client creates (``events``); events sent before
it opens are queued, like pipecat's small-webrtc transport does, so none is lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

import av
from aiortc import RTCDataChannel, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ..audio import STT_RATE, StreamResampler
from ..conversation import Conversation, ConversationFactory
from .ice import chosen_turn_server, has_relay_candidate, rtc_configuration, turn_allocation_error
from .jitter import ConcealingBuffer, set_jitter_buffer
from .limits import CallLimits, RateLimiter, watchdog
from .tracks import OpusAudioTrack

log = logging.getLogger(__name__)

MAX_QUEUED_EVENTS = 1000
MAX_INBOUND_EVENTS = 64  # client messages waiting to be handled; more are refused, not buffered


class OfferError(ValueError):
    """The client's offer cannot be answered; the message says why."""


class RelayUnavailableError(RuntimeError):
    """The server's peer is relay-only and its TURN server gave it no relay candidate."""


def _check_offer(sdp: str, max_media_sections: int) -> None:
    if not sdp.lstrip().startswith("v=0"):
        raise OfferError("The SDP offer must start with 'v=0'.")
    media = [line.split()[0][2:] for line in sdp.splitlines() if line.startswith("m=") and line.split()]
    if len(media) > max_media_sections:
        # Each section costs a transceiver and its transports: a hostile offer must not get hundreds.
        raise OfferError(
            f"The SDP offer has {len(media)} media sections; at most {max_media_sections} are accepted."
        )
    if "audio" not in media:
        raise OfferError("The SDP offer has no audio media section; rtcvoice needs the microphone as audio.")


class WebRtcPeer:
    def __init__(
        self,
        *,
        session_id: str,
        ice_servers: list[RTCIceServer],
        make_conversation: ConversationFactory,
        executor: Executor | None = None,
        jitter_frames: int = 4,
        on_closed: Callable[[WebRtcPeer], Awaitable[None]] | None = None,
        relay_only: bool = False,
        limits: CallLimits | None = None,
        max_media_sections: int = 4,
    ) -> None:
        self.session_id = session_id
        self._ice_servers = ice_servers
        self._relay_only = relay_only
        self._make_conversation = make_conversation
        self._executor = executor
        self._jitter_frames = jitter_frames
        self._on_closed = on_closed
        self.pc: RTCPeerConnection | None = None
        self.track = OpusAudioTrack()
        self.conversation: Conversation | None = None
        self._channel: RTCDataChannel | None = None
        self._outbox: deque[str] = deque(maxlen=MAX_QUEUED_EVENTS)
        self._inbox: asyncio.Queue[str | bytes] = asyncio.Queue(maxsize=MAX_INBOUND_EVENTS)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.end_reason: str | None = None  # why it closed, once it has (the registry records it)
        self.connected = asyncio.Event()
        self.done = asyncio.Event()
        self.limits = limits or CallLimits()
        self._max_media_sections = max_media_sections
        self._rate = RateLimiter(self.limits.event_rate_per_s, self.limits.event_burst)
        self._last_heard = time.monotonic()  # the last event from the client, or audio decoded
        self._inbound: ConcealingBuffer | None = None

    def last_heard(self) -> float:
        """When the client was last heard from: an event, or a packet as it came off the network
        (the audio it carries may be decoded seconds later on a busy server)."""
        arrived = self._inbound.last_arrival if self._inbound is not None else None
        return max(self._last_heard, arrived or 0.0)

    @property
    def late_frames(self) -> int:
        return self.track.late_frames

    @property
    def concealed_ms(self) -> float:
        """Inbound audio the decoder made up for packets lost on the way (ConcealingBuffer)."""
        return self._inbound.concealed / 48.0 if self._inbound is not None else 0.0

    # -- signaling --------------------------------------------------------------------------------
    async def answer(self, sdp: str, type_: str = "offer") -> RTCSessionDescription:
        if type_ != "offer":
            raise OfferError("Only an SDP 'offer' can be answered.")
        _check_offer(sdp, self._max_media_sections)
        pc = RTCPeerConnection(rtc_configuration(self._ice_servers, relay_only=self._relay_only))
        self.pc = pc
        self.conversation = self._make_conversation(self.track, self.send)
        self.conversation.request_end = lambda reason: self._spawn(self.close(reason), "hang-up")
        pc.on("datachannel", self._on_datachannel)
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_connection_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:  # aiortc raises many kinds on malformed SDP; all mean "bad offer"
            raise OfferError(f"The SDP offer could not be parsed: {exc or type(exc).__name__}") from exc
        audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
        if not audio:
            raise OfferError("The SDP offer has no usable audio section.")
        if not any(c.name.lower() in ("opus", "pcmu", "pcma") for c in _codecs(audio[0])):
            raise OfferError("The SDP offer has no audio codec rtcvoice can decode (Opus, PCMU or PCMA).")
        self._inbound = set_jitter_buffer(audio[0].receiver, self._jitter_frames)
        pc.addTrack(self.track)
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
        if self._relay_only and not has_relay_candidate(pc.localDescription.sdp):
            await self._no_relay()
        self.conversation.start()
        self._spawn(self._event_loop(), "events")
        local = pc.localDescription
        return RTCSessionDescription(sdp=local.sdp, type=local.type)

    async def _no_relay(self) -> None:
        # Without a relay candidate a relay-only answer cannot connect: fail the offer now with
        # the reason in the log, rather than let the caller wait for ICE to time out.
        turn_server = chosen_turn_server(self._ice_servers)
        reason = await turn_allocation_error(turn_server) if turn_server is not None else "no TURN server"
        url = turn_server.urls if turn_server is not None else "-"
        log.error(
            "session %s: relay-only, but TURN server %s gave no relay: %s", self.session_id, url, reason
        )
        raise RelayUnavailableError("The server's TURN relay is unavailable; the call cannot be set up.")

    # -- events -----------------------------------------------------------------------------------
    def send(self, event: dict[str, Any]) -> None:
        text = json.dumps(event, separators=(",", ":"))
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(text)
        else:
            self._outbox.append(text)

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        self._channel = channel

        @channel.on("open")
        def _open() -> None:
            self._drain_outbox()

        @channel.on("message")
        def _message(message: str | bytes) -> None:
            self._last_heard = time.monotonic()
            if not self._rate.allow():
                self.send(
                    {
                        "type": "error",
                        "session_id": self.session_id,
                        "code": "rate_limited",
                        "message": f"At most {self.limits.event_rate_per_s:.0f} events a second; this one was dropped.",
                    }
                )
                return
            try:
                self._inbox.put_nowait(message)
            except asyncio.QueueFull:
                self.send(
                    {
                        "type": "error",
                        "session_id": self.session_id,
                        "code": "rate_limited",
                        "message": "Too many events at once; slow down.",
                    }
                )

        if channel.readyState == "open":
            self._drain_outbox()

    def _drain_outbox(self) -> None:
        channel = self._channel
        while self._outbox and channel is not None and channel.readyState == "open":
            channel.send(self._outbox.popleft())

    async def _event_loop(self) -> None:
        # One consumer keeps a session's client events in order.
        assert self.conversation is not None
        while True:
            message = await self._inbox.get()
            await self.conversation.handle_client_message(message)

    # -- media ------------------------------------------------------------------------------------
    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._read_audio(track), "audio-in")

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        assert self.conversation is not None
        resampler = StreamResampler(STT_RATE)
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                log.info("session %s: inbound audio ended", self.session_id)
                return
            if not isinstance(frame, av.AudioFrame):
                continue
            if self._inbound is None:  # no packet clock (see last_heard): the audio is the sign
                self._last_heard = time.monotonic()
            pcm = await loop.run_in_executor(self._executor, resampler.frame, frame)
            await self.conversation.push_audio(pcm)

    def _on_connection_state(self) -> None:
        assert self.pc is not None
        state = self.pc.connectionState
        log.info("session %s: connection %s", self.session_id, state)
        if state == "connected" and not self.connected.is_set():
            self.connected.set()
            self._last_heard = time.monotonic()
            conversation = self.conversation
            assert conversation is not None
            self._spawn(
                watchdog(
                    self.limits,
                    started=time.monotonic(),
                    last_heard=self.last_heard,
                    last_activity=lambda: conversation.last_activity,
                    end=self.close,
                ),
                "watchdog",
            )
        elif state in ("failed", "closed"):
            self._spawn(self.close(), "close")

    # -- lifecycle --------------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{name}-{self.session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "session %s: task %s failed", self.session_id, task.get_name(), exc_info=task.exception()
            )

    async def close(self, reason: str = "ended") -> None:
        if self._closed:
            return
        self._closed = True
        self.end_reason = reason
        await self._say_goodbye(reason)
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.conversation is not None:
            await self.conversation.aclose()
        self.track.stop()
        if self.pc is not None:
            await self.pc.close()
        self.done.set()
        if self._on_closed is not None:
            await self._on_closed(self)

    async def _say_goodbye(self, reason: str) -> None:
        """Tell the client why the call ends, and give the message a moment to leave."""
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        self.send({"type": "session.ended", "session_id": self.session_id, "reason": reason})
        for _ in range(25):  # the SCTP transport sends asynchronously; up to 0.5 s
            if channel.bufferedAmount == 0:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)


def _codecs(transceiver: Any) -> list[Any]:
    return list(getattr(transceiver, "_codecs", []) or [])


def ice_servers_from_urls(
    urls: list[str], username: str | None = None, credential: str | None = None
) -> list[RTCIceServer]:
    return [RTCIceServer(urls=url, username=username, credential=credential) for url in urls]
