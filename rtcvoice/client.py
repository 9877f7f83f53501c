"""A headless WebRTC caller: a real aiortc peer that speaks WAV audio into a rtcvoice server.

Used by ``rtcvoice call``, the tests and the benchmarks. It sends its "microphone" on a paced
track (speech, then silence, exactly as a quiet person would), records everything the server
sends back with arrival times, and measures voice-to-voice at the client: from the moment the
last speech sample left to the first audible sample that came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .audio import WEBRTC_RATE, Int16Audio, StreamResampler, resample_pcm, rms_dbfs
from .transports.ice import (
    aiortc_ice_servers,
    chosen_turn_server,
    has_relay_candidate,
    rtc_configuration,
    turn_allocation_error,
)
from .transports.jitter import set_jitter_buffer
from .transports.tracks import PacedAudioTrack

log = logging.getLogger(__name__)

SPEECH_DBFS = -45.0  # quieter than this is treated as silence when timing speech
API = "/api/v1/voice"


class CallError(RuntimeError):
    pass


def speech_end_offset(pcm: Int16Audio, rate: int, threshold_dbfs: float = SPEECH_DBFS) -> int:
    """Sample index just after the last 10 ms block louder than ``threshold_dbfs``."""
    block = rate // 100
    last = 0
    for i in range(0, pcm.size, block):
        if rms_dbfs(pcm[i : i + block]) > threshold_dbfs:
            last = min(pcm.size, i + block)
    return last


@dataclass
class ReceivedAudio:
    chunks: list[Int16Audio] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # arrival time of each chunk

    def pcm(self) -> Int16Audio:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)

    def first_sound_after(self, t: float, threshold_dbfs: float = SPEECH_DBFS) -> float | None:
        for chunk, at in zip(self.chunks, self.times, strict=True):
            if at >= t and rms_dbfs(chunk) > threshold_dbfs:
                return at
        return None

    def between(self, t0: float, t1: float) -> Int16Audio:
        parts = [c for c, at in zip(self.chunks, self.times, strict=True) if t0 <= at < t1]
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)


@dataclass(frozen=True)
class CandidatePair:
    """The ICE candidate pair a call's media and events flow over."""

    local_type: str  # host, srflx or relay
    remote_type: str
    local_address: tuple[str, int]
    remote_address: tuple[str, int]


