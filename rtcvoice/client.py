"""A headless WebRTC caller: a real aiortc peer that speaks WAV audio into a rtcvoice server.

Used by ``rtcvoice call``, the tests and the benchmarks. It sends its "microphone" on a paced
track (speech, then silence, exactly as a quiet person would), records everything the server
sends back with arrival times, and measures voice-to-voice at the client: from the moment the
last speech sample left to the first audible sample that came back. Its :class:`TurnLedger` follows
which turns the server opened and closed, so a caller knows when everything it said was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .audio import WEBRTC_RATE, Int16Audio, StreamResampler, resample_pcm, rms_dbfs
from .transports.ice import (
    aiortc_ice_servers,
    chosen_turn_server,
    has_relay_candidate,
    rtc_configuration,
    turn_allocation_error,
)
from .transports.jitter import ConcealingBuffer, set_jitter_buffer
from .transports.tracks import PacedAudioTrack

log = logging.getLogger(__name__)

SPEECH_DBFS = -45.0  # quieter than this is treated as silence when timing speech
API = "/api/v1/voice"
# How long the call must be quiet (no event) before :meth:`VoiceCallClient.wait_answered` calls
# it answered: the speech at the very end of a WAV reaches the server's VAD and comes back as
# ``speech_started`` within a few hundred ms, and the reply's last frames trail its
# ``end_of_response`` by the jitter buffer.
QUIET_S = 1.0
# Errors without a turn id that answer a text_message: the server refused it, so no turn follows.
TEXT_REFUSALS = frozenset({"invalid_event", "message_too_large", "invalid_json"})


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


@dataclass
class CallTurn:
    """One turn of a call as the caller saw it, from the server's events."""

    turn_id: str
    spoken: bool  # the caller spoke it (it began with speech_stopped); else a typed message
    user_text: str | None = None  # the final transcript, or what was typed
    reply: str | None = None  # what the AI said, as far as it got (from end_of_response)
    ended: bool = False  # end_of_response came, interrupted or not
    interrupted: bool = False
    empty: bool = False  # noise: the transcript was empty, so nothing is answered
    error: str | None = None  # the code of the last error the server gave for it
    continues: str | None = None  # the earlier turn this one was joined to
    continued_by: str | None = None  # the later turn that took over this one's speech

    @property
    def settled(self) -> bool:
        """Whether the server is done with this turn and will say nothing more about it."""
        if self.ended or self.empty or self.continued_by is not None:
            return True
        # A spoken turn whose transcription failed ends with the error: nothing was heard to answer.
        return self.spoken and self.error is not None and self.user_text is None

    def as_summary(self) -> dict[str, Any]:
        row: dict[str, Any] = {"turn_id": self.turn_id, "you_said": self.user_text, "ai_said": self.reply}
        row["interrupted"] = self.interrupted
        if self.continues is not None:
            row["continues"] = self.continues
        if self.error is not None:
            row["error"] = self.error
        if not self.settled:
            row["unanswered"] = True
        return row


