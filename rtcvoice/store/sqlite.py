"""The default store: one SQLite file in WAL mode, driven from one thread the store owns."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

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

log = logging.getLogger(__name__)

T = TypeVar("T")

TABLES = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    user_id TEXT,
    title TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    -- AUTOINCREMENT: a seq is never reused, even after deletes, so seq order is insertion order.
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content TEXT NOT NULL,
    content_type TEXT NOT NULL DEFAULT 'voice' CHECK (content_type IN ('text', 'voice')),
    interrupted INTEGER NOT NULL DEFAULT 0 CHECK (interrupted IN (0, 1)),
    session_id TEXT,
    turn_id TEXT,
    created_at REAL NOT NULL
);
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS conversations_user_updated ON conversations (user_id, updated_at);
CREATE INDEX IF NOT EXISTS messages_conversation_seq ON messages (conversation_id, seq);
"""

_THREAD_SELECT = "SELECT " + ", ".join(THREAD_COLUMNS) + " FROM conversations"


class SqliteStore:
    """Threads and messages in a SQLite file (``":memory:"`` for a throwaway store).

    sqlite3 calls block, so none runs on the event loop: every call goes to a single-thread
    executor that owns the one connection. One thread also serialises the writes of all
    sessions, which is what SQLite allows anyway, without lock contention inside the process.
    A write whose caller is cancelled still runs to its end on that thread (a turn cancelled
    by barge-in may be storing its reply), and ``close`` runs after it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # only ever touched on the executor's thread
        self._clock = MonotonicClock()
        self._lifecycle = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # -- lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._lifecycle:
            if self._executor is not None:
                return
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtcvoice-sqlite")
            try:
                await asyncio.get_running_loop().run_in_executor(executor, self._open_in_thread)
            except BaseException:
                executor.shutdown(wait=False)
                raise
            self._executor = executor

    async def close(self) -> None:
        async with self._lifecycle:
            executor, self._executor = self._executor, None
            if executor is None:
                return
            try:
                # Queued after any write still in flight, so those finish and commit first.
                await asyncio.get_running_loop().run_in_executor(executor, self._close_in_thread)
            finally:
                executor.shutdown(wait=False)

    def _open_in_thread(self) -> None:
        try:
            if self.path != ":memory:" and not self.path.startswith("file:"):
                parent = os.path.dirname(os.path.abspath(self.path))
                os.makedirs(parent, exist_ok=True)
            # isolation_level=None: no implicit BEGINs; every write below opens its own transaction.
            conn = sqlite3.connect(self.path, isolation_level=None, uri=self.path.startswith("file:"))
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        try:
            # Another process (a second server, the sqlite3 shell) may hold the write lock briefly.
            conn.execute("PRAGMA busy_timeout = 5000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal" and self.path != ":memory:":
                log.warning(
                    "SQLite %s is in journal mode %r, not WAL: readers will block writers", self.path, mode
                )
            # Why NORMAL is enough: in WAL mode a commit is a write() of its frames to the -wal
            # file. Once that returns, the bytes belong to the kernel's page cache, so a crash or
            # SIGKILL of this process cannot lose them; the next open replays the WAL. NORMAL
            # only skips the fsync per commit, so a commit can be lost to a power cut or an OS
            # crash (never corrupted: WAL stays consistent). SQLite's documentation for PRAGMA
            # synchronous: "Transactions are durable across application crashes regardless of
            # the synchronous setting or journal mode". The SIGKILL test in tests/test_store.py
            # checks exactly this. FULL would fsync every message for power-loss durability.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # Statement by statement: executescript() would COMMIT the open transaction first.
            with _transaction(conn):
                _execute_all(conn, TABLES)
                # Before the indexes, whose errors would not say that the table is someone else's.
                _check_columns(conn, "conversations", THREAD_COLUMNS)
                _check_columns(conn, "messages", ("seq", *MESSAGE_COLUMNS))
                _execute_all(conn, INDEXES)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot set up SQLite database {self.path!r}: {exc}") from exc
            raise
        self._conn = conn

    def _close_in_thread(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _require_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            raise StoreError(f"{self!r} is not open")
        return self._executor

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._require_executor(), self._call, work)

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        # Not run_in_executor: cancelling its future un-queues a job that has not started yet,
        # and a turn cancelled by barge-in would then lose the reply it was storing.
        done = asyncio.wrap_future(self._require_executor().submit(self._call, work))
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            done.add_done_callback(log_orphaned_failure)
            raise

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreError(f"{self!r} is closed")
        try:
            return work(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite {self.path!r}: {exc}") from exc

    # -- threads -----------------------------------------------------------------------------------

    async def create_thread(
        self, user_id: str | None, title: str = "", thread_id: str | None = None
    ) -> Thread:
        user = check_optional_id(user_id, "user_id")
        tid = new_id() if thread_id is None else check_id(thread_id, "thread_id")

        def work(conn: sqlite3.Connection) -> Thread:
            now = self._clock.now()
            try:
                conn.execute(
                    "INSERT INTO conversations (id, user_id, title, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (tid, user, title, now, now),
                )
            except sqlite3.IntegrityError as exc:
                raise ThreadExists(f"thread {tid!r} already exists") from exc
            return Thread(id=tid, user_id=user, title=title, created_at=now, updated_at=now)

        return await self._write(work)

    async def get_thread(self, thread_id: str) -> Thread | None:
        def work(conn: sqlite3.Connection) -> Thread | None:
            row = conn.execute(_THREAD_SELECT + " WHERE id = ?", (thread_id,)).fetchone()
            return None if row is None else thread_from_row(row)

        return await self._run(work)

    async def list_threads(self, user_id: str | None, limit: int = 50) -> list[Thread]:
        check_limit(limit)

        def work(conn: sqlite3.Connection) -> list[Thread]:
            # "IS" matches NULL to NULL, so user_id None lists exactly the threads without a user.
            rows = conn.execute(
                _THREAD_SELECT + " WHERE user_id IS ? ORDER BY updated_at DESC, id DESC LIMIT ?",
                (user_id, limit),
            ).fetchall()
            return [thread_from_row(row) for row in rows]

        return await self._run(work)

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
        # created_at is stamped when the row is written: on the store's thread, in commit order.
        message = draft_message(thread_id, role, content, content_type, interrupted, session_id, turn_id)

        def work(conn: sqlite3.Connection) -> StoredMessage:
            now = self._clock.now()
            with _transaction(conn):
                # max(): another process sharing the file may have stamped a later time already.
                updated = conn.execute(
                    "UPDATE conversations SET updated_at = max(updated_at, ?) WHERE id = ?", (now, thread_id)
                ).rowcount
                if updated == 0:
                    raise ThreadNotFound(f"no thread {thread_id!r}")
                conn.execute(
                    "INSERT INTO messages ("
                    + ", ".join(MESSAGE_COLUMNS)
                    + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        message.id,
                        thread_id,
                        message.role,
                        content,
                        message.content_type,
                        int(message.interrupted),
                        message.session_id,
                        message.turn_id,
                        now,
                    ),
                )
            return dataclasses.replace(message, created_at=now)

        return await self._write(work)

    async def list_messages(self, thread_id: str, limit: int = 500) -> list[StoredMessage]:
        check_limit(limit)
        columns = ", ".join(MESSAGE_COLUMNS)

        def work(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute(
                f"SELECT {columns} FROM (SELECT seq, {columns} FROM messages WHERE conversation_id = ?"
                " ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                (thread_id, limit),
            ).fetchall()
            return [message_from_row(row) for row in rows]

        return await self._run(work)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front: a deferred transaction that later upgrades can
    # fail with SQLITE_BUSY without waiting when another process writes at the same time.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        # SQLite rolls back by itself on some errors (disk full); ROLLBACK then would fail.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _execute_all(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _check_columns(conn: sqlite3.Connection, table: str, wanted: tuple[str, ...]) -> None:
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    missing = [c for c in wanted if c not in have]
    if missing:
        raise StoreError(
            f"table {table!r} in {conn.execute('PRAGMA database_list').fetchone()[2]!r} is not rtcvoice's "
            f"(no column {', '.join(missing)}): point db_path at a file of its own"
        )
