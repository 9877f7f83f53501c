"""The inbound audio jitter buffer of an aiortc receiver, which aiortc does not let you size, and
the concealment of lost packets, which aiortc does not do.

aiortc hands the Opus decoder only the packets that arrived: a lost 20 ms packet became a
20 ms hole, and the audio after it came 20 ms early (Whisper heard the words run together; the
caller's recording came out shorter than its words). libopus conceals a loss when it is given a
frame of length 0 (RFC 6716 section 3.2.1; ``opus_decode_frame`` treats ``len <= 1`` as lost),
but FFmpeg takes an empty packet for the end of the stream. So the packet after a gap is
repacked as one Opus packet of several frames (code 3, section 3.2.5): a zero-length frame for
each one lost, then its own. The decoder then outputs the concealment (its packet-loss
concealment, which continues the voice and fades out) and the new frame, in one piece of audio
as long as the gap and the frame together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.utils import uint16_add, uint32_add

log = logging.getLogger(__name__)

# A packet this far behind the newest is a restarted stream, not a late one.
MAX_MISORDER = 100
# The audio frames aiortc's own receiver holds before decoding.
AIORTC_FRAMES = 4
# An adaptive buffer (jitter_frames -1) grows up to this many frames (80 ms, aiortc's own depth),
# and gives a frame back after this many packets in order (10 s of 20 ms packets).
ADAPTIVE_MAX_FRAMES = 4
QUIET_PACKETS = 500
# An Opus packet holds at most 120 ms (48 frames, RFC 6716 section 3.2.5); longer gaps are
# concealed for their last 120 ms less the frame that ends them.
OPUS_RATE = 48000
MAX_PACKET_SAMPLES = OPUS_RATE * 120 // 1000
# Frame sizes (48 kHz samples) of the 32 TOC configurations: SILK 10/20/40/60 ms, hybrid
# 10/20 ms, CELT 2.5/5/10/20 ms.
_FRAME_SAMPLES = [480, 960, 1920, 2880] * 3 + [480, 960] * 2 + [120, 240, 480, 960] * 4


def opus_samples(packet: bytes) -> int | None:
    """The 48 kHz samples an Opus packet decodes to, from its TOC (None if malformed)."""
    if not packet:
        return None
    toc = packet[0]
    frame = _FRAME_SAMPLES[toc >> 3]
    code = toc & 3
    if code == 0:
        count = 1
    elif code in (1, 2):
        count = 2
    elif len(packet) < 2:
        return None
    else:
        count = packet[1] & 0x3F
    samples = frame * count
    return samples if 0 < samples <= MAX_PACKET_SAMPLES else None


def with_lost_frames(packet: bytes, lost: int) -> bytes:
    """``packet`` (one frame, TOC code 0) preceded by ``lost`` zero-length frames of its size."""
    toc = packet[0]
    assert toc & 3 == 0 and lost > 0
    # Code 3, VBR (0x80), no padding: the frame count, a length byte (0) for every frame but the
    # last, whose length is what remains.
    return bytes([toc | 3, 0x80 | (lost + 1), *([0] * lost)]) + packet[1:]


class ReorderBuffer:
    """Holds ``depth`` packets and releases the oldest as each new one comes: a packet up to
    ``depth`` frames late still finds its place, and a lost one is skipped (and concealed) at
    once.

    aiortc's JitterBuffer, built for video frames, waits for a missing packet until 16 newer ones
    have piled up, then drops the oldest to make room: one lost packet took several good frames
    after it with it (test_packet_loss.py), which is why raising the buffer once made recognition
    on a lossy network worse rather than better.

    With ``adaptive_max`` the depth follows the network, as browsers' NetEQ does: it starts at
    ``depth`` (0: each packet decoded on arrival, no delay), grows at once to how late the latest
    out-of-order packet came (up to ``adaptive_max``), and after ``quiet_packets`` packets in
    order shrinks by one frame, by releasing two frames as one Opus packet (no audio is dropped
    to shrink). On a clean network it costs nothing; on one that reorders, late packets are put
    in place instead of being concealed (bench/README.md, Lossy networks).
    """

    def __init__(
        self,
        depth: int,
        *,
        adaptive_max: int | None = None,
        quiet_packets: int = QUIET_PACKETS,
        is_opus: Callable[[int], bool] = lambda _pt: True,
    ) -> None:
        self.depth = depth
        self.adaptive_max = adaptive_max
        self.quiet_packets = quiet_packets
        self.is_opus = is_opus  # only Opus frames are joined to shrink the buffer
        self.deepest = depth  # the deepest the buffer has been
        self._held: dict[int, Any] = {}  # extended (unwrapped) sequence number -> packet
        self._newest: tuple[int, int] | None = None  # (sequence number, extended)
        self._released = -1  # the extended sequence number released last
        self._in_order = 0  # packets in order since the last one that came late

    def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
        seq = int(packet.sequence_number)
        if self._newest is None:
            ext = seq
        else:
            newest, newest_ext = self._newest
            ext = newest_ext + ((seq - newest + 32768) % 65536) - 32768
            if ext < newest_ext - MAX_MISORDER:  # a restarted stream: start over
                self._held.clear()
                self._released, ext = -1, seq
            elif self.adaptive_max is not None:
                self._adapt(newest_ext - ext)
        if ext <= self._released or ext in self._held:
            return False, None  # its moment has passed (concealed), or a duplicate
        self._held[ext] = packet
        if self._newest is None or ext > self._newest[1]:
            self._newest = (seq, ext)
        if len(self._held) <= self.depth:
            return False, None
        oldest = min(self._held)
        out = self._held.pop(oldest)
        data = out._data
        # (Only right after the frame released last: a gap before it is concealed frame by frame.)
        if len(self._held) > self.depth and oldest + 1 in self._held and oldest == self._released + 1:
            # Shrinking: this frame and the next leave together, so no audio is lost.
            after = self._held[oldest + 1]
            joined = self._joined(out, after)
            if joined is not None:
                del self._held[oldest + 1]
                oldest, data = oldest + 1, joined
        self._released = oldest
        return False, JitterFrame(data=data, timestamp=out.timestamp)

    def _adapt(self, late_by: int) -> None:
        assert self.adaptive_max is not None
        if late_by > 0:  # came after a newer packet: the depth it needed to be in time
            self._in_order = 0
            if late_by > self.depth:
                self.depth = min(self.adaptive_max, late_by)
                self.deepest = max(self.deepest, self.depth)
            return
        self._in_order += 1
        if self._in_order >= self.quiet_packets and self.depth > 0:
            self.depth -= 1
            self._in_order = 0

    def _joined(self, first: Any, second: Any) -> bytes | None:
        """Two consecutive one-frame Opus packets of the same configuration as one packet."""
        a: bytes = first._data
        b: bytes = second._data
        if not (a and b and self.is_opus(int(first.payload_type))) or a[0] != b[0] or a[0] & 3:
            return None
        if uint32_add(first.timestamp, _FRAME_SAMPLES[a[0] >> 3]) != second.timestamp:
            return None
        n = len(a) - 1
        if n > 1275:
            return None
        # Code 3, VBR, two frames: the first frame's length (RFC 6716 section 3.2.1), then both.
        size = bytes([n]) if n < 252 else bytes([252 + (n & 3), (n - 252 - (n & 3)) >> 2])
        return bytes([a[0] | 3, 0x80 | 2]) + size + a[1:] + b[1:]


class ConcealingBuffer:
    """Wraps a jitter buffer: the first packet after a gap in RTP time brings the loss with it.

    Only gaps in time count: a packet that comes late is already concealed (the buffer behind
    drops it), and sequence numbers need not move with time (DTX). ``concealed`` counts the
    48 kHz samples put in place of lost audio.
    """

    def __init__(self, inner: Any, is_opus: Callable[[int], bool] = lambda _pt: True) -> None:
        self.inner = inner
        self.is_opus = is_opus  # of an RTP payload type (PCMU and PCMA have no TOC to read)
        self._next: int | None = None  # the RTP time the next packet should start at
        self.concealed = 0
        # When the last packet came from the network (time.monotonic()): a vanished caller is
        # noticed from this, not from the audio decoded, which a busy server reads late.
        self.last_arrival: float | None = None

    def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
        self.last_arrival = time.monotonic()
        pli, frame = self.inner.add(packet)
        if frame is None:
            return pli, frame
        data, timestamp = frame.data, frame.timestamp
        samples = opus_samples(data) if self.is_opus(int(packet.payload_type)) else None
        if samples is None:
            return pli, frame  # not Opus as we know it: pass it on as it came
        if self._next is not None:
            gap = uint32_add(timestamp, -self._next)
            frame_samples = _FRAME_SAMPLES[data[0] >> 3]
            # A gap longer than half the 32-bit clock is the clock going back (a restart): none.
            lost = min(gap // frame_samples, MAX_PACKET_SAMPLES // frame_samples - 1) if gap < 2**31 else 0
            if lost > 0 and data[0] & 3 == 0:
                timestamp = uint32_add(timestamp, -lost * frame_samples)
                samples += lost * frame_samples
                self.concealed += lost * frame_samples
                frame = JitterFrame(data=with_lost_frames(data, lost), timestamp=timestamp)
        self._next = uint32_add(timestamp, samples)
        return pli, frame


class ArrivalOrderBuffer:
    """No buffering: each audio packet, a whole Opus frame, is decoded the moment it arrives.

    aiortc's JitterBuffer releases a frame only once a packet of the next one has come, which
    costs every reply 20 ms even at its smallest. A packet older than one already decoded is
    dropped (and concealed by the decoder like a lost one) instead of being waited for.
    """

    def __init__(self) -> None:
        self._newest: int | None = None

    def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
        seq = int(packet.sequence_number)
        if self._newest is not None:
            behind = uint16_add(self._newest, -seq)
            if behind == 0 or (0 < behind < MAX_MISORDER):
                return False, None  # a duplicate, or late: its moment has passed
        self._newest = seq
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)


def set_jitter_buffer(receiver: Any, frames: int | None) -> ConcealingBuffer | None:
    """Hold ``frames`` inbound audio frames before decoding; 0: none; None: aiortc's 4 (80 ms);
    negative: adaptive, from 0 up to ADAPTIVE_MAX_FRAMES as the network reorders packets.

    A frame is released once ``frames`` newer ones have arrived, so each costs 20 ms of
    voice-to-voice latency and buys tolerance to packet reordering. aiortc has no setting for
    it; the buffer is a private attribute, so a missing one only logs and keeps aiortc's default.
    Either way, lost packets are concealed (ConcealingBuffer).
    """
    name = "_RTCRtpReceiver__jitter_buffer"
    current = getattr(receiver, name, None)
    if not isinstance(current, JitterBuffer | ArrivalOrderBuffer | ReorderBuffer | ConcealingBuffer):
        log.warning("aiortc has no %s here; inbound jitter buffer left at its default", name)
        return None
    if frames is None:
        frames = AIORTC_FRAMES
    codecs: dict[int, Any] = getattr(receiver, "_RTCRtpReceiver__codecs", {})

    def is_opus(payload_type: int) -> bool:
        codec = codecs.get(payload_type)
        return codec is not None and str(codec.name).lower() == "opus"

    inner: ArrivalOrderBuffer | ReorderBuffer
    if frames < 0:
        inner = ReorderBuffer(0, adaptive_max=ADAPTIVE_MAX_FRAMES, is_opus=is_opus)
    elif frames == 0:
        inner = ArrivalOrderBuffer()
    else:
        inner = ReorderBuffer(frames)

    buffer = ConcealingBuffer(inner, is_opus)
    setattr(receiver, name, buffer)
    return buffer
