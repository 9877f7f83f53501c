"""Threads and messages shared by text chat and voice calls: the types and the Store interface.

A thread (a row of the threads table: ``conversations``, or the app's own, see schema.py) belongs
to one user, or to nobody: in unauthenticated mode every thread has ``user_id`` None, and
``list_threads(None)`` lists exactly those. A user's threads never show up for another user or
for ``None``, so turning auth on later does not expose the anonymous history, nor the other way
round.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, runtime_checkable

if TYPE_CHECKING:
    # Types only: the store must not drag the engines (and their imports) in at run time.
    from ..engines.base import ChatMessage, Role

log = logging.getLogger("rtcvoice.store")

ContentType = Literal["text", "voice"]

ROLES: frozenset[str] = frozenset({"user", "assistant", "system"})
CONTENT_TYPES: frozenset[str] = frozenset({"text", "voice"})
# Ids can come from clients (thread_id on session/start); bound them so a row stays a row.
MAX_ID_LENGTH = 128


class StoreError(Exception):
    """The store refused or failed an operation; the message says which and why."""


class ThreadNotFound(StoreError):
    """The thread id names no thread (e.g. add_message to a thread that was never created)."""


class ThreadExists(StoreError):
    """create_thread was given the id of a thread that already exists."""


def iso_utc(ts: float) -> str:
    """``2024-05-01T12:00:00.123Z``: the form JavaScript's ``Date`` parses everywhere."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Thread:
    id: str
    user_id: str | None
    title: str
    created_at: float
    updated_at: float

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "title": self.title,
            "created_at": iso_utc(self.created_at),
            "updated_at": iso_utc(self.updated_at),
            "created_at_ts": self.created_at,
            "updated_at_ts": self.updated_at,
        }


@dataclass(frozen=True)
class StoredMessage:
    id: str
    thread_id: str
    role: Role
    content: str
    # str, not ContentType: an app's own rows may say "image" or "file"; rtcvoice writes only
    # "text" and "voice".
    content_type: str
    interrupted: bool
    session_id: str | None
    turn_id: str | None
    created_at: float

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "thread_id": self.thread_id,
            "role": self.role,
            "content": self.content,
            "content_type": self.content_type,
            "interrupted": self.interrupted,
            "session_id": self.session_id,
            "turn_id": self.turn_id,
            "created_at": iso_utc(self.created_at),
            "created_at_ts": self.created_at,
        }

    def as_chat_message(self) -> ChatMessage:
        """The message as agent context."""
        return {"role": self.role, "content": self.content}


@runtime_checkable
class Store(Protocol):
    async def open(self) -> None:
        """Connect and create the schema if it is missing. Idempotent."""

    async def close(self) -> None:
        """Release connections and threads. Idempotent; the store can be opened again."""

    async def create_thread(
        self, user_id: str | None, title: str = "", thread_id: str | None = None
    ) -> Thread:
        """A new thread; ``thread_id`` None picks a fresh UUID. An existing id raises ThreadExists."""

    async def get_thread(self, thread_id: str) -> Thread | None: ...

    async def list_threads(self, user_id: str | None, limit: int = 50) -> list[Thread]:
        """The user's threads (``None``: the threads without a user), most recently updated first."""

    async def add_message(
        self,
        thread_id: str,
        role: str,
        content: str,
        *,
        content_type: str = "voice",
        interrupted: bool = False,
        session_id: str | None = None,
        turn_id: str | None = None,
    ) -> StoredMessage:
        """Append a message and bump the thread's ``updated_at``.

        The row is committed before this returns: a process killed right after keeps it.
        An unknown thread raises ThreadNotFound; a bad role or content type, StoreError.
        """

    async def list_messages(self, thread_id: str, limit: int = 500) -> list[StoredMessage]:
        """The thread's latest ``limit`` messages, oldest first, in insertion order.

        An unknown thread has no messages. Insertion order comes from a sequence column, so
        messages added within the same clock tick still come back in the order they were added.
        """

    async def add_tool_calls(
        self, thread_id: str, after_message_id: str, turn_id: str | None, messages: list[dict[str, Any]]
    ) -> None:
        """Keep the tool calls and results of one reply (OpenAI-format messages), after the
        message ``after_message_id`` (the user's, which the reply answers). Committed on return.

        In a table of rtcvoice's own (TOOL_CALLS_TABLE), beside the app's threads and messages:
        an app's messages table need not take a "tool" role or a JSON column.
        """

    async def list_tool_calls(self, thread_id: str) -> dict[str, list[dict[str, Any]]]:
        """The thread's tool calls and results, by the message they follow, in the order kept."""


