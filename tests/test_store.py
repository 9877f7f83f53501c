"""The thread and message store: the same tests against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from pg import PostgresCluster

from rtcvoice.settings import Settings
from rtcvoice.store import (
    SqliteStore,
    Store,
    StoredMessage,
    StoreError,
    ThreadExists,
    ThreadNotFound,
    create_store,
)
from rtcvoice.store.postgres import PostgresStore


@dataclass(frozen=True)
class Backend:
    """Where one test's database lives; ``make`` gives a fresh, unopened store on it."""

    kind: str
    db_path: str
    database_url: str
    execute_raw: Callable[[str], None]

    def settings(self) -> Settings:
        return Settings.from_env({}, db_path=self.db_path, database_url=self.database_url)

    def make(self) -> Store:
        return create_store(self.settings())


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    db_path = str(tmp_path / "not-yet" / "rtcvoice.db")  # the store makes the folders
    if request.param == "sqlite":

        def execute_sqlite(sql: str) -> None:
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            with sqlite3.connect(db_path) as conn:
                conn.executescript(sql)

        return Backend("sqlite", db_path, "", execute_sqlite)
    # Looked up here, not as a parameter, so SQLite-only runs never start PostgreSQL.
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    url = cluster.create_database()
    database = url.rsplit("/", 1)[1]

    def execute_postgres(sql: str) -> None:
        cluster.psql(sql, database)

    return Backend("postgres", db_path, url, execute_postgres)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = backend.make()
    await opened.open()
    yield opened
    await opened.close()


# -- threads -------------------------------------------------------------------------------------


async def test_threads_are_listed_per_user_most_recently_updated_first(store: Store) -> None:
    a1 = await store.create_thread("alice", "first")
    b1 = await store.create_thread("bob")
    a2 = await store.create_thread("alice", "second")
    anonymous = await store.create_thread(None, "no auth")

    assert [t.id for t in await store.list_threads("alice")] == [a2.id, a1.id]
    assert await store.list_threads("bob") == [b1]
    # Unauthenticated mode sees only the threads without a user, never a user's.
    assert await store.list_threads(None) == [anonymous]
    assert await store.list_threads("carol") == []
    assert [t.id for t in await store.list_threads("alice", limit=1)] == [a2.id]
    assert await store.get_thread(a1.id) == a1
    assert a1.title == "first" and b1.title == "" and a1.user_id == "alice"


async def test_a_new_message_moves_its_thread_to_the_top(store: Store) -> None:
    older = await store.create_thread("alice")
    newer = await store.create_thread("alice")
    assert [t.id for t in await store.list_threads("alice")] == [newer.id, older.id]

    message = await store.add_message(older.id, "user", "hello again")

    assert [t.id for t in await store.list_threads("alice")] == [older.id, newer.id]
    bumped = await store.get_thread(older.id)
    assert bumped is not None
    assert bumped.updated_at == message.created_at > newer.updated_at
    assert bumped.created_at == older.created_at


async def test_a_thread_id_chosen_by_the_client_is_kept_and_cannot_be_taken_twice(store: Store) -> None:
    thread = await store.create_thread("alice", "from the text chat", thread_id="chat-42")
    assert thread.id == "chat-42"
    assert await store.get_thread("chat-42") == thread

    with pytest.raises(ThreadExists):
        await store.create_thread("mallory", thread_id="chat-42")
    assert await store.get_thread("chat-42") == thread
    with pytest.raises(StoreError):
        await store.create_thread("alice", thread_id="x" * 1000)


# -- messages ------------------------------------------------------------------------------------


async def test_messages_keep_their_voice_fields_and_come_back_oldest_first(store: Store) -> None:
    thread = await store.create_thread("alice")
    added = [
        await store.add_message(thread.id, "user", "typed hello", content_type="text"),
        await store.add_message(thread.id, "user", "spoken question", session_id="s1", turn_id="t1"),
        await store.add_message(
            thread.id, "assistant", "a reply that was cut", interrupted=True, session_id="s1", turn_id="t1"
        ),
        await store.add_message(thread.id, "system", "note", content_type="text"),
    ]

    stored = await store.list_messages(thread.id)

    assert stored == added
    assert [m.content_type for m in stored] == ["text", "voice", "voice", "text"]
    assert [m.interrupted for m in stored] == [False, False, True, False]
    assert stored[2].session_id == "s1" and stored[2].turn_id == "t1"
    assert stored[0].session_id is None and stored[0].turn_id is None
    assert all(m.thread_id == thread.id for m in stored)
    assert len({m.id for m in stored}) == 4
    assert [m.as_chat_message() for m in stored[1:3]] == [
        {"role": "user", "content": "spoken question"},
        {"role": "assistant", "content": "a reply that was cut"},
    ]


async def test_rapid_messages_keep_insertion_order(store: Store) -> None:
    thread = await store.create_thread(None)
    for i in range(100):
        await store.add_message(thread.id, "user" if i % 2 else "assistant", f"m{i}")

    assert [m.content for m in await store.list_messages(thread.id)] == [f"m{i}" for i in range(100)]


