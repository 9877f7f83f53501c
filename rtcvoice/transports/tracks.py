"""A paced outbound audio track: 20 ms frames at 48 kHz, silence when idle, instant flush.

It is both the AI's voice on the server and the microphone of the headless client. Samples are
queued with :meth:`write`; aiortc's sender calls :meth:`recv` and gets one frame every 20 ms of
wall-clock time (the pts advances by exactly one frame per call, so the receiver sees a steady
clock even if a call comes late). The playhead is tracked in samples so callers can wait for a
given sample to be played (first-audio latency, knowing what was said before a barge-in).

:class:`OpusAudioTrack` is the same track handing aiortc Opus packets instead of frames. Given
a frame, aiortc's sender measures its level in a pure-Python loop over every sample (RFC 6465,
~135 us a frame), then encodes it as 48 kHz stereo at 96 kbps in the default executor (~265 us),
50 times a second whether the AI speaks or not: the largest part of a call's media CPU
(``rtcvoice bench --floor``). Here speech is encoded as what it is, mono, at a voice bitrate, and
steady silence (most of a call) is the encoder's own silence packet, repeated without encoding.
The server speaks through it; the headless client's microphone stays on aiortc's encoder, whose
96 kb/s the accuracy tests were set against.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ..audio import WEBRTC_RATE, Int16Audio

FRAME_SAMPLES = WEBRTC_RATE // 50  # 20 ms
TIME_BASE = fractions.Fraction(1, WEBRTC_RATE)
# A frame pulled this much later than its slot means the receiver heard a gap.
UNDERRUN_SLACK_S = 0.06
# About what browsers send a microphone at (mono); aiortc's own encoder spends 96 kb/s on
# stereo copies of the same samples. The bitrate barely changes the encoder's CPU.
OPUS_BITRATE = 32_000


class Playhead:
    """Queued samples and a playhead, in monotonic sample positions; what every AudioSink needs.

    ``write`` queues, ``take`` plays, ``flush`` drops what is unplayed; ``wait_played`` lets the
    conversation learn when a given sample was played (first-audio latency, what was heard).
    """

    def __init__(self) -> None:
        self._queue: deque[Int16Audio] = deque()
        self._offset = 0  # samples of _queue[0] already played
        self.written = 0  # samples ever queued
        self.played = 0  # playhead, in the same coordinates as ``written``
        self._waiters: list[tuple[int, asyncio.Future[bool]]] = []
        self.first_audio_at: float | None = None
        # Paused: the playhead holds still and silence is played, so a reply that may have been
        # interrupted by a cough resumes at the very sample where it stopped.
        self.paused = False

    @property
    def queued(self) -> int:
        return self.written - self.played

    def write(self, pcm: Int16Audio) -> int:
        """Queue mono int16 samples; returns the position just after them."""
        if pcm.size:
            self._queue.append(pcm.astype(np.int16, copy=False))
            self.written += int(pcm.size)
        return self.written

    def flush(self) -> int:
        """Drop everything not yet played; returns the playhead position before the flush."""
        heard = self.played
        self._queue.clear()
        self._offset = 0
        self.played = self.written
        self.paused = False
        for _pos, fut in self._waiters:
            if not fut.done():
                fut.set_result(False)
        self._waiters.clear()
        return heard

    def wait_played(self, position: int) -> asyncio.Future[bool]:
        """Resolves True once the sample before ``position`` is played, False if it was flushed."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self.played >= position:
            fut.set_result(True)
        else:
            self._waiters.append((position, fut))
        return fut

    def take(self, n: int, *, pad: bool = True) -> Int16Audio:
        """Up to ``n`` queued samples (zero-padded to ``n`` when ``pad``), advancing the playhead."""
        out = np.zeros(n, dtype=np.int16)
        if self.paused:
            return out if pad else out[:0]
        filled = 0
        while filled < n and self._queue:
            head = self._queue[0]
            chunk = head[self._offset : self._offset + (n - filled)]
            out[filled : filled + chunk.size] = chunk
            filled += chunk.size
            self._offset += chunk.size
            if self._offset >= head.size:
                self._queue.popleft()
                self._offset = 0
        if filled:
            if self.first_audio_at is None:
                self.first_audio_at = time.monotonic()
            self.played += filled
            self._wake()
        return out if pad else out[:filled]

    def _wake(self) -> None:
        still: list[tuple[int, asyncio.Future[bool]]] = []
        for pos, fut in self._waiters:
            if fut.done():
                continue
            if self.played >= pos:
                fut.set_result(True)
            else:
                still.append((pos, fut))
        self._waiters = still


