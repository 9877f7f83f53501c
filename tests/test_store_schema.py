"""The store in an app's own tables (db_threads_table, db_messages_table, db_columns), on SQLite
and a real PostgreSQL server: the app's schema is made with plain SQL first, as a Sequelize or
Prisma app would have made it, and what the store writes is checked with plain SQL too."""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pg import PostgresCluster

from rtcvoice.settings import Settings
from rtcvoice.store import SqliteStore, Store, StoreError, ThreadNotFound, create_store
from rtcvoice.store.schema import Column, Kind, SchemaConfig, parse_db_columns, time_from_db, time_to_db

APP_TABLES = {"db_threads_table": "chat_conversations", "db_messages_table": "chat_messages"}
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@dataclass(frozen=True)
class Types:
    """How one backend spells the column types an app would use."""

    text_id: str
    time: str
    generated_pk: tuple[str, ...]  # integer primary keys the database assigns


SQLITE_TYPES = Types("TEXT", "DATETIME", ("INTEGER PRIMARY KEY AUTOINCREMENT", "INTEGER PRIMARY KEY"))
POSTGRES_TYPES = Types(
    "varchar(36)", "timestamptz", ("serial PRIMARY KEY", "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
)


@dataclass(frozen=True)
class Db:
    """One test's empty database: ``execute`` and ``query`` are plain SQL, no rtcvoice code."""

    kind: str
    db_path: str
    database_url: str
    types: Types
    execute: Callable[[str], None]
    query: Callable[[str], Awaitable[list[tuple[Any, ...]]]]

    def store(self, **settings: Any) -> Store:
        return create_store(
            Settings.from_env({}, db_path=self.db_path, database_url=self.database_url, **settings)
        )


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    db_path = str(tmp_path / "app.db")
    if request.param == "sqlite":

        def execute_sqlite(sql: str) -> None:
            with sqlite3.connect(db_path) as conn:
                conn.executescript(sql)

        async def query_sqlite(sql: str) -> list[tuple[Any, ...]]:
            with sqlite3.connect(db_path) as conn:
                return conn.execute(sql).fetchall()

        return Db("sqlite", db_path, "", SQLITE_TYPES, execute_sqlite, query_sqlite)
    # Looked up here, not as a parameter, so SQLite-only runs never start PostgreSQL.
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    url = cluster.create_database()

    def execute_postgres(sql: str) -> None:
        cluster.psql(sql, url.rsplit("/", 1)[1])

    async def query_postgres(sql: str) -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return Db("postgres", db_path, url, POSTGRES_TYPES, execute_postgres, query_postgres)


def app_schema(db: Db, *, message_id: str = "", extra_thread_columns: str = "") -> str:
    """chat_conversations and chat_messages as a Sequelize app makes them: camelCase, quoted."""
    t = db.types
    return f"""
        CREATE TABLE chat_conversations (
            id {t.text_id} PRIMARY KEY,
            "userId" {t.text_id} NOT NULL,
            title {t.text_id},{extra_thread_columns}
            "createdAt" {t.time} NOT NULL,
            "updatedAt" {t.time} NOT NULL
        );
        CREATE TABLE chat_messages (
            id {message_id or t.text_id + " PRIMARY KEY"},
            "conversationId" {t.text_id} NOT NULL REFERENCES chat_conversations (id) ON DELETE CASCADE,
            role {t.text_id} NOT NULL,
            content TEXT,
            "contentType" {t.text_id} NOT NULL DEFAULT 'text',
            "createdAt" {t.time} NOT NULL
        );
    """


APP_ROWS = """
    INSERT INTO chat_conversations (id, "userId", title, "createdAt", "updatedAt")
        VALUES ('conv-1', 'alice', 'Trip planning', '2024-05-01 12:00:00.000 +00:00', '2024-05-01 12:00:00.000 +00:00');
    INSERT INTO chat_messages (id, "conversationId", role, content, "contentType", "createdAt")
        VALUES ('msg-1', 'conv-1', 'user', 'typed in the app', 'text', '2024-05-01 12:00:00.000 +00:00');
"""
APP_CREATED_AT = datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()


def as_epoch(db: Db, value: Any) -> float:
    """A time column's raw value as the app would read it back."""
    if db.kind == "postgres":
        assert isinstance(value, datetime) and value.tzinfo is not None
        return value.timestamp()
    assert isinstance(value, str) and ISO_MS.fullmatch(value), value
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# -- an app's chat history -------------------------------------------------------------------------


async def test_voice_turns_land_in_the_app_chat_history_that_plain_sql_reads(db: Db) -> None:
    db.execute(app_schema(db) + APP_ROWS)
    store = db.store(**APP_TABLES)
    await store.open()
    try:
        [thread] = await store.list_threads("alice")
        assert (thread.id, thread.title, thread.created_at) == ("conv-1", "Trip planning", APP_CREATED_AT)
        assert await store.list_threads("bob") == []
        [typed] = await store.list_messages("conv-1")
        assert (typed.role, typed.content, typed.content_type) == ("user", "typed in the app", "text")

        before = time.time()
        question = await store.add_message("conv-1", "user", "what about trains?", session_id="s1")
        answer = await store.add_message("conv-1", "assistant", "Trains run hourly.", session_id="s1")

        assert await store.list_messages("conv-1") == [typed, question, answer]
        bumped = await store.get_thread("conv-1")
        assert bumped is not None and bumped.updated_at == answer.created_at
    finally:
        await store.close()

    rows = await db.query(
        'SELECT id, role, content, "contentType", "createdAt" FROM chat_messages'
        ' WHERE "conversationId" = \'conv-1\' ORDER BY "createdAt"'
    )
    assert [row[1:4] for row in rows] == [
        ("user", "typed in the app", "text"),
        ("user", "what about trains?", "voice"),
        ("assistant", "Trains run hourly.", "voice"),
    ]
    assert [row[0] for row in rows] == ["msg-1", question.id, answer.id]
    stamps = [as_epoch(db, row[4]) for row in rows[1:]]
    assert stamps == [question.created_at, answer.created_at]
    assert before - 1 < stamps[0] < stamps[1] < time.time() + 1
    [(updated,)] = await db.query("SELECT \"updatedAt\" FROM chat_conversations WHERE id = 'conv-1'")
    assert as_epoch(db, updated) == answer.created_at


async def test_a_thread_created_by_the_store_is_a_row_the_app_can_read(db: Db) -> None:
    db.execute(app_schema(db))
    store = db.store(**APP_TABLES)
    await store.open()
    try:
        thread = await store.create_thread("alice", "Voice call")
        assert await store.get_thread(thread.id) == thread
        assert await store.list_threads("alice") == [thread]
    finally:
        await store.close()
    [(user, title, created, updated)] = await db.query(
        f'SELECT "userId", title, "createdAt", "updatedAt" FROM chat_conversations WHERE id = \'{thread.id}\''
    )
    assert (user, title) == ("alice", "Voice call")
    assert as_epoch(db, created) == as_epoch(db, updated) == thread.created_at


async def test_database_assigned_integer_message_ids_come_back_as_strings(db: Db) -> None:
    for i, generated_pk in enumerate(db.types.generated_pk):
        threads, messages = f"chats_{i}", f"chat_messages_{i}"
        db.execute(
            f"""
            CREATE TABLE {threads} (id {db.types.text_id} PRIMARY KEY, user_id TEXT);
            CREATE TABLE {messages} (
                id {generated_pk},
                chat_id {db.types.text_id} NOT NULL REFERENCES {threads} (id),
                role TEXT NOT NULL,
                content TEXT NOT NULL,
                created_at BIGINT NOT NULL
            );
            """
        )
        store = db.store(db_threads_table=threads, db_messages_table=messages)
        await store.open()
        try:
            thread = await store.create_thread("alice")
            first = await store.add_message(thread.id, "user", "one")
            second = await store.add_message(thread.id, "assistant", "two")
            assert first.id.isdigit() and int(second.id) > int(first.id)
            assert await store.list_messages(thread.id) == [first, second]
        finally:
            await store.close()
        rows = await db.query(f"SELECT id, content, created_at FROM {messages} ORDER BY id")
        assert [(str(row[0]), row[1]) for row in rows] == [(first.id, "one"), (second.id, "two")]
        # A BIGINT time column holds epoch milliseconds.
        assert [row[2] for row in rows] == [round(first.created_at * 1000), round(second.created_at * 1000)]


async def test_an_integer_thread_id_column_takes_numeric_ids_only(db: Db) -> None:
    generated_pk, seconds = (
        ("INTEGER PRIMARY KEY", "REAL") if db.kind == "sqlite" else ("serial PRIMARY KEY", "float8")
    )
    db.execute(f"CREATE TABLE chats (id {generated_pk}, user_id TEXT, title TEXT, created_at {seconds})")
    # The messages table is missing: the store creates it, referencing the integer ids.
    store = db.store(db_threads_table="chats", db_messages_table="chat_lines")
    await store.open()
    try:
        thread = await store.create_thread("alice", "numbered", thread_id="42")
        assert thread.id == "42"
        assert await store.get_thread("42") == thread
        assert await store.get_thread("abc") is None
        assert await store.get_thread("042") is None
        assert await store.list_messages("abc") == []
        with pytest.raises(ThreadNotFound):
            await store.add_message("abc", "user", "hello")
        with pytest.raises(StoreError, match="integer") as refused:
            await store.create_thread("alice", thread_id="abc")
        assert type(refused.value) is StoreError
        assigned = await store.create_thread("alice")
        assert assigned.id.isdigit() and assigned.id != "42"
        message = await store.add_message("42", "user", "hello")
        assert message.thread_id == "42"
        assert await store.list_messages("42") == [message]
    finally:
        await store.close()
    [(thread_id,)] = await db.query("SELECT conversation_id FROM chat_lines")
    assert thread_id == 42


async def test_a_missing_required_column_is_refused_at_open_with_the_db_columns_fix(db: Db) -> None:
    db.execute(
        f"""
        CREATE TABLE chat_conversations (id {db.types.text_id} PRIMARY KEY, "userId" TEXT);
        CREATE TABLE chat_messages (
            id {db.types.text_id} PRIMARY KEY,
            "conversationId" {db.types.text_id} REFERENCES chat_conversations (id),
            author TEXT NOT NULL,
            content TEXT NOT NULL
        );
        """
    )
    refused = db.store(**APP_TABLES)
    with pytest.raises(StoreError) as error:
        await refused.open()
    message = str(error.value)
    assert "chat_messages" in message and "message.role" in message
    assert "db_columns=message.role=COLUMN" in message and "author" in message
    with pytest.raises(StoreError):
        await refused.create_thread("alice")

    store = db.store(**APP_TABLES, db_columns="message.role=author")
    await store.open()
    try:
        thread = await store.create_thread("alice")
        await store.add_message(thread.id, "assistant", "mapped")
    finally:
        await store.close()
    assert await db.query("SELECT author, content FROM chat_messages") == [("assistant", "mapped")]


async def test_an_app_not_null_column_without_default_makes_create_thread_fail_naming_it(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    db.execute(app_schema(db, extra_thread_columns='\n"tenantId" TEXT NOT NULL,'))
    store = db.store(**APP_TABLES)
    with caplog.at_level(logging.WARNING, logger="rtcvoice.store"):
        await store.open()
    assert "tenantId" in caplog.text  # said at open already
    try:
        with pytest.raises(StoreError, match="tenantId"):
            await store.create_thread("alice", thread_id="conv-9")
        assert await store.get_thread("conv-9") is None
    finally:
        await store.close()


async def test_fields_the_app_table_lacks_are_not_stored_and_read_back_as_defaults(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    db.execute(app_schema(db) + APP_ROWS)
    store = db.store(**APP_TABLES)
    with caplog.at_level(logging.INFO, logger="rtcvoice.store"):
        await store.open()
    gaps = [r.getMessage() for r in caplog.records if "message.interrupted" in r.getMessage()]
    assert len(gaps) == 1 and "message.session_id" in gaps[0] and "message.turn_id" in gaps[0]
    try:
        cut = await store.add_message(
            "conv-1", "assistant", "cut", interrupted=True, session_id="s", turn_id="t"
        )
        assert (cut.interrupted, cut.session_id, cut.turn_id) == (False, None, None)
        assert (await store.list_messages("conv-1"))[-1] == cut
    finally:
        await store.close()


async def test_rows_the_app_wrote_are_read_tolerantly(db: Db) -> None:
    db.execute(
        app_schema(db)
        + APP_ROWS
        + """
        INSERT INTO chat_messages (id, "conversationId", role, content, "contentType", "createdAt") VALUES
            ('msg-2', 'conv-1', 'AI', 'from the model', 'text', '2024-05-01 12:00:01.500 +00:00'),
            ('msg-3', 'conv-1', 'tool', '{"result": 1}', 'text', '2024-05-01 12:00:02 +00:00'),
            ('msg-4', 'conv-1', 'human', NULL, 'image', '2024-05-01 12:00:03 +00:00');
        """
    )
    store = db.store(**APP_TABLES)
    await store.open()
    try:
        read = await store.list_messages("conv-1")
    finally:
        await store.close()
    assert [(m.id, m.role, m.content, m.content_type) for m in read] == [
        ("msg-1", "user", "typed in the app", "text"),
        ("msg-2", "assistant", "from the model", "text"),
        ("msg-4", "user", "", "image"),
    ]
    assert [m.created_at - APP_CREATED_AT for m in read] == [0.0, 1.5, 3.0]


async def test_rapid_messages_keep_insertion_order_in_an_app_table_without_seq(db: Db) -> None:
    # PostgreSQL orders them by a millisecond timestamp(3) (Prisma's DateTime), then id: the
    # store's clock must step in whole milliseconds. SQLite orders them by rowid.
    time_type = "DATETIME" if db.kind == "sqlite" else "timestamp(3)"
    db.execute(
        f"""
        CREATE TABLE threads (id {db.types.text_id} PRIMARY KEY, "userId" TEXT);
        CREATE TABLE lines ("threadId" TEXT NOT NULL, id {db.types.text_id} PRIMARY KEY,
                            role TEXT NOT NULL, content TEXT NOT NULL, "createdAt" {time_type} NOT NULL);
        """
    )
    store = db.store(db_threads_table="threads", db_messages_table="lines")
    await store.open()
    try:
        thread = await store.create_thread(None)
        added = [await store.add_message(thread.id, "user", f"m{i}") for i in range(50)]
        assert await store.list_messages(thread.id) == added
        assert [m.content for m in await store.list_messages(thread.id, limit=3)] == ["m47", "m48", "m49"]
    finally:
        await store.close()


async def test_sqlite_without_rowid_app_table_is_ordered_by_created_at_then_id(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            CREATE TABLE threads (id TEXT PRIMARY KEY, user_id TEXT);
            CREATE TABLE lines (id TEXT PRIMARY KEY, thread_id TEXT, role TEXT, content TEXT,
                                created_at DATETIME) WITHOUT ROWID;
            INSERT INTO threads VALUES ('t', NULL);
            INSERT INTO lines VALUES ('z-late', 't', 'user', 'second', '2024-05-01 12:00:01');
            INSERT INTO lines VALUES ('a-early', 't', 'user', 'first', '2024-05-01T12:00:00.000Z');
            """
        )
    store = SqliteStore(str(path), SchemaConfig("threads", "lines"))
    await store.open()
    try:
        added = [await store.add_message("t", "assistant", f"m{i}") for i in range(20)]
        read = await store.list_messages("t")
        assert [m.content for m in read] == ["first", "second", *[m.content for m in added]]
    finally:
        await store.close()


async def test_postgres_app_tables_in_another_schema_are_named_with_its_prefix(
    pg_cluster: PostgresCluster,
) -> None:
    url = pg_cluster.create_database()
    pg_cluster.psql(
        'CREATE SCHEMA app; CREATE TABLE app."Chats" (id uuid PRIMARY KEY, "ownerId" integer);'
        ' CREATE TABLE app."ChatLines" (id uuid PRIMARY KEY, "chatId" uuid REFERENCES app."Chats" (id),'
        ' role text, body text, "isInterrupted" boolean NOT NULL DEFAULT false, "createdAt" timestamp)',
        url.rsplit("/", 1)[1],
    )
    settings = Settings.from_env(
        {}, database_url=url, db_threads_table="app.Chats", db_messages_table="app.ChatLines"
    )
    store = create_store(settings)
    await store.open()
    try:
        thread = await store.create_thread("7")
        assert await store.list_threads("7") == [thread] and await store.list_threads("alice") == []
        with pytest.raises(StoreError):
            await store.create_thread("alice")  # ownerId is an integer column
        assert await store.get_thread("not-a-uuid") is None
        message = await store.add_message(thread.id, "assistant", "hi", interrupted=True)
        assert await store.list_messages(thread.id) == [message] and message.interrupted
    finally:
        await store.close()
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow('SELECT "chatId", body, "isInterrupted", "createdAt" FROM app."ChatLines"')
    finally:
        await conn.close()
    assert row is not None and str(row[0]) == thread.id and row[1:3] == ("hi", True)
    # timestamp without time zone: naive UTC.
    assert row[3].tzinfo is None and row[3].replace(tzinfo=UTC).timestamp() == message.created_at


def test_times_take_the_form_of_their_column_type_and_read_back_from_any_common_form() -> None:
    ts = datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC).timestamp()
    written = {
        Kind.REAL: ts,
        Kind.INTEGER: 1714564800123,
        Kind.TEXT: "2024-05-01T12:00:00.123Z",
        Kind.TIMESTAMPTZ: datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC),
        Kind.TIMESTAMP: datetime(2024, 5, 1, 12, 0, 0, 123000),
    }
    for kind, expected in written.items():
        assert time_to_db(Column("t", kind), ts) == expected
        assert time_from_db(expected) == ts
    # A 32-bit integer (PostgreSQL integer) cannot hold epoch milliseconds: seconds there.
    assert time_to_db(Column("t", Kind.INTEGER, fraction_digits=0), ts) == 1714564800
    # timestamp(3), Prisma's DateTime, keeps milliseconds.
    assert time_to_db(Column("t", Kind.TIMESTAMP, fraction_digits=3), ts + 0.0004) == written[Kind.TIMESTAMP]
    for sequelize_or_sqlalchemy in (
        "2024-05-01 12:00:00.123 +00:00",
        "2024-05-01 12:00:00.123",
        "2024-05-01 14:00:00.123+02:00",
        "2024-05-01T12:00:00.123000",
    ):
        assert time_from_db(sequelize_or_sqlalchemy) == ts, sequelize_or_sqlalchemy
    assert time_from_db(None) == time_from_db("not a time") == 0.0


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("db_columns", "expected"),
    [
        ("thread.colour=hue", "'thread.colour=hue' is not FIELD=column with FIELD one of: "),
        ("message.role", "'message.role' is not FIELD=column with FIELD one of: "),
        ("role=author", "'role=author' is not FIELD=column with FIELD one of: "),
        ("message.role=", "'message.role=' is not FIELD=column with FIELD one of: "),
        ("message.role=the author", "'message.role=the author': column 'the author' is not a plain name"),
        ("message.role=a, message.role=b", "db_columns sets message.role twice ('a' and 'b')"),
    ],
)
def test_bad_db_columns_entries_are_explained(db_columns: str, expected: str) -> None:
    with pytest.raises(StoreError) as error:
        create_store(Settings.from_env({}, db_columns=db_columns))
    assert expected in str(error.value)
    if expected.endswith("one of: "):
        # Every valid field is listed, so the fix can be read off the message.
        assert "thread.id, thread.user_id, thread.title" in str(error.value)
        assert "message.created_at, message.seq" in str(error.value)


def test_db_columns_parse_into_fields_and_table_names_are_checked() -> None:
    assert parse_db_columns(" thread.user_id=ownerId, message.thread_id=chatId ,") == {
        ("thread", "user_id"): "ownerId",
        ("message", "thread_id"): "chatId",
    }
    for bad in ('chat"; DROP TABLE users; --', "a.b.c", "", "1chats"):
        with pytest.raises(StoreError, match="db_threads_table"):
            create_store(Settings.from_env({}, db_threads_table=bad))
    with pytest.raises(StoreError, match="both"):
        create_store(Settings.from_env({}, db_threads_table="chats", db_messages_table="chats"))
    with pytest.raises(StoreError, match="PostgreSQL"):
        create_store(Settings.from_env({}, db_messages_table="app.chat_messages"))


# -- rtcvoice's own layout -----------------------------------------------------------------------

# The DDL of rtcvoice's own tables before the schema mapping existed, verbatim.
TODAYS_SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    user_id TEXT,
    title TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
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
CREATE INDEX IF NOT EXISTS conversations_user_updated ON conversations (user_id, updated_at);
CREATE INDEX IF NOT EXISTS messages_conversation_seq ON messages (conversation_id, seq);
"""
TODAYS_POSTGRES_DDL = """
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
CREATE INDEX IF NOT EXISTS conversations_user_updated ON conversations (user_id, updated_at);
CREATE INDEX IF NOT EXISTS messages_conversation_seq ON messages (conversation_id, seq);
CREATE TABLE IF NOT EXISTS rtcvoice_tool_calls (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    thread_id TEXT NOT NULL,
    after_message_id TEXT NOT NULL,
    turn_id TEXT,
    messages TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS rtcvoice_tool_calls_thread ON rtcvoice_tool_calls (thread_id, seq);
"""


def sqlite_layout(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as conn:
        layout: dict[str, list[tuple[Any, ...]]] = {}
        for table in ("conversations", "messages"):
            layout[f"{table} columns"] = conn.execute(f"PRAGMA table_info({table})").fetchall()
            layout[f"{table} foreign keys"] = conn.execute(f"PRAGMA foreign_key_list({table})").fetchall()
            indexes = conn.execute(f"PRAGMA index_list({table})").fetchall()
            layout[f"{table} indexes"] = [
                (*index, conn.execute(f"PRAGMA index_info({index[1]})").fetchall()) for index in indexes
            ]
        checks = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
        layout["checks"] = sorted(re.findall(r"CHECK \((.*?)\)\)?,?\n", checks.replace('"', "")))
        return layout


async def test_the_default_sqlite_layout_is_todays(tmp_path: Path) -> None:
    store = create_store(Settings.from_env({}, db_path=str(tmp_path / "new.db")))
    await store.open()
    await store.close()
    with sqlite3.connect(tmp_path / "today.db") as conn:
        conn.executescript(TODAYS_SQLITE_DDL)

    assert sqlite_layout(tmp_path / "new.db") == sqlite_layout(tmp_path / "today.db")
    assert len(sqlite_layout(tmp_path / "new.db")["checks"]) == 3


POSTGRES_LAYOUT = """
SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity, identity_generation
FROM information_schema.columns WHERE table_schema = 'public' ORDER BY table_name, ordinal_position
"""
POSTGRES_INDEXES = "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname"
POSTGRES_CONSTRAINTS = """
SELECT conrelid::regclass::text, contype, pg_get_constraintdef(oid) FROM pg_constraint
WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2, 3
"""


async def test_the_default_postgres_layout_is_todays(pg_cluster: PostgresCluster) -> None:
    new_url, today_url = pg_cluster.create_database(), pg_cluster.create_database()
    store = create_store(Settings.from_env({}, database_url=new_url))
    await store.open()
    await store.close()
    pg_cluster.psql(TODAYS_POSTGRES_DDL, today_url.rsplit("/", 1)[1])

    layouts = []
    for url in (new_url, today_url):
        conn = await asyncpg.connect(url)
        try:
            layouts.append(
                [
                    [tuple(r) for r in await conn.fetch(q)]
                    for q in (POSTGRES_LAYOUT, POSTGRES_INDEXES, POSTGRES_CONSTRAINTS)
                ]
            )
        finally:
            await conn.close()
    assert layouts[0] == layouts[1]
    assert len(layouts[0][0]) == 15 + 6  # threads and messages, and the tool calls (Store.add_tool_calls)