async def test_list_messages_limit_keeps_the_latest_messages_oldest_first(store: Store) -> None:
    thread = await store.create_thread(None)
    for i in range(10):
        await store.add_message(thread.id, "user", f"m{i}")

    assert [m.content for m in await store.list_messages(thread.id, limit=3)] == ["m7", "m8", "m9"]
    with pytest.raises(StoreError):
        await store.list_messages(thread.id, limit=0)


async def test_messages_of_one_thread_never_show_in_another(store: Store) -> None:
    first = await store.create_thread("alice")
    second = await store.create_thread("alice")
    await store.add_message(first.id, "user", "one")
    await store.add_message(second.id, "user", "two")

    assert [m.content for m in await store.list_messages(first.id)] == ["one"]
    assert [m.content for m in await store.list_messages(second.id)] == ["two"]


async def test_tool_calls_are_kept_per_thread_after_the_message_they_follow_in_order(store: Store) -> None:
    thread, other = await store.create_thread("alice"), await store.create_thread("alice")
    asked = await store.add_message(thread.id, "user", "Weather?")
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function"}]}
    result = {"role": "tool", "content": '{"t": 12}', "tool_call_id": "c1"}
    await store.add_tool_calls(thread.id, asked.id, "turn-1", [call, result])
    await store.add_tool_calls(thread.id, asked.id, "turn-1", [{**result, "tool_call_id": "c2"}])
    await store.add_tool_calls(other.id, "elsewhere", None, [result])

    kept = await store.list_tool_calls(thread.id)
    assert kept == {asked.id: [call, result, {**result, "tool_call_id": "c2"}]}
    assert await store.list_tool_calls("no-such-thread") == {}


async def test_an_unknown_thread_is_a_store_error_and_stores_nothing(store: Store) -> None:
    with pytest.raises(ThreadNotFound):
        await store.add_message("no-such-thread", "user", "hello")
    assert issubclass(ThreadNotFound, StoreError)
    assert await store.get_thread("no-such-thread") is None
    assert await store.list_messages("no-such-thread") == []
    assert await store.list_threads(None) == []


async def test_a_bad_role_or_content_type_is_refused_and_stores_nothing(store: Store) -> None:
    thread = await store.create_thread(None)
    with pytest.raises(StoreError):
        await store.add_message(thread.id, "robot", "hello")
    with pytest.raises(StoreError):
        await store.add_message(thread.id, "user", "hello", content_type="video")

    assert await store.list_messages(thread.id) == []
    assert await store.get_thread(thread.id) == thread


async def test_concurrent_adds_from_many_tasks_keep_every_row(store: Store) -> None:
    threads = [await store.create_thread("alice") for _ in range(2)]

    async def writer(task: int) -> list[StoredMessage]:
        thread = threads[task % 2]
        return [
            await store.add_message(thread.id, "user", f"{task}:{i}", turn_id=str(task)) for i in range(10)
        ]

    written = await asyncio.gather(*(writer(task) for task in range(20)))

    stored = [m for thread in threads for m in await store.list_messages(thread.id)]
    assert len(stored) == 200
    assert {m.id for m in stored} == {m.id for batch in written for m in batch}
    for task in range(20):
        # Each task awaited its adds one by one, so its own messages must keep that order.
        own = [m.content for m in stored if m.turn_id == str(task)]
        assert own == [f"{task}:{i}" for i in range(10)]


# -- lifecycle and durability --------------------------------------------------------------------


async def test_threads_and_messages_survive_reopening(backend: Backend) -> None:
    first = backend.make()
    await first.open()
    await first.open()  # idempotent
    thread = await first.create_thread("alice", "kept")
    messages = [await first.add_message(thread.id, "user", f"m{i}", turn_id=f"t{i}") for i in range(3)]
    await first.close()
    await first.close()  # idempotent

    second = backend.make()
    await second.open()
    try:
        assert await second.get_thread(thread.id) == (await second.list_threads("alice"))[0]
        assert await second.list_messages(thread.id) == messages
        # The sequence goes on after a reopen: a new message sorts after the old ones.
        later = await second.add_message(thread.id, "assistant", "after reopen")
        assert await second.list_messages(thread.id) == [*messages, later]
    finally:
        await second.close()


async def test_a_store_that_is_not_open_refuses_calls(backend: Backend) -> None:
    unopened = backend.make()
    with pytest.raises(StoreError):
        await unopened.create_thread(None)
    await unopened.open()
    thread = await unopened.create_thread(None)
    await unopened.close()
    with pytest.raises(StoreError):
        await unopened.list_messages(thread.id)


async def test_a_write_whose_caller_is_cancelled_still_commits_whole(backend: Backend) -> None:
    # Barge-in cancels the turn that may be storing its reply: the write must not be torn.
    store = backend.make()
    await store.open()
    thread = await store.create_thread(None)
    adding = asyncio.create_task(store.add_message(thread.id, "assistant", "cut off", interrupted=True))
    await asyncio.sleep(0)  # the add starts and reaches the database call
    adding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await adding
    await store.close()  # waits for the write still in flight

    reopened = backend.make()
    await reopened.open()
    try:
        [message] = await reopened.list_messages(thread.id)
        assert (message.content, message.interrupted) == ("cut off", True)
        bumped = await reopened.get_thread(thread.id)
        assert bumped is not None and bumped.updated_at == message.created_at
    finally:
        await reopened.close()


CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from rtcvoice.settings import Settings
    from rtcvoice.store import create_store

    async def main():
        store = create_store(Settings.from_env({}, db_path=sys.argv[1], database_url=sys.argv[2]))
        await store.open()
        thread = await store.create_thread(None, "crash")
        print("thread", thread.id, flush=True)
        i = 0
        while True:
            message = await store.add_message(thread.id, "user", f"m{i}", turn_id=str(i))
            print("added", message.id, flush=True)
            i += 1

    asyncio.run(main())
    """
)


async def test_messages_reported_as_added_survive_a_sigkill(backend: Backend) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASH_CHILD,
        backend.db_path,
        backend.database_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None and child.stderr is not None
    reported: list[str] = []
    thread_id = ""
    try:
        while len(reported) < 40:
            line = (await child.stdout.readline()).decode()
            if not line:
                pytest.fail(f"the child died early: {(await child.stderr.read()).decode()}")
            kind, value = line.split()
            if kind == "thread":
                thread_id = value
            else:
                reported.append(value)
    except BaseException:
        child.kill()
        await child.wait()
        raise
    # Killed while it keeps adding: the kill lands in the middle of some later add. os.kill, not
    # child.kill(): a second kill polls the child and can reap it before asyncio's watcher does.
    os.kill(child.pid, signal.SIGKILL)
    assert await child.wait() == -signal.SIGKILL

    reopened = backend.make()
    await reopened.open()
    try:
        stored = await reopened.list_messages(thread_id, limit=100_000)
    finally:
        await reopened.close()
    stored_ids = [m.id for m in stored]
    assert stored_ids[: len(reported)] == reported
    # Whatever got in after the last report is whole and in order too.
    assert [m.content for m in stored] == [f"m{i}" for i in range(len(stored))]


async def test_a_foreign_table_with_the_same_name_is_refused(backend: Backend) -> None:
    # An app database that already has its own "messages" must not be written into blindly.
    backend.execute_raw("CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT)")
    foreign = backend.make()
    with pytest.raises(StoreError, match="messages"):
        await foreign.open()
    with pytest.raises(StoreError):
        await foreign.create_thread(None)


# -- shapes and selection ------------------------------------------------------------------------


async def test_as_dict_is_json_ready_with_utc_iso_timestamps(store: Store) -> None:
    thread = await store.create_thread("alice", "t")
    message = await store.add_message(thread.id, "assistant", "hi", interrupted=True, session_id="s")

    thread_json = json.loads(json.dumps((await store.get_thread(thread.id) or thread).as_dict()))
    message_json = json.loads(json.dumps(message.as_dict()))

    assert thread_json["id"] == thread.id and thread_json["user_id"] == "alice"
    assert thread_json["updated_at"].endswith("Z") and thread_json["updated_at_ts"] == message.created_at
    assert message_json == {
        "id": message.id,
        "thread_id": thread.id,
        "role": "assistant",
        "content": "hi",
        "content_type": "voice",
        "interrupted": True,
        "session_id": "s",
        "turn_id": None,
        "created_at": message_json["created_at"],
        "created_at_ts": message.created_at,
    }
    parsed = datetime.fromisoformat(message_json["created_at"].replace("Z", "+00:00"))
    assert abs(parsed.timestamp() - message.created_at) < 0.001


def test_create_store_uses_postgres_only_for_a_postgres_url(tmp_path: Path) -> None:
    default = create_store(Settings.from_env({}))
    assert isinstance(default, SqliteStore) and default.path == "rtcvoice.db"
    assert isinstance(create_store(Settings.from_env({}, db_path=str(tmp_path / "x.db"))), SqliteStore)
    for url in ("postgresql://u:secret@db.example/app", "postgres://db.example/app"):
        chosen = create_store(Settings.from_env({"RTCVOICE_DATABASE_URL": url}))
        assert isinstance(chosen, PostgresStore)
        assert "secret" not in repr(chosen)
    with pytest.raises(StoreError):
        create_store(Settings.from_env({}, database_url="mysql://db.example/app"))


async def test_sqlite_store_is_in_wal_mode_with_a_durable_schema(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "voice.db"
    store = SqliteStore(str(path))
    await store.open()
    try:
        await store.create_thread(None)
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            indexes = {row[1] for row in conn.execute("PRAGMA index_list(messages)")}
            assert "messages_conversation_seq" in indexes
            columns = [row[2] for row in conn.execute("PRAGMA index_info(messages_conversation_seq)")]
            assert columns == ["conversation_id", "seq"]
    finally:
        await store.close()


async def test_sqlite_memory_store_works_for_quick_uses() -> None:
    store = SqliteStore(":memory:")
    await store.open()
    try:
        thread = await store.create_thread(None)
        message = await store.add_message(thread.id, "user", "hi", content_type="text")
        assert await store.list_messages(thread.id) == [message]
    finally:
        await store.close()