class PlayheadSink:
    """The AudioSink protocol over a :class:`Playhead`; transports add how samples leave."""

    sample_rate: int

    def __init__(self) -> None:
        self.playhead = Playhead()

    @property
    def queued(self) -> int:
        return self.playhead.queued

    @property
    def written(self) -> int:
        return self.playhead.written

    def write(self, pcm: Int16Audio) -> int:
        return self.playhead.write(pcm)

    def flush(self) -> int:
        return self.playhead.flush()

    def pause(self) -> None:
        self.playhead.paused = True

    def resume(self) -> None:
        self.playhead.paused = False

    def wait_played(self, position: int) -> asyncio.Future[bool]:
        return self.playhead.wait_played(position)


class PacedTrack(PlayheadSink, MediaStreamTrack):
    """Pacing and the playhead; a subclass says what aiortc gets (frames or packets)."""

    kind = "audio"

    def __init__(self, sample_rate: int = WEBRTC_RATE) -> None:
        PlayheadSink.__init__(self)
        MediaStreamTrack.__init__(self)
        if sample_rate != WEBRTC_RATE:
            raise ValueError("PacedAudioTrack sends 48 kHz; resample before writing")
        self.sample_rate = sample_rate
        self._start: float | None = None
        self._pts = 0
        self.frames_sent = 0
        self.late_frames = 0

    # -- aiortc side ---------------------------------------------------------------------------
    async def _next_samples(self) -> Int16Audio:
        """The next 20 ms of the playhead, at its slot on the wall clock."""
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            self._pts += FRAME_SAMPLES
            due = self._start + self._pts / WEBRTC_RATE
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > UNDERRUN_SLACK_S:
                self.late_frames += 1
        self.frames_sent += 1
        return self.playhead.take(FRAME_SAMPLES)

    def stop(self) -> None:
        self.flush()
        super().stop()


def pcm_frame(samples: Int16Audio, pts: int) -> av.AudioFrame:
    """20 ms (or any run) of mono 48 kHz samples as the frame aiortc and the encoder take."""
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = WEBRTC_RATE
    frame.pts = pts
    frame.time_base = TIME_BASE
    return frame


class PacedAudioTrack(PacedTrack):
    """The paced track as PCM frames, for aiortc to encode (and for tests to read)."""

    async def recv(self) -> av.AudioFrame:
        samples = await self._next_samples()
        return pcm_frame(samples, self._pts)


class OpusAudioTrack(PacedTrack):
    """The paced track as Opus packets, which aiortc's sender only packs (see the module's doc).

    Every frame goes through the encoder until it is in its steady silence: zeros in, the same
    packet out twice in a row (three bytes; about 12 frames after speech, while the encoder's
    look-ahead and analysis drain). From there until the next sound, that packet is sent again
    without encoding: the same bytes the encoder would make, for none of its CPU.
    """

    def __init__(self, sample_rate: int = WEBRTC_RATE) -> None:
        super().__init__(sample_rate)
        self._encoder = opus_encoder()
        self._quiet: bytes | None = None  # the packet the last silent frame became
        self._silence: bytes | None = None  # the encoder's steady silence packet, once it is in it

    async def recv(self) -> av.Packet[Any]:
        samples = await self._next_samples()
        pts = self._pts
        loud = bool(samples.any())
        payload = None if loud else self._silence
        if payload is None:
            loop = asyncio.get_running_loop()
            payload = await loop.run_in_executor(None, self._encode, samples, pts)
            if loud:
                self._quiet = self._silence = None
            else:
                # A shortcut only where it changes nothing: handing over at the first silent
                # frame, to one silence packet for all, measured 10 ms later voice-to-voice.
                if payload == self._quiet:
                    self._silence = payload
                self._quiet = payload
        packet = av.Packet(payload)
        packet.pts = pts
        packet.time_base = TIME_BASE
        return packet

    def _encode(self, samples: Int16Audio, pts: int) -> bytes:
        # libopus makes exactly one packet of each 20 ms frame, from the first (FFmpeg's wrapper
        # holds none back).
        packets = self._encoder.encode(pcm_frame(samples, pts))
        return b"".join(bytes(p) for p in packets)


def opus_encoder() -> av.AudioCodecContext:
    codec = av.CodecContext.create("libopus", "w")
    assert isinstance(codec, av.AudioCodecContext)
    codec.sample_rate = WEBRTC_RATE
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = OPUS_BITRATE
    codec.open()
    return codec