TOOL_CALLS_TABLE = "rtcvoice_tool_calls"


def tool_calls_by_message(rows: Iterable[tuple[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """(after_message_id, JSON list) rows, in order, as the lists of messages by message id."""
    found: dict[str, list[dict[str, Any]]] = {}
    for after, raw in rows:
        try:
            messages = json.loads(raw)
        except ValueError:
            continue
        if isinstance(messages, list):
            found.setdefault(str(after), []).extend(m for m in messages if isinstance(m, dict))
    return found


# -- helpers shared by the backends ------------------------------------------------------------


class MonotonicClock:
    """Wall-clock seconds that never repeat or go back within one process.

    Threads are listed by ``updated_at``: two updates in the same clock tick (or across an NTP
    step back) would otherwise tie or invert, and "most recent first" would be a coin toss.
    ``resolution`` (e.g. 0.001 for a column that keeps milliseconds) makes every reading a whole
    multiple of it, so two readings stay apart once the column has rounded them.
    """

    _STEP = 1e-6  # well above a double's resolution near 2e9 s (about 2.4e-7)

    def __init__(self, resolution: float | None = None) -> None:
        self._last = 0.0
        self._units = 0
        self._resolution = resolution
        self._lock = threading.Lock()

    @property
    def resolution(self) -> float | None:
        return self._resolution

    def now(self) -> float:
        with self._lock:
            if self._resolution is None:
                self._last = max(time.time(), self._last + self._STEP)
                return self._last
            # Counted in whole units: repeated float steps would drift off the grid.
            self._units = max(math.ceil(time.time() / self._resolution), self._units + 1)
            return self._units * self._resolution


def log_orphaned_failure(done: asyncio.Future[Any]) -> None:
    """Done-callback for a write whose caller was cancelled: nobody awaits its outcome any more,
    so a failure has to show in the log instead."""
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.error("a store write whose caller was cancelled failed: %s", exc, exc_info=exc)


def draft_message(
    thread_id: str,
    role: str,
    content: str,
    content_type: str,
    interrupted: bool,
    session_id: str | None,
    turn_id: str | None,
) -> StoredMessage:
    """A checked message, not yet stored (``created_at`` is the store's to stamp)."""
    return StoredMessage(
        id=new_id(),
        thread_id=thread_id,
        role=check_role(role),
        content=content,
        content_type=check_content_type(content_type),
        interrupted=bool(interrupted),
        session_id=check_optional_id(session_id, "session_id"),
        turn_id=check_optional_id(turn_id, "turn_id"),
        created_at=0.0,
    )


def new_id() -> str:
    return str(uuid.uuid4())


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        raise StoreError(f"{what} must be a string of 1 to {MAX_ID_LENGTH} characters")
    return value


def check_optional_id(value: str | None, what: str) -> str | None:
    return None if value is None else check_id(value, what)


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise StoreError(f"role must be one of {sorted(ROLES)}, not {role!r}")
    return cast("Role", role)


def check_content_type(content_type: str) -> ContentType:
    if content_type not in CONTENT_TYPES:
        raise StoreError(f"content_type must be one of {sorted(CONTENT_TYPES)}, not {content_type!r}")
    return cast("ContentType", content_type)


def check_limit(limit: int) -> int:
    if limit < 1:
        raise StoreError(f"limit must be at least 1, not {limit}")
    return limit
