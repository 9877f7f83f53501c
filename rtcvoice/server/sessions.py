"""The registry of live calls: one entry per session id, each closed exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..transports.webrtc import WebRtcPeer

log = logging.getLogger(__name__)


@dataclass
class VoiceSession:
    id: str
    user_id: str | None = None
    thread_id: str | None = None
    voice: str | None = None
    instructions: str | None = None
    created_at: float = field(default_factory=time.monotonic)
    peer: WebRtcPeer | None = None
    closed: bool = False


class SessionRegistry:
    def __init__(self, *, max_sessions: int, start_timeout_s: float, connect_timeout_s: float) -> None:
        self.max_sessions = max_sessions
        self.start_timeout_s = start_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._sessions: dict[str, VoiceSession] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._late_frames_closed = 0

    @property
    def late_frames(self) -> int:
        """Outbound frames sent later than their 20 ms slot (a gap the caller hears), all calls."""
        live = sum(s.peer.track.late_frames for s in self._sessions.values() if s.peer is not None)
        return self._late_frames_closed + live

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> VoiceSession | None:
        return self._sessions.get(session_id)

    def create(self, **fields: str | None) -> VoiceSession:
        session = VoiceSession(id=uuid.uuid4().hex, **fields)  # type: ignore[arg-type]
        self._sessions[session.id] = session
        self._watch(session.id, self._expire_unoffered(session))
        return session

    def attach(self, session: VoiceSession, peer: WebRtcPeer) -> None:
        session.peer = peer
        self._watch(session.id, self._expire_unconnected(session, peer))

    async def end(self, session_id: str, reason: str = "ended") -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None or session.closed:
            return False
        session.closed = True
        watcher = self._watchers.pop(session_id, None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        if session.peer is not None:
            self._late_frames_closed += session.peer.track.late_frames
            await session.peer.close()
        log.info("session %s closed (%s)", session_id, reason)
        return True

    async def close_all(self) -> None:
        await asyncio.gather(*(self.end(sid, "server shutdown") for sid in list(self._sessions)))

    def _watch(self, session_id: str, coro: Awaitable[None]) -> None:
        old = self._watchers.pop(session_id, None)
        if old is not None:
            old.cancel()
        self._watchers[session_id] = asyncio.ensure_future(coro)

    async def _expire_unoffered(self, session: VoiceSession) -> None:
        await asyncio.sleep(self.start_timeout_s)
        if session.peer is None:
            await self.end(session.id, f"no offer within {self.start_timeout_s:.0f} s")

    async def _expire_unconnected(self, session: VoiceSession, peer: WebRtcPeer) -> None:
        try:
            await asyncio.wait_for(peer.connected.wait(), self.connect_timeout_s)
        except TimeoutError:
            await self.end(session.id, f"ICE did not connect within {self.connect_timeout_s:.0f} s")
            return
        await peer.done.wait()
        await self.end(session.id, "peer closed")


SessionCloser = Callable[[str], Awaitable[bool]]
