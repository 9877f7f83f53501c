"""A call's link to its thread: loads the history the agent sees, and writes every message as it happens.

Writes go through one queue per call, in order, off the turn's critical path; closing the call
waits for the queue, so an ended call (or a server shutting down) has written everything it said.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..engines.base import ChatMessage
from ..store import Store, Thread
from .errors import ApiError

log = logging.getLogger(__name__)

HISTORY_LIMIT = 200


async def owned_thread(store: Store, thread_id: str, user_id: str | None) -> Thread:
    """The thread, if this user may use it; 404 otherwise (another user's thread does not exist for them)."""
    thread = await store.get_thread(thread_id)
    if thread is None or thread.user_id != user_id:
        raise ApiError(404, "thread_not_found", f"No thread {thread_id[:64]!r} for this user.")
    return thread


async def load_history(store: Store, thread_id: str, limit: int = HISTORY_LIMIT) -> list[ChatMessage]:
    messages = await store.list_messages(thread_id, limit=limit)
    history: list[ChatMessage] = []
    for m in messages:
        if m.role == "user":
            history.append({"role": "user", "content": m.content})
        elif m.role == "assistant":
            history.append({"role": "assistant", "content": m.content})
    return history


class ThreadRecorder:
    def __init__(self, store: Store, *, user_id: str | None, thread_id: str, session_id: str) -> None:
        self._store = store
        self.user_id = user_id
        self.thread_id = thread_id
        self.session_id = session_id
        self._queue: asyncio.Queue[tuple[str, ChatMessage, dict[str, Any], asyncio.Future[None]] | None] = (
            asyncio.Queue()
        )
        self._writer = asyncio.create_task(self._write_loop(), name=f"recorder-{session_id}")
        self.written = 0
        self.failed = 0

    def record(self, message: ChatMessage, meta: dict[str, Any]) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._writer.done():
            log.error("session %s: message recorded after the call closed: %r", self.session_id, message)
            done.set_result(None)
        else:
            self._queue.put_nowait((self.thread_id, message, meta, done))
        return done

    async def switch_thread(self, thread_id: str) -> list[ChatMessage]:
        try:
            await owned_thread(self._store, thread_id, self.user_id)
        except ApiError:
            raise LookupError(thread_id) from None
        self.thread_id = thread_id
        return await load_history(self._store, thread_id)

    async def _write_loop(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            thread_id, message, meta, done = item
            try:
                await self._store.add_message(
                    thread_id,
                    message["role"],
                    message["content"],
                    content_type=str(meta.get("content_type", "voice")),
                    interrupted=bool(meta.get("interrupted", False)),
                    session_id=self.session_id,
                    turn_id=meta.get("turn_id"),
                )
                self.written += 1
            except Exception:
                # Whatever went wrong, the writer must outlive it (the call waits on its futures);
                # the message is in the log so it can be recovered by hand.
                self.failed += 1
                log.exception(
                    "session %s: could not store %s message %r",
                    self.session_id,
                    message["role"],
                    message["content"][:200],
                )
            finally:
                if not done.done():
                    done.set_result(None)

    async def aclose(self) -> None:
        """Finish every queued write, then stop. Idempotent."""
        if not self._writer.done():
            self._queue.put_nowait(None)
            await asyncio.shield(self._writer)
