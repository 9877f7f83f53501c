"""The inbound audio jitter buffer of an aiortc receiver, which aiortc does not let you size."""

from __future__ import annotations

import logging
from typing import Any

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.utils import uint16_add

log = logging.getLogger(__name__)

# A packet this far behind the newest is a restarted stream, not a late one.
MAX_MISORDER = 100


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


def set_jitter_buffer(receiver: Any, frames: int) -> None:
    """Hold ``frames`` inbound audio frames before decoding (aiortc fixes 4, i.e. 80 ms); 0: none.

    A frame is released once ``frames`` newer ones have arrived, so each costs 20 ms of
    voice-to-voice latency and buys tolerance to packet reordering. aiortc has no setting for
    it; the buffer is a private attribute, so a missing one only logs and keeps aiortc's default.
    """
    name = "_RTCRtpReceiver__jitter_buffer"
    current = getattr(receiver, name, None)
    if not isinstance(current, JitterBuffer | ArrivalOrderBuffer):
        log.warning("aiortc has no %s here; inbound jitter buffer left at its default", name)
        return
    buffer = ArrivalOrderBuffer() if frames <= 0 else JitterBuffer(capacity=16, prefetch=frames)
    setattr(receiver, name, buffer)
