"""PostgreSQL store (``database_url``): the same tables and behaviour as the SQLite store.

Needs the ``postgres`` extra (asyncpg). Tables rtcvoice creates go to the first schema of the
connection's search_path; to keep them apart from an application's own tables in a shared
database, add ``?search_path=rtcvoice`` to the URL (asyncpg passes unknown URL parameters on as
settings). To share the application's own tables instead, name them in db_threads_table and
db_messages_table (``app.chat_messages`` for another schema): see schema.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

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

T = TypeVar("T")

# Text times compare as text: a cast would fail the whole query on one odd row.
DIALECT = Dialect(placeholder=lambda n: f"${n}", text_time=lambda expr: expr, returning=True)
LAYOUT = LayoutTypes(
    time="DOUBLE PRECISION",
    seq="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    flag="BOOLEAN NOT NULL DEFAULT FALSE",
)

# Servers starting together would race on CREATE TABLE IF NOT EXISTS (it is not atomic in
# PostgreSQL: the loser gets a unique violation on pg_type), so schema creation holds this lock.
_SCHEMA_LOCK_KEY = 0x72746376  # "rtcv"

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

# to_regclass: the table the queries' unqualified name will reach, through the search_path.
_FIND_TABLE = (
    "SELECT c.oid, n.nspname, c.relname FROM pg_class AS c"
    " JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)"
)
_COLUMNS = (
    "SELECT c.column_name, c.data_type, c.column_default, c.is_identity, c.is_nullable,"
    " c.datetime_precision, c.is_generated, format_type(a.atttypid, a.atttypmod)"
    " FROM information_schema.columns AS c"
    " JOIN pg_attribute AS a ON a.attrelid = $1 AND a.attname = c.column_name"
    " WHERE c.table_schema = $2 AND c.table_name = $3 ORDER BY c.ordinal_position"
)
_KINDS = {
    "smallint": Kind.INTEGER,
    "integer": Kind.INTEGER,
    "bigint": Kind.INTEGER,
    "real": Kind.REAL,
    "double precision": Kind.REAL,
    "numeric": Kind.NUMERIC,
    "boolean": Kind.BOOLEAN,
    "timestamp with time zone": Kind.TIMESTAMPTZ,
    "timestamp without time zone": Kind.TIMESTAMP,
    "date": Kind.DATE,
    "uuid": Kind.UUID,
}


class PostgresStore:
    """Threads and messages in PostgreSQL, through a small asyncpg pool.

    A write runs in a task of its own that the caller's cancellation does not reach (a turn
    cancelled by barge-in may be storing its reply): it commits whole or not at all, and
    ``close`` waits for it.

    ``schema`` names the tables (an app's own, possibly; see schema.py); None is rtcvoice's own.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: SchemaConfig | None = None,
        min_connections: int = 1,
        max_connections: int = 4,
    ) -> None:
        self.url = url
        self.schema = schema or SchemaConfig()
        self._min = min_connections
        self._max = max_connections
        self._pool: asyncpg.Pool | None = None
        self._sql: Statements | None = None  # set by open, from the tables it found
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
                    resolved = await _set_up_tables(conn, self.schema)
            except BaseException as exc:
                await pool.close()
                if isinstance(exc, (*_DB_ERRORS, StoreError)):
                    raise StoreError(f"cannot set up the tables in {redact_url(self.url)}: {exc}") from exc
                raise
            self._sql = Statements(resolved, DIALECT)
            self._clock = clock_for(self._clock, resolved)
            self._pool = pool

    async def close(self) -> None:
        async with self._lifecycle:
            if self._writes:
                # Their outcome reaches their callers (or the log); here they only must finish.
                await asyncio.wait(set(self._writes))
            pool, self._pool = self._pool, None
            if pool is not None:
                await pool.close()

    def _require_open(self) -> tuple[asyncpg.Pool, Statements]:
        if self._pool is None or self._sql is None:
            raise StoreError(f"{self!r} is not open")
        return self._pool, self._sql

    async def _read(self, work: Callable[[asyncpg.Connection, Statements], Awaitable[T]]) -> T:
        pool, sql = self._require_open()
        try:
            async with pool.acquire() as conn:
                return await work(conn, sql)
        except _DB_ERRORS as exc:
            raise StoreError(f"{redact_url(self.url)}: {exc}") from exc

    async def _write(self, work: Callable[[asyncpg.Connection, Statements], Awaitable[T]]) -> T:
        pool, sql = self._require_open()

        async def run() -> T:
            try:
                async with pool.acquire() as conn, conn.transaction():
                    return await work(conn, sql)
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
        tid = None if thread_id is None else check_id(thread_id, "thread_id")

        async def work(conn: asyncpg.Connection, sql: Statements) -> Thread:
            insert, thread = sql.new_thread(user, title, tid, self._clock.now())
            try:
                row_id = await _insert(conn, insert, sql.threads, "create a thread")
            except asyncpg.UniqueViolationError as exc:
                raise ThreadExists(f"thread {thread.id or tid!r} already exists") from exc
            return with_id(thread, row_id) if insert.returns_id else thread

        return await self._write(work)

    async def get_thread(self, thread_id: str) -> Thread | None:
        async def work(conn: asyncpg.Connection, sql: Statements) -> Thread | None:
            key = sql.thread_key(thread_id)
            if key is None:
                return None
            query = sql.select_thread(key)
            row = await conn.fetchrow(query.sql, *query.args)
            return None if row is None else sql.thread_from_row(row)

        return await self._read(work)

    async def list_threads(self, user_id: str | None, limit: int = 50) -> list[Thread]:
        check_limit(limit)

        async def work(conn: asyncpg.Connection, sql: Statements) -> list[Thread]:
            query = sql.list_threads(user_id, limit)
            if query is None:
                return []
            return [sql.thread_from_row(row) for row in await conn.fetch(query.sql, *query.args)]

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
        draft = draft_message(thread_id, role, content, content_type, interrupted, session_id, turn_id)

        async def work(conn: asyncpg.Connection, sql: Statements) -> StoredMessage:
            new = sql.new_message(draft, self._clock.now())
            # The UPDATE (GREATEST: a concurrent write that stamped a later time may have
            # committed first) locks the thread's row until the message is in.
            if new is None or await conn.fetchval(new.touch.sql, *new.touch.args) is None:
                raise ThreadNotFound(f"no thread {thread_id!r}")
            row_id = await _insert(conn, new.insert, sql.messages, "add a message")
            return with_id(new.message, row_id) if new.insert.returns_id else new.message

        # The transaction commits before _write returns. With the server's default
        # synchronous_commit=on, that is after the commit record is flushed to its WAL.
        return await self._write(work)

    async def list_messages(self, thread_id: str, limit: int = 500) -> list[StoredMessage]:
        check_limit(limit)

        async def work(conn: asyncpg.Connection, sql: Statements) -> list[StoredMessage]:
            query = sql.list_messages(thread_id, limit)
            if query is None:
                return []
            return sql.messages_from_rows(await conn.fetch(query.sql, *query.args))

        return await self._read(work)

    # -- tool calls --------------------------------------------------------------------------------

    async def add_tool_calls(
        self, thread_id: str, after_message_id: str, turn_id: str | None, messages: list[dict[str, Any]]
    ) -> None:
        payload = json.dumps(messages)

        async def work(conn: asyncpg.Connection, sql: Statements) -> None:
            await conn.execute(
                f"INSERT INTO {TOOL_CALLS_TABLE} (thread_id, after_message_id, turn_id, messages, created_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                thread_id,
                after_message_id,
                turn_id,
                payload,
                time.time(),
            )

        await self._write(work)

    async def list_tool_calls(self, thread_id: str) -> dict[str, list[dict[str, Any]]]:
        async def work(conn: asyncpg.Connection, sql: Statements) -> dict[str, list[dict[str, Any]]]:
            rows = await conn.fetch(
                f"SELECT after_message_id, messages FROM {TOOL_CALLS_TABLE} WHERE thread_id = $1 ORDER BY seq",
                thread_id,
            )
            return tool_calls_by_message((r[0], r[1]) for r in rows)

        return await self._read(work)


