"""Keeping a call's messages: the recorder the server gives a call, and the writes a call waits for."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from ..engines.base import ChatMessage


class Recorder(Protocol):
    """Keeps the call's messages in the thread it belongs to (the server's store)."""

    def record(self, message: ChatMessage, meta: dict[str, Any]) -> asyncio.Future[str | None]:
        """Queue one message for writing (order is kept); resolves to its stored id once it is durable.

        A failed write is the recorder's to report: the future resolves (to None) all the same,
        so a broken database never stalls the call.
        """
        ...

    async def switch_thread(self, thread_id: str) -> list[ChatMessage]:
        """Move the call to another thread; returns its history. LookupError if not allowed."""
        ...


class Writes:
    """The messages one call is storing: never cancelled with the turn that wrote them, awaited at close."""

    def __init__(self, recorder: Recorder | None) -> None:
        self.recorder = recorder
        self._pending: set[asyncio.Future[str | None]] = set()

    async def store(self, message: ChatMessage, meta: dict[str, Any]) -> str | None:
        """The stored id once the message is durable (None without a recorder, or if the write failed)."""
        if self.recorder is None:
            return None
        written = self.recorder.record(message, meta)
        self._pending.add(written)
        written.add_done_callback(self._pending.discard)
        # Shielded: a turn cancelled mid-write (barge-in, the end of the call) leaves the write to
        # finish, and drain waits for it.
        return await asyncio.shield(written)

    async def drain(self, timeout_s: float) -> int:
        """Wait for every write; returns how many were still pending after ``timeout_s``."""
        if not self._pending:
            return 0
        _done, pending = await asyncio.wait(set(self._pending), timeout=timeout_s)
        return len(pending)