class TurnLedger:
    """Which turns the server has opened and closed, from its events.

    The rule for "the server has answered everything" (:attr:`settled`), counted by turn ids the
    server names, never by pairing one ``speech_started`` with one ``end_of_response``: a turn
    may be interrupted, joined to the speech after it (``final_transcript`` with ``continues``),
    paused and resumed (``playback_paused``/``playback_resumed``), or be noise that gets no reply.

    * ``speech_stopped`` opens a spoken turn (its ``turn_id``); a typed message opens a turn that
      the server names first in another event (``ai_text``, ``error``, ``end_of_response``).
    * A turn is closed by its ``end_of_response`` (interrupted or not); by an empty
      ``final_transcript`` (noise: no reply comes); by a later turn's ``continues`` naming it (the
      later turn answers its speech, and must close in turn); or, for a spoken turn, by an
      ``error`` before any transcript (transcription failed: there is nothing to answer).
    * Speech is pending from ``speech_started`` until ``speech_stopped``, or ``playback_resumed``
      (the server took the sound for noise and went on with its reply).
    * A typed message is pending until a turn the caller did not speak opens, or until an
      ``error`` without a turn id refuses it.

    Settled: no turn open, no speech pending, no typed message pending. Quiet (no event for a
    while) is the caller's to add: see :meth:`VoiceCallClient.wait_answered`.
    """

    def __init__(self) -> None:
        self.turns: dict[str, CallTurn] = {}  # in the order the server opened them
        self.hearing = False
        self.ended_reason: str | None = None  # from session.ended: the server hung up
        self._typed: deque[str] = deque()

    def typed(self, content: str) -> None:
        self._typed.append(content)

    def feed(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "speech_started":
            self.hearing = True
        elif kind in ("speech_stopped", "playback_resumed"):
            self.hearing = False
        elif kind == "session.ended":
            self.ended_reason = str(event.get("reason") or "ended")
        turn_id = event.get("turn_id")
        if not isinstance(turn_id, str):
            if kind == "error" and self._typed and event.get("code") in TEXT_REFUSALS:
                self._typed.popleft()
            return
        turn = self.turns.get(turn_id)
        if turn is None:
            turn = self._open(turn_id, spoken=kind in ("speech_stopped", "final_transcript"))
        if kind == "final_transcript":
            turn.user_text = str(event.get("text") or "")
            turn.empty = bool(event.get("empty")) or not turn.user_text.strip()
            earlier = event.get("continues")
            if isinstance(earlier, str):
                turn.continues = earlier
                self._open(earlier, spoken=True).continued_by = turn_id
        elif kind == "end_of_response":
            turn.ended = True
            turn.interrupted = bool(event.get("interrupted"))
            turn.reply = str(event.get("text") or "")
        elif kind == "error":
            turn.error = str(event.get("code") or "error")

    def _open(self, turn_id: str, *, spoken: bool) -> CallTurn:
        turn = self.turns.get(turn_id)
        if turn is None:
            turn = self.turns[turn_id] = CallTurn(turn_id, spoken)
            if not spoken and self._typed:
                turn.user_text = self._typed.popleft()  # the server answers typed messages in order
        return turn

    @property
    def settled(self) -> bool:
        return not self.hearing and not self._typed and all(t.settled for t in self.turns.values())

    def outstanding(self) -> str:
        """What the server has not finished, in words (for a message when the caller gives up)."""
        parts = []
        open_turns = [t.turn_id for t in self.turns.values() if not t.settled]
        if open_turns:
            parts.append(f"{len(open_turns)} turn(s) unanswered ({', '.join(open_turns)})")
        if self.hearing:
            parts.append("speech still being heard (speech_started, no speech_stopped yet)")
        if self._typed:
            parts.append(f"{len(self._typed)} typed message(s) unanswered")
        return ", ".join(parts) or "events still coming"

    def summary(self) -> list[dict[str, Any]]:
        """Each turn in order, with its transcript and reply; noise that got no reply is left out."""
        return [t.as_summary() for t in self.turns.values() if not t.empty]


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
        # The reply track's jitter buffer, once connected: ``inbound.concealed`` samples made up.
        self.inbound: ConcealingBuffer | None = None
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.speech_ends: list[float] = []  # when the last speech sample of each played clip left
        self.turns = TurnLedger()
        self.lost: str | None = None  # why the call went away under us, if it did
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
        pc, failed = self._peer(rtc_configuration(ice, relay_only=self.relay_only), "events")
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

    def _peer(self, configuration: RTCConfiguration, channel: str) -> tuple[RTCPeerConnection, asyncio.Event]:
        """The call's peer connection, before the offer: the microphone out, the reply recorded
        through the jitter buffer, a data channel named ``channel`` whose messages are events.
        The event is set if ICE fails (:meth:`_wait_connected`)."""
        pc = RTCPeerConnection(configuration)
        self.pc = pc
        failed = asyncio.Event()

        @pc.on("connectionstatechange")
        def _state() -> None:
            if pc.connectionState == "failed":
                failed.set()
            if pc.connectionState in ("failed", "closed") and self._channel_open.is_set():
                self._lose(f"the connection was lost ({pc.connectionState})")

        sender = pc.addTrack(self.mic)
        receiver = next(t.receiver for t in pc.getTransceivers() if t.sender is sender)
        self.inbound = set_jitter_buffer(receiver, self.jitter_frames)  # and lost packets concealed
        data = pc.createDataChannel(channel)

        @data.on("open")
        def _open() -> None:
            self._channel_open.set()

        @data.on("message")
        def _message(message: str | bytes) -> None:
            self._spawn(self._on_message(message))

        self._channel = data
        pc.on("track", self._on_track)
        return pc, failed

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
            self.turns.feed(event)
            if event.get("type") == "session.ended":
                self.lost = self.lost or f"the server ended the call ({self.turns.ended_reason})"
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

    async def wait_played(self, timeout: float | None = None) -> None:
        """Until everything :meth:`play` queued has been sent: the mic is paced, so real time.

        CallError if the call goes away first, or if it is not sent within ``timeout``.
        """
        played = self.mic.wait_played(self.mic.written)
        lost: asyncio.Future[Any] = asyncio.ensure_future(self._until_lost())
        try:
            await asyncio.wait([played, lost], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if self.lost is not None:
            raise CallError(self.lost)
        if not played.done():
            played.cancel()
            raise CallError(f"the microphone's audio was not all sent within {timeout:.0f} s")

    async def _until_lost(self) -> None:
        async with self._event_cond:
            await self._event_cond.wait_for(lambda: self.lost is not None)

    async def wait_answered(self, timeout: float, *, quiet_s: float = QUIET_S) -> None:
        """Until the server has answered everything it heard or was sent, and then ``quiet_s``
        passed without an event (counted from this call too, so call it once the WAV has been
        played: speech at its very end is heard by then). See :class:`TurnLedger` for the rule.

        TimeoutError after ``timeout`` (``self.turns.outstanding()`` says what is missing);
        CallError if the call goes away with turns still open.
        """
        since = time.monotonic()
        async with asyncio.timeout(timeout), self._event_cond:
            while True:
                if not self.turns.settled:
                    if self.lost is not None:
                        raise CallError(self.lost)
                    await self._event_cond.wait()
                    continue
                last = max(since, self.events[-1][0]) if self.events else since
                left = last + quiet_s - time.monotonic()
                if left <= 0 or self.lost is not None:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._event_cond.wait()

    def send(self, event: dict[str, Any]) -> None:
        if event.get("type") == "text_message" and isinstance(event.get("content"), str):
            self.turns.typed(event["content"])
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
    def _lose(self, why: str) -> None:
        if self._closed or self.lost is not None:
            return
        self.lost = why

        async def wake() -> None:  # waiters re-check ``lost`` under the condition
            async with self._event_cond:
                self._event_cond.notify_all()

        self._spawn(wake())

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
