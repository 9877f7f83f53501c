"""A call's link to its thread: loads the history the agent sees, and writes every message as it happens.

Writes go through one queue per call, in order, off the turn's critical path; closing the call
waits for the queue, so an ended call (or a server shutting down) has written everything it said.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ..engines.base import ChatMessage
from ..store import Store, StoreError, Thread, ThreadExists
from .errors import ApiError

log = logging.getLogger(__name__)

HISTORY_LIMIT = 200
NEW_THREAD_TITLE = "Voice call"


def _not_found(thread_id: str, why: str = "") -> ApiError:
    return ApiError(404, "thread_not_found", f"No thread {thread_id[:64]!r} for this user.{why}")


async def owned_thread(
    store: Store, thread_id: str, user_id: str | None, *, create: bool = False, title: str = NEW_THREAD_TITLE
) -> Thread:
    """The thread, if this user may use it; 404 otherwise (another user's thread does not exist for them).

    ``create``: an id the store does not know is the app's own chat id, so the thread is made
    for this user under that id (the app's text chat and the call then share it).
    """
    try:
        thread = await store.get_thread(thread_id)
        if thread is None and create:
            try:
                thread = await store.create_thread(user_id, title[:200], thread_id=thread_id)
            except ThreadExists:  # made by another request since: use it if it is this user's
                thread = await store.get_thread(thread_id)
    except StoreError as exc:
        # e.g. a name that cannot be an id of the app's table (letters for an integer column)
        raise _not_found(thread_id, f" The thread store refused it: {exc}") from None
    if thread is None or thread.user_id != user_id:
        raise _not_found(thread_id)
    return thread


async def thread_for(
    store: Store,
    thread_id: str | None,
    user_id: str | None,
    *,
    create_unknown: bool,
    title: str = NEW_THREAD_TITLE,
) -> Thread:
    """The thread a call or request names (see :func:`owned_thread`), or a new one if it names none."""
    if thread_id:
        return await owned_thread(store, thread_id, user_id, create=create_unknown, title=title)
    return await store.create_thread(user_id, title[:200])


async def load_history(store: Store, thread_id: str, limit: int = HISTORY_LIMIT) -> list[ChatMessage]:
    messages = await store.list_messages(thread_id, limit=limit)
    # What the AI's tools did, each reply's calls and results after the message they answered,
    # so a later call on the thread knows what was done (and the model sees its own calls).
    tools = await store.list_tool_calls(thread_id)
    history: list[ChatMessage] = []
    for m in messages:
        if m.role == "user":
            history.append({"role": "user", "content": m.content})
        elif m.role == "assistant":
            history.append({"role": "assistant", "content": m.content})
        for stored in tools.get(m.id, []):
            if (kept := _tool_message(stored)) is not None:
                history.append(kept)
    return history


def _tool_message(stored: dict[str, Any]) -> ChatMessage | None:
    """A kept tool-call message, or None for one that is neither an assistant call nor a result."""
    content = stored.get("content")
    content = content if isinstance(content, str) else ""
    if stored.get("role") == "assistant" and isinstance(stored.get("tool_calls"), list):
        return {"role": "assistant", "content": content, "tool_calls": stored["tool_calls"]}
    if stored.get("role") == "tool" and isinstance(stored.get("tool_call_id"), str):
        return {"role": "tool", "content": content, "tool_call_id": stored["tool_call_id"]}
    return None


_Write = tuple[ChatMessage, dict[str, Any], asyncio.Future[str | None]]


class ThreadRecorder:
    """Writes one call's messages, in order, to its thread.

    ``thread_id`` None: the thread is created (titled by the first message) when the first
    message is written, so a call that says nothing leaves no empty thread in the app's history;
    ``on_thread`` then learns its id.
    """

    def __init__(
        self,
        store: Store,
        *,
        user_id: str | None,
        thread_id: str | None,
        session_id: str,
        create_unknown: bool = False,
    ) -> None:
        self._store = store
        self.user_id = user_id
        self.thread_id = thread_id
        self.session_id = session_id
        self.create_unknown = create_unknown
        self.on_thread: Callable[[str], None] | None = None
        self._queue: asyncio.Queue[tuple[str | None, _Write] | None] = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(), name=f"recorder-{session_id}")
        self.written = 0
        self.failed = 0

    def record(self, message: ChatMessage, meta: dict[str, Any]) -> asyncio.Future[str | None]:
        done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        if self._writer.done():
            log.error("session %s: message recorded after the call closed: %r", self.session_id, message)
            done.set_result(None)
        else:
            self._queue.put_nowait((self.thread_id, (message, meta, done)))
        return done

    async def switch_thread(self, thread_id: str) -> list[ChatMessage]:
        try:
            await owned_thread(self._store, thread_id, self.user_id, create=self.create_unknown)
        except ApiError:
            raise LookupError(thread_id) from None
        self.thread_id = thread_id
        return await load_history(self._store, thread_id)

    async def _thread_for(self, queued: str | None, first: ChatMessage) -> str:
        if queued is not None:
            return queued
        if self.thread_id is None:
            thread = await self._store.create_thread(self.user_id, first["content"][:60] or NEW_THREAD_TITLE)
            self.thread_id = thread.id
            log.info("session %s: new thread %s", self.session_id, thread.id)
            if self.on_thread is not None:
                self.on_thread(thread.id)
        return self.thread_id

    async def _write_loop(self) -> None:
        closing = False
        while True:
            if closing and self._queue.empty():
                # Nothing awaits between this check and the end of the task, so a record() that
                # comes later sees the writer done and says so instead of queueing into the void.
                return
            item = await self._queue.get()
            if item is None:
                # What was recorded while the call was closing came after the marker: write it too.
                closing = True
                continue
            queued_thread, (message, meta, done) = item
            stored: str | None = None
            try:
                thread_id = await self._thread_for(queued_thread, message)
                if "tool_messages" in meta:  # a reply's tool calls, after the user's message
                    await self._store.add_tool_calls(
                        thread_id, str(meta["after_message_id"]), meta.get("turn_id"), meta["tool_messages"]
                    )
                    self.written += 1
                    continue
                saved = await self._store.add_message(
                    thread_id,
                    message["role"],
                    message["content"],
                    content_type=str(meta.get("content_type", "voice")),
                    interrupted=bool(meta.get("interrupted", False)),
                    session_id=self.session_id,
                    turn_id=meta.get("turn_id"),
                )
                stored = saved.id
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
                    done.set_result(stored)

    async def aclose(self) -> None:
        """Finish every queued write, then stop. Idempotent."""
        if not self._writer.done():
            self._queue.put_nowait(None)
            await asyncio.shield(self._writer)
