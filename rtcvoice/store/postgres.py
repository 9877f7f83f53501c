"""PostgreSQL store (``database_url``): the same tables and behaviour as the SQLite store.

Needs the ``postgres`` extra (asyncpg). Tables go to the first schema of the connection's
search_path; to keep them apart from an application's own tables in a shared database, add
``?search_path=rtcvoice`` to the URL (asyncpg passes unknown URL parameters on as settings).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from .base import (
    MESSAGE_COLUMNS,
    THREAD_COLUMNS,
    MonotonicClock,
    StoredMessage,
    StoreError,
    Thread,
    ThreadExists,
    ThreadNotFound,
    check_id,
    check_limit,
    check_optional_id,
    draft_message,
    log_orphaned_failure,
    message_from_row,
    new_id,
    thread_from_row,
)

T = TypeVar("T")

TABLES = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    user_id TEXT,
    title TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content TEXT NOT NULL,
    content_type TEXT NOT NULL DEFAULT 'voice' CHECK (content_type IN ('text', 'voice')),
    interrupted BOOLEAN NOT NULL DEFAULT FALSE,
    session_id TEXT,
    turn_id TEXT,
    created_at DOUBLE PRECISION NOT NULL
);
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS conversations_user_updated ON conversations (user_id, updated_at);
CREATE INDEX IF NOT EXISTS messages_conversation_seq ON messages (conversation_id, seq);
"""

# Servers starting together would race on CREATE TABLE IF NOT EXISTS (it is not atomic in
# PostgreSQL: the loser gets a unique violation on pg_type), so schema creation holds this lock.
_SCHEMA_LOCK_KEY = 0x72746376  # "rtcv"

_THREAD_SELECT = "SELECT " + ", ".join(THREAD_COLUMNS) + " FROM conversations"
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