async def _insert(conn: asyncpg.Connection, insert: Insert, table: ResolvedTable, what: str) -> object:
    """Run ``insert``; the id the database assigned, if it assigns it."""
    try:
        if insert.returns_id:
            return await conn.fetchval(insert.sql, *insert.args)
        await conn.execute(insert.sql, *insert.args)
        return None
    except asyncpg.NotNullViolationError as exc:
        raise not_null_error(table.name, str(exc.column_name), what) from exc


def redact_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


# -- introspection -------------------------------------------------------------------------------


async def _set_up_tables(conn: asyncpg.Connection, config: SchemaConfig) -> ResolvedSchema:
    """Create the tables that are missing, then find the fields' columns in all of them."""
    threads_info, new_threads = await _ensure_table(
        conn, config.threads_table, lambda: threads_ddl(config, LAYOUT)
    )
    threads = resolve_table(THREAD, threads_info, config)
    messages_info, new_messages = await _ensure_table(
        conn, config.messages_table, lambda: messages_ddl(config, LAYOUT, threads)
    )
    messages = resolve_table(MESSAGE, messages_info, config)
    # After the resolution, whose errors say that a table is someone else's; never on an app's table.
    for ddl in (
        *index_ddl(config, THREAD, threads_info, threads, new_threads),
        *index_ddl(config, MESSAGE, messages_info, messages, new_messages),
        *TOOL_CALLS_DDL,
    ):
        await conn.execute(ddl)
    return ResolvedSchema(threads, messages)


