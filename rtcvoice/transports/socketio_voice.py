"""A voice session over Socket.IO events, for apps whose browser does the speech itself.

The app's page recognises speech and speaks replies with the browser's own APIs; the server gets
each final transcript as a ``voice-message`` event and answers with one ``voice-response``
``{messageId, text}`` once the whole reply is known and stored. The Conversation runs without
audio (no TTS), so history, threads, barge-in (a new transcript cuts the reply in progress) and
the agent are the same as on every other transport.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..conversation import ConversationFactory
from ..conversation.replies import APOLOGY
from .limits import CallLimits, RateLimiter, watch_length_and_idle

log = logging.getLogger(__name__)

# (event name, payload): emitted to the socket that owns the session, in order.
Emit = Callable[[str, dict[str, Any]], Awaitable[None]]


class SocketIoPeer:
    """One session on a Socket.IO connection. :meth:`close` is idempotent."""

    def __init__(
        self,
        *,
        session_id: str,
        make_conversation: ConversationFactory,
        emit: Emit,
        limits: CallLimits | None = None,
    ) -> None:
        self.session_id = session_id
        self._emit = emit
        self._outbox: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        self.conversation = make_conversation(None, self._on_event)
        self.conversation.request_end = lambda reason: self._tasks.append(
            asyncio.create_task(self.close(reason), name=f"sio-hang-up-{self.session_id}")
        )
        self.limits = limits or CallLimits()
        self._rate = RateLimiter(self.limits.event_rate_per_s, self.limits.event_burst)
        self.connected = asyncio.Event()
        self.done = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.end_reason: str | None = None  # why it closed, once it has (the registry records it)
        self.late_frames = 0  # no audio goes out
        self.concealed_ms = 0.0  # audio comes whole over TCP
        self._failed_turns: set[str] = set()

    def start(self) -> None:
        conversation = self.conversation
        self._tasks = [
            asyncio.create_task(self._write_loop(), name=f"sio-out-{self.session_id}"),
            # The Socket.IO heartbeat notices a vanished client (its disconnect ends the session).
            watch_length_and_idle(
                self.limits,
                last_activity=lambda: conversation.last_activity,
                end=self.close,
                name=f"sio-watchdog-{self.session_id}",
            ),
        ]
        conversation.start()
        self.connected.set()

    async def say(self, transcript: str) -> None:
        """The caller said ``transcript`` (recognised by the browser): answer it."""
        if self._closed:
            return
        if not self._rate.allow():
            self._queue_error(
                "rate_limited", f"At most {self.limits.event_rate_per_s:.0f} messages a second; dropped."
            )
            return
        await self.conversation.respond_to_text(transcript, spoken=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "end_of_response" and not event.get("interrupted"):
            # A reply cut short by the next transcript was never shown: nothing to speak. A turn
            # whose agent failed before saying anything gets the apology a voice call would hear,
            # so a page that speaks every voice-response does not go quiet (nor speak "").
            text = event.get("text", "")
            if not text and event.get("turn_id") in self._failed_turns:
                text = APOLOGY
            self._outbox.put_nowait(
                (
                    "voice-response",
                    {
                        "messageId": event.get("message_id"),
                        "text": text,
                        "sessionId": self.session_id,
                        "chatId": self.conversation.thread_id,
                        "usage": event.get("usage"),
                    },
                )
            )
        elif kind == "final_transcript":
            self._outbox.put_nowait(
                ("voice-transcript", {"sessionId": self.session_id, "transcript": event.get("text", "")})
            )
        elif kind == "error":
            if event.get("turn_id"):
                self._failed_turns.add(str(event["turn_id"]))
            self._queue_error(str(event.get("code", "error")), str(event.get("message", "")))

    def _queue_error(self, code: str, message: str) -> None:
        self._outbox.put_nowait(("error", {"code": code, "message": message, "sessionId": self.session_id}))

    async def _write_loop(self) -> None:
        while (item := await self._outbox.get()) is not None:
            try:
                await self._emit(*item)
            except Exception:  # the socket is gone: its disconnect ends the session
                log.info("session %s: could not emit %s", self.session_id, item[0], exc_info=True)

    async def close(self, reason: str = "ended") -> None:
        if self._closed:
            return
        self._closed = True
        self.end_reason = reason
        await self.conversation.aclose()
        self._outbox.put_nowait(("voice-session-ended", {"sessionId": self.session_id, "reason": reason}))
        self._outbox.put_nowait(None)
        current = asyncio.current_task()
        writer = self._tasks[0] if self._tasks else None
        if writer is not None and writer is not current:
            try:
                await asyncio.wait_for(asyncio.shield(writer), 1.0)
            except TimeoutError:
                log.info("session %s: could not deliver the last events", self.session_id)
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        self.done.set()