class PostgresStore:
    """Threads and messages in PostgreSQL, through a small asyncpg pool.

    A write runs in a task of its own that the caller's cancellation does not reach (a turn
    cancelled by barge-in may be storing its reply): it commits whole or not at all, and
    ``close`` waits for it.
    """

    def __init__(self, url: str, *, min_connections: int = 1, max_connections: int = 4) -> None:
        self.url = url
        self._min = min_connections
        self._max = max_connections
        self._pool: asyncpg.Pool | None = None
        self._clock = MonotonicClock()
        self._lifecycle = asyncio.Lock()
        self._writes: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self.url)!r})"

    # -- lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._lifecycle:
            if self._pool is not None:
                return
            try:
                pool = await asyncpg.create_pool(self.url, min_size=self._min, max_size=self._max)
            except (*_DB_ERRORS, ValueError) as exc:
                raise StoreError(f"cannot connect to {redact_url(self.url)}: {exc}") from exc
            try:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
                    await conn.execute(TABLES)
                    # Before the indexes, whose errors would not say that the table is someone else's.
                    await _check_columns(conn, "conversations", THREAD_COLUMNS)
                    await _check_columns(conn, "messages", ("seq", *MESSAGE_COLUMNS))
                    await conn.execute(INDEXES)
            except BaseException as exc:
                await pool.close()
                if isinstance(exc, _DB_ERRORS):
                    raise StoreError(f"cannot create the schema in {redact_url(self.url)}: {exc}") from exc
                raise
            self._pool = pool

    async def close(self) -> None:
        async with self._lifecycle:
            if self._writes:
                # Their outcome reaches their callers (or the log); here they only must finish.
                await asyncio.wait(set(self._writes))
            pool, self._pool = self._pool, None
            if pool is not None:
                await pool.close()

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError(f"{self!r} is not open")
        return self._pool

    async def _read(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        pool = self._require_pool()
        try:
            async with pool.acquire() as conn:
                return await work(conn)
        except _DB_ERRORS as exc:
            raise StoreError(f"{redact_url(self.url)}: {exc}") from exc

    async def _write(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        pool = self._require_pool()

        async def run() -> T:
            try:
                async with pool.acquire() as conn, conn.transaction():
                    return await work(conn)
            except _DB_ERRORS as exc:
                raise StoreError(f"{redact_url(self.url)}: {exc}") from exc

        task = asyncio.create_task(run())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # Nobody awaits the outcome any more, so a failure has to show in the log instead.
            task.add_done_callback(log_orphaned_failure)
            raise

    # -- threads -----------------------------------------------------------------------------------

    async def create_thread(
        self, user_id: str | None, title: str = "", thread_id: str | None = None
    ) -> Thread:
        user = check_optional_id(user_id, "user_id")
        tid = new_id() if thread_id is None else check_id(thread_id, "thread_id")

        async def work(conn: asyncpg.Connection) -> Thread:
            now = self._clock.now()
            try:
                await conn.execute(
                    "INSERT INTO conversations (id, user_id, title, created_at, updated_at)"
                    " VALUES ($1, $2, $3, $4, $4)",
                    tid,
                    user,
                    title,
                    now,
                )
            except asyncpg.UniqueViolationError as exc:
                raise ThreadExists(f"thread {tid!r} already exists") from exc
            return Thread(id=tid, user_id=user, title=title, created_at=now, updated_at=now)

        return await self._write(work)

    async def get_thread(self, thread_id: str) -> Thread | None:
        async def work(conn: asyncpg.Connection) -> Thread | None:
            row = await conn.fetchrow(_THREAD_SELECT + " WHERE id = $1", thread_id)
            return None if row is None else thread_from_row(row)

        return await self._read(work)

    async def list_threads(self, user_id: str | None, limit: int = 50) -> list[Thread]:
        check_limit(limit)
        # Two spellings rather than IS NOT DISTINCT FROM, which cannot use the index.
        where = "user_id IS NULL" if user_id is None else "user_id = $2"
        args: tuple[object, ...] = (limit,) if user_id is None else (limit, user_id)

        async def work(conn: asyncpg.Connection) -> list[Thread]:
            rows = await conn.fetch(
                _THREAD_SELECT + f" WHERE {where} ORDER BY updated_at DESC, id DESC LIMIT $1", *args
            )
            return [thread_from_row(row) for row in rows]

        return await self._read(work)

    # -- messages ----------------------------------------------------------------------------------

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
        # created_at is stamped when the row is written: inside the transaction.
        message = draft_message(thread_id, role, content, content_type, interrupted, session_id, turn_id)

        async def work(conn: asyncpg.Connection) -> StoredMessage:
            now = self._clock.now()
            # GREATEST: a concurrent write that stamped a later time may have committed first.
            found = await conn.fetchval(
                "UPDATE conversations SET updated_at = GREATEST(updated_at, $2) WHERE id = $1 RETURNING id",
                thread_id,
                now,
            )
            if found is None:
                raise ThreadNotFound(f"no thread {thread_id!r}")
            await conn.execute(
                "INSERT INTO messages (" + ", ".join(MESSAGE_COLUMNS) + ")"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                message.id,
                thread_id,
                message.role,
                content,
                message.content_type,
                message.interrupted,
                message.session_id,
                message.turn_id,
                now,
            )
            return dataclasses.replace(message, created_at=now)

        # The transaction commits before _write returns. With the server's default
        # synchronous_commit=on, that is after the commit record is flushed to its WAL.
        return await self._write(work)

    async def list_messages(self, thread_id: str, limit: int = 500) -> list[StoredMessage]:
        check_limit(limit)
        columns = ", ".join(MESSAGE_COLUMNS)

        async def work(conn: asyncpg.Connection) -> list[StoredMessage]:
            rows = await conn.fetch(
                f"SELECT {columns} FROM (SELECT seq, {columns} FROM messages WHERE conversation_id = $1"
                " ORDER BY seq DESC LIMIT $2) AS latest ORDER BY seq",
                thread_id,
                limit,
            )
            return [message_from_row(row) for row in rows]

        return await self._read(work)


def redact_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


async def _check_columns(conn: asyncpg.Connection, table: str, wanted: tuple[str, ...]) -> None:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = $1",
        table,
    )
    have = {str(row[0]) for row in rows}
    missing = [c for c in wanted if c not in have]
    if missing:
        raise StoreError(
            f"table {table!r} exists but is not rtcvoice's (no column {', '.join(missing)}): use a "
            "database of its own, or add ?search_path=rtcvoice to the URL after CREATE SCHEMA rtcvoice"
        )
