"""The registry of live calls: one entry per session id, each closed exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from .errors import ApiError
from .options import CallOptions
from .threads import ThreadRecorder

log = logging.getLogger(__name__)

ENDED_REMEMBERED = 4096


class Peer(Protocol):
    """A transport's side of one call (WebRTC peer connection or WebSocket)."""

    connected: asyncio.Event
    done: asyncio.Event
    end_reason: str | None  # the reason it closed itself with (a watchdog's peer_timeout, idle)

    @property
    def late_frames(self) -> int: ...

    @property
    def concealed_ms(self) -> float: ...

    async def close(self, reason: str = "ended") -> None: ...


@dataclass
class VoiceSession:
    id: str
    thread_id: str | None  # None: made when the call first stores a message
    user_id: str | None = None
    options: CallOptions = field(default_factory=CallOptions)
    created_at: float = field(default_factory=time.monotonic)
    peer: Peer | None = None
    recorder: ThreadRecorder | None = None
    closed: bool = False


class SessionRegistry:
    def __init__(self, *, max_sessions: int, start_timeout_s: float, connect_timeout_s: float) -> None:
        self.max_sessions = max_sessions
        self.start_timeout_s = start_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._sessions: dict[str, VoiceSession] = {}
        # Recently ended sessions (owner, reason): ending one again is not an error.
        self._ended: OrderedDict[str, tuple[str | None, str]] = OrderedDict()
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._late_frames_closed = 0
        self._concealed_ms_closed = 0.0
        # Prefix of the ids this registry makes: in a cluster, the node's id, so any node can find
        # a call's node from its id alone while the cluster registry is unreachable.
        self.id_prefix = ""
        # Told of every session opened and ended (the cluster registry, metrics); must not raise.
        self.on_open: list[Callable[[VoiceSession], None]] = []
        self.on_attach: list[Callable[[VoiceSession, Peer], None]] = []
        self.on_close: list[Callable[[VoiceSession, str], None]] = []

    @property
    def late_frames(self) -> int:
        """Outbound frames sent later than their 20 ms slot (a gap the caller hears), all calls."""
        live = sum(s.peer.late_frames for s in self._sessions.values() if s.peer is not None)
        return self._late_frames_closed + live

    @property
    def concealed_ms(self) -> float:
        """Inbound audio concealed for packets the network lost, all calls."""
        live = sum(s.peer.concealed_ms for s in self._sessions.values() if s.peer is not None)
        return round(self._concealed_ms_closed + live, 1)

    def __len__(self) -> int:
        return len(self._sessions)

    def count_for(self, user_id: str) -> int:
        return sum(1 for s in self._sessions.values() if s.user_id == user_id)

    def get(self, session_id: str) -> VoiceSession | None:
        return self._sessions.get(session_id)

    def ended_reason(self, session_id: str, user_id: str | None) -> str | None:
        """Why a recently ended session of this user ended; None if there was no such session."""
        owner, reason = self._ended.get(session_id, (None, None))
        if reason is None or (user_id is not None and owner != user_id):
            return None
        return reason

    def create(
        self,
        *,
        thread_id: str | None,
        user_id: str | None = None,
        options: CallOptions | None = None,
        session_id: str | None = None,
    ) -> VoiceSession:
        """A new session; ``session_id`` lets a backend name it (KeyError if that id is live)."""
        if session_id is not None and session_id in self._sessions:
            raise KeyError(session_id)
        session = VoiceSession(
            id=session_id or self.id_prefix + uuid.uuid4().hex,
            thread_id=thread_id,
            user_id=user_id,
            options=options or CallOptions(),
        )
        self._sessions[session.id] = session
        self._watch(session.id, self._expire_unoffered(session))
        for listener in self.on_open:
            listener(session)
        return session

    def attach(self, session: VoiceSession, peer: Peer, recorder: ThreadRecorder | None = None) -> None:
        session.peer = peer
        session.recorder = recorder
        for listener in self.on_attach:
            listener(session, peer)
        self._watch(session.id, self._expire_unconnected(session, peer))

    async def end(self, session_id: str, reason: str = "ended") -> bool:
        """Close the call once; ``reason`` is a code the client sees in ``session.ended``."""
        session = self._sessions.pop(session_id, None)
        if session is None or session.closed:
            return False
        session.closed = True
        self._ended[session_id] = (session.user_id, reason)
        while len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)
        watcher = self._watchers.pop(session_id, None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        if session.peer is not None:
            self._late_frames_closed += session.peer.late_frames
            self._concealed_ms_closed += session.peer.concealed_ms
            await session.peer.close(reason)
        if session.recorder is not None:
            await session.recorder.aclose()  # every message the call produced is written
        for listener in self.on_close:
            listener(session, reason)
        log.info("session %s closed (%s)", session_id, reason)
        return True

    async def close_all(self, reason: str = "server_shutdown") -> None:
        await asyncio.gather(*(self.end(sid, reason) for sid in list(self._sessions)))

    def _watch(self, session_id: str, coro: Awaitable[None]) -> None:
        old = self._watchers.pop(session_id, None)
        if old is not None:
            old.cancel()
        self._watchers[session_id] = asyncio.ensure_future(coro)

    async def _expire_unoffered(self, session: VoiceSession) -> None:
        await asyncio.sleep(self.start_timeout_s)
        if session.peer is None:
            await self.end(session.id, "offer_timeout")

    async def _expire_unconnected(self, session: VoiceSession, peer: Peer) -> None:
        try:
            await asyncio.wait_for(peer.connected.wait(), self.connect_timeout_s)
        except TimeoutError:
            await self.end(session.id, "ice_timeout")
            return
        await peer.done.wait()
        # Closed from its side: by its own watchdog (which says why), or by the client going.
        await self.end(
            session.id, peer.end_reason if peer.end_reason not in (None, "ended") else "peer_closed"
        )


def session_for(registry: SessionRegistry, session_id: str, user_id: str | None) -> VoiceSession:
    """The live session, if it is this user's. Another user's session does not exist for them.

    ``user_id`` is None in unauthenticated mode, where sessions are not tied to verified users.
    """
    session = registry.get(session_id)
    if session is None or (user_id is not None and session.user_id != user_id):
        raise ApiError(
            404,
            "session_not_found",
            f"No live session {session_id[:64]!r}; start one with POST /api/v1/voice/session/start.",
        )
    return session