# The tool calls of replies (Store.add_tool_calls): rtcvoice's own table, whatever the layout of
# the threads and messages tables (no foreign key: an app's thread ids may be of any type).
TOOL_CALLS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {TOOL_CALLS_TABLE} (\n"
    "    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
    "    thread_id TEXT NOT NULL,\n"
    "    after_message_id TEXT NOT NULL,\n"
    "    turn_id TEXT,\n"
    "    messages TEXT NOT NULL,\n"
    "    created_at DOUBLE PRECISION NOT NULL\n"
    ")",
    f"CREATE INDEX IF NOT EXISTS {TOOL_CALLS_TABLE}_thread ON {TOOL_CALLS_TABLE} (thread_id, seq)",
)


async def _ensure_table(
    conn: asyncpg.Connection, name: str, ddl: Callable[[], str]
) -> tuple[TableInfo, bool]:
    """The table's columns, creating it first if it is missing; and whether it was created."""
    info = await _table_info(conn, name)
    if info is not None:
        return info, False
    await conn.execute(ddl())
    created = await _table_info(conn, name)
    assert created is not None
    return created, True


async def _table_info(conn: asyncpg.Connection, name: str) -> TableInfo | None:
    # Then in lower case: a table the app created with an unquoted CamelCase name is stored so.
    for candidate in dict.fromkeys((name, name.lower())):
        found = await conn.fetchrow(_FIND_TABLE, quote_table(candidate))
        if found is not None:
            rows = await conn.fetch(_COLUMNS, found[0], found[1], found[2])
            return TableInfo(candidate, tuple(_column(row) for row in rows))
    return None


def _column(row: asyncpg.Record) -> Column:
    name, data_type, default, is_identity, is_nullable, precision, is_generated, declared = row
    kind = _KINDS.get(str(data_type), Kind.TEXT)
    identity = is_identity == "YES"
    serial = isinstance(default, str) and default.startswith("nextval(")
    return Column(
        name=str(name),
        kind=kind,
        declared=str(declared),
        generated=kind is Kind.INTEGER and (identity or serial),
        needs_value=is_nullable == "NO" and default is None and not identity and is_generated != "ALWAYS",
        fraction_digits=_fraction_digits(str(data_type), precision),
    )


def _fraction_digits(data_type: str, precision: int | None) -> int:
    if data_type in ("smallint", "integer"):
        return 0  # too small for epoch milliseconds: a time there is in seconds
    return 6 if precision is None else int(precision)
