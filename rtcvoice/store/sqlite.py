"""The default store: one SQLite file in WAL mode, driven from one thread the store owns."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from .base import (
    TOOL_CALLS_TABLE,
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
    tool_calls_by_message,
)
from .schema import (
    MESSAGE,
    THREAD,
    Column,
    Dialect,
    Insert,
    Kind,
    LayoutTypes,
    ResolvedSchema,
    ResolvedTable,
    SchemaConfig,
    Statements,
    TableInfo,
    clock_for,
    index_ddl,
    messages_ddl,
    not_null_error,
    quote_table,
    resolve_table,
    threads_ddl,
    with_id,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# julianday() reads every ISO 8601 variant, with or without "T", offset or "Z".
DIALECT = Dialect(placeholder=lambda _: "?", text_time=lambda expr: f"julianday({expr})", returning=False)
LAYOUT = LayoutTypes(
    time="REAL",
    seq="INTEGER PRIMARY KEY AUTOINCREMENT",
    flag="INTEGER NOT NULL DEFAULT 0 CHECK ({column} IN (0, 1))",
)
_WITHOUT_ROWID = re.compile(r"\bWITHOUT\s+ROWID\b", re.IGNORECASE)


class SqliteStore:
    """Threads and messages in a SQLite file (``":memory:"`` for a throwaway store).

    sqlite3 calls block, so none runs on the event loop: every call goes to a single-thread
    executor that owns the one connection. One thread also serialises the writes of all
    sessions, which is what SQLite allows anyway, without lock contention inside the process.
    A write whose caller is cancelled still runs to its end on that thread (a turn cancelled
    by barge-in may be storing its reply), and ``close`` runs after it.

    ``schema`` names the tables (an app's own, possibly; see schema.py); None is rtcvoice's own.
    """

    def __init__(self, path: str, schema: SchemaConfig | None = None) -> None:
        self.path = path
        self.schema = schema or SchemaConfig()
        for setting, table in (
            ("db_threads_table", self.schema.threads_table),
            ("db_messages_table", self.schema.messages_table),
        ):
            if "." in table:
                raise StoreError(f"{setting} {table!r}: a schema. prefix is for PostgreSQL, not SQLite")
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # only ever touched on the executor's thread
        self._sql: Statements | None = None  # set by open, from the tables it found
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
                resolved = self._set_up_tables(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error | StoreError):
                raise StoreError(f"cannot set up SQLite database {self.path!r}: {exc}") from exc
            raise
        self._sql = Statements(resolved, DIALECT)
        self._clock = clock_for(self._clock, resolved)
        self._conn = conn

    def _set_up_tables(self, conn: sqlite3.Connection) -> ResolvedSchema:
        """Create the tables that are missing, then find the fields' columns in all of them."""
        config = self.schema
        threads_info, new_threads = _ensure_table(
            conn, config.threads_table, lambda: threads_ddl(config, LAYOUT)
        )
        threads = resolve_table(THREAD, threads_info, config)
        messages_info, new_messages = _ensure_table(
            conn, config.messages_table, lambda: messages_ddl(config, LAYOUT, threads)
        )
        messages = resolve_table(MESSAGE, messages_info, config)
        # After the resolution, whose errors say that a table is someone else's; never on an app's table.
        for ddl in (
            *index_ddl(config, THREAD, threads_info, threads, new_threads),
            *index_ddl(config, MESSAGE, messages_info, messages, new_messages),
            *TOOL_CALLS_DDL,
        ):
            conn.execute(ddl)
        return ResolvedSchema(threads, messages)

    def _close_in_thread(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _require_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            raise StoreError(f"{self!r} is not open")
        return self._executor

    async def _run(self, work: Callable[[sqlite3.Connection, Statements], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._require_executor(), self._call, work)

    async def _write(self, work: Callable[[sqlite3.Connection, Statements], T]) -> T:
        # Not run_in_executor: cancelling its future un-queues a job that has not started yet,
        # and a turn cancelled by barge-in would then lose the reply it was storing.
        done = asyncio.wrap_future(self._require_executor().submit(self._call, work))
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            done.add_done_callback(log_orphaned_failure)
            raise

    def _call(self, work: Callable[[sqlite3.Connection, Statements], T]) -> T:
        conn, sql = self._conn, self._sql
        if conn is None or sql is None:
            raise StoreError(f"{self!r} is closed")
        try:
            return work(conn, sql)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite {self.path!r}: {exc}") from exc

    # -- threads -----------------------------------------------------------------------------------

    async def create_thread(
        self, user_id: str | None, title: str = "", thread_id: str | None = None
    ) -> Thread:
        user = check_optional_id(user_id, "user_id")
        tid = None if thread_id is None else check_id(thread_id, "thread_id")

        def work(conn: sqlite3.Connection, sql: Statements) -> Thread:
            insert, thread = sql.new_thread(user, title, tid, self._clock.now())
            try:
                cursor = conn.execute(insert.sql, insert.args)
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                    raise ThreadExists(f"thread {thread.id or tid!r} already exists") from exc
                raise _integrity_error(exc, sql.threads, "create a thread") from exc
            return with_id(thread, cursor.lastrowid) if insert.returns_id else thread

        return await self._write(work)

    async def get_thread(self, thread_id: str) -> Thread | None:
        def work(conn: sqlite3.Connection, sql: Statements) -> Thread | None:
            key = sql.thread_key(thread_id)
            if key is None:
                return None
            query = sql.select_thread(key)
            row = conn.execute(query.sql, query.args).fetchone()
            return None if row is None else sql.thread_from_row(row)

        return await self._run(work)

    async def list_threads(self, user_id: str | None, limit: int = 50) -> list[Thread]:
        check_limit(limit)

        def work(conn: sqlite3.Connection, sql: Statements) -> list[Thread]:
            query = sql.list_threads(user_id, limit)
            if query is None:
                return []
            return [sql.thread_from_row(row) for row in conn.execute(query.sql, query.args)]

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
        draft = draft_message(thread_id, role, content, content_type, interrupted, session_id, turn_id)

        def work(conn: sqlite3.Connection, sql: Statements) -> StoredMessage:
            new = sql.new_message(draft, self._clock.now())
            if new is None:
                raise ThreadNotFound(f"no thread {thread_id!r}")
            with _transaction(conn):
                touched = conn.execute(new.touch.sql, new.touch.args)
                found = touched.rowcount > 0 if new.touch.is_update else touched.fetchone() is not None
                if not found:
                    raise ThreadNotFound(f"no thread {thread_id!r}")
                row_id = _insert(conn, new.insert, sql.messages, "add a message")
            return with_id(new.message, row_id) if new.insert.returns_id else new.message

        return await self._write(work)

    async def list_messages(self, thread_id: str, limit: int = 500) -> list[StoredMessage]:
        check_limit(limit)

        def work(conn: sqlite3.Connection, sql: Statements) -> list[StoredMessage]:
            query = sql.list_messages(thread_id, limit)
            if query is None:
                return []
            return sql.messages_from_rows(conn.execute(query.sql, query.args))

        return await self._run(work)

    # -- tool calls --------------------------------------------------------------------------------

    async def add_tool_calls(
        self, thread_id: str, after_message_id: str, turn_id: str | None, messages: list[dict[str, Any]]
    ) -> None:
        payload = json.dumps(messages)

        def work(conn: sqlite3.Connection, sql: Statements) -> None:
            with _transaction(conn):
                conn.execute(
                    f"INSERT INTO {TOOL_CALLS_TABLE} (thread_id, after_message_id, turn_id, messages, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (thread_id, after_message_id, turn_id, payload, time.time()),
                )

        await self._write(work)

    async def list_tool_calls(self, thread_id: str) -> dict[str, list[dict[str, Any]]]:
        def work(conn: sqlite3.Connection, sql: Statements) -> dict[str, list[dict[str, Any]]]:
            rows = conn.execute(
                f"SELECT after_message_id, messages FROM {TOOL_CALLS_TABLE} WHERE thread_id = ? ORDER BY seq",
                (thread_id,),
            )
            return tool_calls_by_message(rows)

        return await self._run(work)


# The tool calls of replies (Store.add_tool_calls): rtcvoice's own table, whatever the layout of
# the threads and messages tables (no foreign key: an app's thread ids may be of any type).
TOOL_CALLS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {TOOL_CALLS_TABLE} (\n"
    "    seq INTEGER PRIMARY KEY AUTOINCREMENT,\n"
    "    thread_id TEXT NOT NULL,\n"
    "    after_message_id TEXT NOT NULL,\n"
    "    turn_id TEXT,\n"
    "    messages TEXT NOT NULL,\n"
    "    created_at REAL NOT NULL\n"
    ")",
    f"CREATE INDEX IF NOT EXISTS {TOOL_CALLS_TABLE}_thread ON {TOOL_CALLS_TABLE} (thread_id, seq)",
)


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


def _insert(conn: sqlite3.Connection, insert: Insert, table: ResolvedTable, what: str) -> int | None:
    try:
        return conn.execute(insert.sql, insert.args).lastrowid
    except sqlite3.IntegrityError as exc:
        raise _integrity_error(exc, table, what) from exc


def _integrity_error(exc: sqlite3.IntegrityError, table: ResolvedTable, what: str) -> StoreError:
    message = str(exc)
    prefix = "NOT NULL constraint failed: "
    if message.startswith(prefix):
        return not_null_error(table.name, message.removeprefix(prefix).rsplit(".", 1)[-1], what)
    return StoreError(f"cannot {what} in table {table.name!r}: {message}")


# -- introspection -------------------------------------------------------------------------------


def _ensure_table(conn: sqlite3.Connection, name: str, ddl: Callable[[], str]) -> tuple[TableInfo, bool]:
    """The table's columns, creating it first if it is missing; and whether it was created."""
    info = _table_info(conn, name)
    if info is not None:
        return info, False
    conn.execute(ddl())
    created = _table_info(conn, name)
    assert created is not None
    return created, True


def _table_info(conn: sqlite3.Connection, name: str) -> TableInfo | None:
    rows = conn.execute(f"PRAGMA table_info({quote_table(name)})").fetchall()
    if not rows:
        return None
    found = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ? COLLATE NOCASE", (name,)
    ).fetchone()
    # A view, or a WITHOUT ROWID table, has no rowid to give insertion order.
    has_rowid = found is not None and not _WITHOUT_ROWID.search(found[0] or "")
    # Only a lone INTEGER PRIMARY KEY is the rowid, which the database assigns.
    single_pk = sum(1 for row in rows if row[5] > 0) == 1
    return TableInfo(
        name, tuple(_column(row, rowid_alias=has_rowid and single_pk) for row in rows), has_rowid=has_rowid
    )


def _column(row: tuple[int, str, str, int, str | None, int], *, rowid_alias: bool) -> Column:
    _, name, declared, notnull, default, pk = row
    generated = rowid_alias and pk > 0 and declared.strip().upper() == "INTEGER"
    return Column(
        name=name,
        kind=_kind(declared),
        declared=declared,
        generated=generated,
        needs_value=bool(notnull) and default is None and not generated,
    )


def _kind(declared: str) -> Kind:
    # SQLite's own affinity rules (https://sqlite.org/datatype3.html), INT first as there, but
    # DATE/TIME types as text: the ISO form Sequelize and SQLAlchemy write into DATETIME columns.
    upper = declared.upper()
    if "INT" in upper:
        return Kind.INTEGER
    if "BOOL" in upper:
        return Kind.BOOLEAN
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT", "DATE", "TIME")):
        return Kind.TEXT
    # REAL, FLOAT, DOUBLE, NUMERIC, DECIMAL and untyped columns keep numbers as they are given.
    return Kind.REAL