class VoiceCallClient:
    """A headless caller.

    ``relay_only`` forces iceTransportPolicy "relay": the call goes through the TURN server that
    ``session/start`` hands out, or fails saying why (for diagnosing TURN). aiortc uses one TURN
    URL; ``turn_transport`` (udp, tcp or tls) picks which of the offered ones.
    ``jitter_frames`` sizes the inbound jitter buffer in 20 ms frames; None keeps aiortc's 4.
    """

    def __init__(
        self,
        server: str,
        *,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        token: str | None = None,
        relay_only: bool = False,
        turn_transport: str | None = None,
        jitter_frames: int | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.on_event = on_event
        self.token = token
        self.relay_only = relay_only
        self.turn_transport = turn_transport
        self.jitter_frames = jitter_frames
        self.started: dict[str, Any] | None = None  # the session/start answer
        self.turn_server: RTCIceServer | None = None  # the TURN server this peer uses, if any
        self.candidate_pair: CandidatePair | None = None  # as selected when the call connected
        self.session_id: str | None = None
        self.pc: RTCPeerConnection | None = None
        self.mic = PacedAudioTrack()
        self.received = ReceivedAudio()
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.speech_ends: list[float] = []  # when the last speech sample of each played clip left
        self._event_cond = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: aiohttp.ClientSession | None = None
        self._channel_open = asyncio.Event()
        self._closed = False

    # -- connecting -------------------------------------------------------------------------------
    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self._http is not None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self._http.post(self.server + path, json=body, headers=headers) as resp:
            data: dict[str, Any] = await resp.json(content_type=None)
            if resp.status >= 400:
                err = data.get("error", {}) if isinstance(data, dict) else {}
                raise CallError(f"{path}: HTTP {resp.status} {err.get('code')}: {err.get('message')}")
            return data

    async def start_session(
        self, session: dict[str, Any] | None = None, timeout: float = 20.0
    ) -> dict[str, Any]:
        """``POST session/start``; :meth:`connect` calls it unless it was called already."""
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        started = await self._post(f"{API}/session/start", session or {})
        self.started = started
        self.session_id = started["session_id"]
        return started

    async def connect(self, *, session: dict[str, Any] | None = None, timeout: float = 20.0) -> None:
        started = self.started or await self.start_session(session, timeout)
        try:
            ice = aiortc_ice_servers(started.get("ice_servers", []), turn_transport=self.turn_transport)
        except ValueError as exc:
            raise CallError(f"the server's ice_servers are unusable: {exc}") from None
        self.turn_server = chosen_turn_server(ice)
        if self.relay_only and self.turn_server is None:
            raise CallError(
                "relay-only needs a TURN server, and session/start offered none: "
                "configure the server's --ice-servers with a turn: URL and --turn-secret"
            )
        pc = RTCPeerConnection(rtc_configuration(ice, relay_only=self.relay_only))
        self.pc = pc
        failed = asyncio.Event()

        @pc.on("connectionstatechange")
        def _state() -> None:
            if pc.connectionState == "failed":
                failed.set()

        sender = pc.addTrack(self.mic)
        if self.jitter_frames is not None:
            receiver = next(t.receiver for t in pc.getTransceivers() if t.sender is sender)
            set_jitter_buffer(receiver, self.jitter_frames)
        channel = pc.createDataChannel("events")

        @channel.on("open")
        def _open() -> None:
            self._channel_open.set()

        @channel.on("message")
        def _message(message: str | bytes) -> None:
            self._spawn(self._on_message(message))

        self._channel = channel
        pc.on("track", self._on_track)
        await pc.setLocalDescription(await pc.createOffer())
        if self.relay_only and not has_relay_candidate(pc.localDescription.sdp):
            await self._explain_missing_relay()
        answer = await self._post(
            started.get("offer_url", f"{API}/session/{self.session_id}/offer"),
            {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type},
        )
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await self._wait_connected(failed, timeout)
        self.candidate_pair = self.selected_candidate_pair()

    async def _explain_missing_relay(self) -> None:
        assert self.turn_server is not None
        url = self.turn_server.urls
        reason = await turn_allocation_error(self.turn_server)
        if reason is None:
            reason = "it granted a relay when asked again, so it may be overloaded or flaky"
        elif reason.startswith("401"):
            reason = f"it refused the credentials ({reason}): expired, or not made with its shared secret"
        raise CallError(f"relay-only: TURN server {url} gave no relay candidate: {reason}")

    async def _wait_connected(self, failed: asyncio.Event, timeout: float) -> None:
        opened = asyncio.ensure_future(self._channel_open.wait())
        broke = asyncio.ensure_future(failed.wait())
        try:
            await asyncio.wait([opened, broke], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            broke.cancel()
        if self._channel_open.is_set():
            return
        path = f" through TURN server {self.turn_server.urls}" if self.relay_only and self.turn_server else ""
        if failed.is_set():
            raise CallError(f"ICE failed: no candidate pair connected{path}")
        raise CallError(f"the call did not connect{path} within {timeout:.0f} s")

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._record(track))

    async def _record(self, track: MediaStreamTrack) -> None:
        resampler = StreamResampler(WEBRTC_RATE)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if not isinstance(frame, av.AudioFrame):
                continue
            self.received.chunks.append(resampler.frame(frame))
            self.received.times.append(time.monotonic())

    async def _on_message(self, message: str | bytes) -> None:
        try:
            event = json.loads(message)
        except ValueError:
            log.warning("non-JSON message from server: %r", message[:80])
            return
        async with self._event_cond:
            self.events.append((time.monotonic(), event))
            self._event_cond.notify_all()
        if self.on_event is not None:
            self.on_event(event)

    # -- talking ----------------------------------------------------------------------------------
    def play(self, pcm: Int16Audio, rate: int) -> None:
        """Speak ``pcm`` into the call (after anything already queued)."""
        audio = resample_pcm(pcm, rate, WEBRTC_RATE)
        start = self.mic.written
        self.mic.write(audio)
        end = speech_end_offset(audio, WEBRTC_RATE)

        async def mark() -> None:
            if end and await self.mic.wait_played(start + end):
                self.speech_ends.append(time.monotonic())

        self._spawn(mark())

    def send(self, event: dict[str, Any]) -> None:
        self._channel.send(json.dumps(event))

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0, *, after: int = 0
    ) -> dict[str, Any]:
        """The first event (from index ``after``) matching ``predicate``."""

        async def scan() -> dict[str, Any]:
            async with self._event_cond:
                seen = after
                while True:
                    for _t, event in self.events[seen:]:
                        if predicate(event):
                            return event
                    seen = len(self.events)
                    await self._event_cond.wait()

        return await asyncio.wait_for(scan(), timeout)

    async def wait_count(self, type_: str, n: int, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until ``n`` events of ``type_`` have arrived; returns the n-th."""
        await self.wait_for(lambda _e: len(self.of_type(type_)) >= n, max(0.01, timeout))
        return self.of_type(type_)[n - 1]

    def event_time(self, event: dict[str, Any]) -> float:
        for t, e in self.events:
            if e is event:
                return t
        raise KeyError("event not received")

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for _t, e in self.events if e.get("type") == type_]

    def selected_candidate_pair(self) -> CandidatePair | None:
        """The nominated ICE pair while the call is up, e.g. a local 'relay' to a remote 'host'."""
        if self.pc is None:
            return None
        # aiortc reports no candidate-pair stats; the nominated pair lives on aioice's Connection.
        # Audio and data share one bundled transport, so the first transceiver's is the call's.
        for transceiver in self.pc.getTransceivers():
            ice = transceiver.sender.transport.transport
            nominated = getattr(getattr(ice, "_connection", None), "_nominated", {})
            pair = nominated.get(1)
            if pair is not None:
                local, remote = pair.local_candidate, pair.remote_candidate
                return CandidatePair(
                    local_type=local.type,
                    remote_type=remote.type,
                    local_address=(local.host, local.port),
                    remote_address=(remote.host, remote.port),
                )
        return None

    def selected_candidate_types(self) -> tuple[str, str] | None:
        """(local, remote) candidate types of the nominated ICE pair, e.g. ('relay', 'host')."""
        pair = self.selected_candidate_pair()
        return None if pair is None else (pair.local_type, pair.remote_type)

    # -- closing ----------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, *, end_session: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if end_session and self.session_id and self._http is not None:
            with contextlib.suppress(CallError, aiohttp.ClientError, asyncio.TimeoutError):
                await self._post(f"{API}/session/end", {"session_id": self.session_id})
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.mic.stop()
        if self.pc is not None:
            await self.pc.close()
        if self._http is not None:
            await self._http.close()
