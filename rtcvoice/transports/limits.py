"""Per-call limits every transport enforces: event rate, call length, silence of the peer, idling.

A misbehaving or vanished client must cost the server nothing: its events are rate limited, and
a watchdog ends its call when the peer stops sending anything, when nobody has said anything for
too long, or when the call reaches its maximum length.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5


@dataclass(frozen=True)
class CallLimits:
    max_call_s: float = 3600.0
    idle_timeout_s: float = 600.0
    peer_timeout_s: float = 15.0
    event_rate_per_s: float = 20.0
    event_burst: int = 40


class RateLimiter:
    """Token bucket: ``burst`` events at once, then ``rate`` per second."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


async def watchdog(
    limits: CallLimits,
    *,
    started: float,
    last_heard: Callable[[], float],
    last_activity: Callable[[], float],
    end: Callable[[str], Awaitable[None]],
) -> None:
    """End the call (``end(reason)``) at the first limit it crosses; runs until cancelled or ended."""
    wait = WATCH_INTERVAL_S
    while True:
        await asyncio.sleep(wait)
        now = time.monotonic()
        # Wake at the next deadline rather than up to an interval after it (a vanished peer was
        # reaped up to 0.5 s after --peer-timeout-s); still every interval, since a deadline
        # moves whenever the peer is heard.
        due = min(
            started + limits.max_call_s,
            last_heard() + limits.peer_timeout_s,
            last_activity() + limits.idle_timeout_s,
        )
        wait = min(WATCH_INTERVAL_S, max(0.02, due - now))
        if now - started >= limits.max_call_s:
            reason = "max_call_length"
        elif now - last_heard() >= limits.peer_timeout_s:
            reason = "peer_timeout"  # no media, no events: the tab closed or the network went
        elif now - last_activity() >= limits.idle_timeout_s:
            reason = "idle"
        else:
            continue
        log.info("call ends: %s", reason)
        await end(reason)
        return


def watch_length_and_idle(
    limits: CallLimits,
    *,
    last_activity: Callable[[], float],
    end: Callable[[str], Awaitable[None]],
    name: str,
) -> asyncio.Task[None]:
    """The watchdog of a transport whose own heartbeat notices a vanished client (WebSocket,
    Socket.IO): it keeps the call-length and idle limits only."""
    now = time.monotonic()
    return asyncio.create_task(
        watchdog(limits, started=now, last_heard=time.monotonic, last_activity=last_activity, end=end),
        name=name,
    )
