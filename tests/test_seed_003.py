"""The audio chat page of seed 003, served unchanged, on the app's own tables.

The app (a Node/Sequelize-style backend) owns ``chat_conversations``/``chat_messages``; its
database is made here with plain SQL before rtcvoice starts, and what rtcvoice wrote is read back
with plain SQL. The page is the seed's snippets assembled (tests/seeds/003/audio_chat.html), in
headless Chromium whose microphone speaks a question.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ServerFactory, openai_agent
from fake_openai import FakeOpenAI
from playwright.async_api import Playwright, WebSocket
from speech import wer
from test_auth import SECRET, token
from test_browser import QUESTION, chromium, pw, question_wav  # noqa: F401  (shared fixtures)
from test_seed_002 import open_on_origin, ws_base

SEED = Path(__file__).parent / "seeds" / "003"
SEED_HOST = "ws://localhost:3000"
SEED_THREAD = "'existing_thread_id'"
AUDIO_CHAT = "/api/v1/chat/audio"
USER = "u-77"
THREAD = "5b0c3f2e-8d4a-4c1e-9f27-3a6e1d0b7c55"  # the app's own id (Sequelize UUIDV4)
APP_TEXT = "Remind me what we said about the trip to the moon."
APP_TITLE = "Moon trip"
ANSWER = "The moon is about three hundred and eighty thousand kilometres away."
LONG_ANSWER = " ".join(
    f"Part {n} of the story is about the moon, the sea and the long road between them." for n in range(1, 9)
)
# Two shared cores run Chromium, Whisper, the TTS and the test itself.
TURN_TIMEOUT_S = 120.0

APP_SCHEMA = f"""
    CREATE TABLE chat_conversations (
        id TEXT PRIMARY KEY,
        "userId" TEXT NOT NULL,
        title TEXT,
        "createdAt" DATETIME,
        "updatedAt" DATETIME
    );
    CREATE TABLE chat_messages (
        id TEXT PRIMARY KEY,
        "conversationId" TEXT REFERENCES chat_conversations (id),
        role TEXT,
        content TEXT,
        "contentType" TEXT,
        "createdAt" DATETIME
    );
    -- What the app's text chat wrote, as Sequelize writes its dates.
    INSERT INTO chat_conversations (id, "userId", title, "createdAt", "updatedAt")
        VALUES ('{THREAD}', '{USER}', '{APP_TITLE}',
                '2024-05-01 12:00:00.000 +00:00', '2024-05-01 12:00:00.000 +00:00');
    INSERT INTO chat_messages (id, "conversationId", role, content, "contentType", "createdAt")
        VALUES ('7e5d1c2b-0a9f-4e8d-b7c6-5a4f3e2d1c0b', '{THREAD}', 'user', '{APP_TEXT}', 'text',
                '2024-05-01 12:00:00.000 +00:00');
"""


def app_database(tmp_path: Path, schema: str = APP_SCHEMA) -> Path:
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(schema)
    conn.close()
    return path


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Plain SQL, as the app reads its tables: no rtcvoice code."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def thread_rows(db: Path, thread: str | int) -> list[tuple[str, str, str]]:
    return query(
        db,
        'SELECT role, content, "contentType" FROM chat_messages WHERE "conversationId" = ? '
        'ORDER BY "createdAt", rowid',
        thread,
    )


async def start_app_server(start_server: ServerFactory, fake: FakeOpenAI, db: Path) -> str:
    return await start_server(
        agent=openai_agent(fake),
        db_path=str(db),
        db_threads_table="chat_conversations",
        db_messages_table="chat_messages",
        auth_jwt_secret=SECRET,
    )


def seed_page(url: str, thread_id: str) -> str:
    """The seed's page, aimed at this server and the app's thread: the only changes made to it."""
    html = (SEED / "audio_chat.html").read_text()
    assert html.count(SEED_HOST) == 1 and html.count(SEED_THREAD) == 1
    return html.replace(SEED_HOST, ws_base(url)).replace(SEED_THREAD, json.dumps(thread_id))


class Frames:
    """What the page's WebSocket received: JSON events in order, and how many binary frames."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.binary = 0

    def on_websocket(self, ws: WebSocket) -> None:
        ws.on("framereceived", self._received)

    def _received(self, payload: str | bytes) -> None:
        if isinstance(payload, bytes):
            self.binary += 1
        else:
            self.events.append(json.loads(payload))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def wait_for(self, kind: str, timeout: float = TURN_TIMEOUT_S) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout):
                while not self.of_type(kind):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"no {kind} came; the page received {self.events}") from None
        return self.of_type(kind)[0]


async def test_the_seeds_page_talks_on_the_apps_thread_and_the_app_sees_it(
    pw: Playwright,  # noqa: F811
    start_server: ServerFactory,
    fake_openai: FakeOpenAI,
    question_wav: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    db = app_database(tmp_path)
    fake_openai.reply = ANSWER
    url = await start_app_server(start_server, fake_openai, db)
    frames = Frames()
    page_errors: list[str] = []
    async with chromium(pw, question_wav) as context:
        await context.add_init_script(f"window.__authToken = {json.dumps(token(USER))};")
        page = await context.new_page()
        page.on("websocket", frames.on_websocket)
        page.on("pageerror", lambda err: page_errors.append(f"{err.name}: {err.message}"))
        # On the server's own origin, so that '/static/audio-processor.js' is the server's.
        await open_on_origin(page, url, seed_page(url, THREAD))
        await page.click("#voice-chat")

        done = await frames.wait_for("end_of_response")
        # Every Blob of the reply came before end_of_response; the page decodes each as it comes.
        await page.wait_for_function(
            """(blobs) => window.__audio.received === blobs
                && window.__audio.decoded + window.__audio.errors.length === blobs""",
            arg=frames.binary,
            timeout=60_000,
        )
        audio = await page.evaluate("window.__audio")
        await page.click("#stop")
        # The server saves the call and closes the socket: the page's onclose logs it.
        await page.wait_for_function("() => window.__log.some((e) => e.kind === 'closed')", timeout=60_000)
        log: list[dict[str, str]] = await page.evaluate("window.__log")

    assert page_errors == []
    assert [e for e in log if e["kind"] == "error"] == []
    # The seed's status messages, as the call went.
    statuses = [e["message"] for e in log if e["kind"] == "status"]
    expected = ["Voice chat started in en", f"Conversation thread {THREAD}", "Thinking...", "Speaking..."]
    it = iter(statuses)
    assert all(any(s.startswith(e) for s in it) for e in expected), statuses
    assert statuses[-1].startswith("Conversation saved"), statuses
    # The question, heard: final_transcript's `transcript`, shown by the seed's handler.
    (heard,) = [e["text"] for e in log if e["kind"] == "user" and e["text"]]  # not noise taken for speech
    assert wer(QUESTION, heard) <= 0.3, heard
    # The answer as text and as audio Blobs that the browser decoded and played.
    assert done["text"] == ANSWER
    assert "".join(e["text"] for e in frames.of_type("ai_text")) == ANSWER
    assert audio["errors"] == [] and audio["decoded"] == frames.binary > 0, audio
    assert audio["seconds"] > 0.5, audio

    # The app's own tables, read by the app's own SQL: its text message, then the voice turn.
    assert thread_rows(db, THREAD) == [
        ("user", APP_TEXT, "text"),
        ("user", heard, "voice"),
        ("assistant", ANSWER, "voice"),
    ]
    assert query(db, 'SELECT id, "userId", title FROM chat_conversations') == [(THREAD, USER, APP_TITLE)]
    # The agent was given the text chat's message as the conversation so far.
    assert fake_openai.requests[-1]["messages"][1:] == [
        {"role": "user", "content": APP_TEXT},
        {"role": "user", "content": heard},
    ]


async def receive_event(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    """The next JSON event of this type (the AI's voice, binary, is skipped)."""
    async with asyncio.timeout(TURN_TIMEOUT_S):
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT and (event := json.loads(msg.data))["type"] == kind:
                return dict(event)
    raise AssertionError(f"the socket closed before a {kind} event")


async def test_another_user_cannot_use_the_thread_and_no_token_is_refused(
    start_server: ServerFactory, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    db = app_database(tmp_path)
    fake_openai.reply = ANSWER
    url = await start_app_server(start_server, fake_openai, db)
    socket = ws_base(url) + AUDIO_CHAT
    async with aiohttp.ClientSession() as http:
        for query_string in (
            "",
            "?token=",
            f"?token={token(USER, secret='a-long-secret-that-is-not-the-apps-own-secret')}",
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(socket + query_string)
            assert refused.value.status == 401

        async with http.ws_connect(f"{socket}?token={token('mallory')}") as ws:
            await ws.send_json({"action": "start", "model": "nova-3", "language": "en-US"})
            await ws.send_json({"action": "set_thread", "threadId": THREAD})
            error = await receive_event(ws, "error")
            assert error["code"] == "thread_not_found" and error["message"], error  # what showError shows
            # Still a working call, on a thread of her own, made with her first message.
            await ws.send_json({"type": "text_message", "content": "Hello?"})
            own = await receive_event(ws, "thread.updated")
            assert (await receive_event(ws, "end_of_response"))["text"] == ANSWER
            await ws.send_json({"action": "stop"})
            await receive_event(ws, "session.ended")

    assert own["thread_id"] != THREAD
    assert thread_rows(db, THREAD) == [("user", APP_TEXT, "text")]
    assert thread_rows(db, own["thread_id"]) == [("user", "Hello?", "text"), ("assistant", ANSWER, "voice")]
    assert query(db, 'SELECT id, "userId" FROM chat_conversations ORDER BY "userId"') == [
        (own["thread_id"], "mallory"),
        (THREAD, USER),
    ]
    # Nothing of u-77's thread reached the agent for her.
    assert all(m["content"] != APP_TEXT for r in fake_openai.requests for m in r["messages"])


async def test_an_app_with_integer_thread_ids_passes_its_number_as_threadId(
    start_server: ServerFactory, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """Sequelize's default keys are integers: the page's ``threadId: thread.id`` is then a number."""
    db = app_database(
        tmp_path,
        APP_SCHEMA.replace("id TEXT PRIMARY KEY", "id INTEGER PRIMARY KEY AUTOINCREMENT")
        .replace('"conversationId" TEXT', '"conversationId" INTEGER')
        .replace(f"'{THREAD}'", "41")
        .replace("'7e5d1c2b-0a9f-4e8d-b7c6-5a4f3e2d1c0b'", "1"),
    )
    fake_openai.reply = ANSWER
    url = await start_app_server(start_server, fake_openai, db)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{ws_base(url)}{AUDIO_CHAT}?token={token(USER)}") as ws:
            await ws.send_json({"action": "set_thread", "threadId": 41})
            assert (await receive_event(ws, "thread.updated"))["thread_id"] == "41"
            await ws.send_json({"type": "text_message", "content": "Hello?"})
            assert (await receive_event(ws, "end_of_response"))["text"] == ANSWER
            await ws.send_json({"action": "stop"})
            await receive_event(ws, "session.ended")
    assert thread_rows(db, 41) == [
        ("user", APP_TEXT, "text"),
        ("user", "Hello?", "text"),
        ("assistant", ANSWER, "voice"),
    ]
    assert query(db, "SELECT id FROM chat_conversations") == [(41,)]


async def test_stop_mid_reply_saves_what_was_said_before_conversation_saved(
    start_server: ServerFactory, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    db = app_database(tmp_path)
    fake_openai.reply = LONG_ANSWER
    fake_openai.token_delay = 0.05  # still streaming when the user stops
    url = await start_app_server(start_server, fake_openai, db)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{ws_base(url)}{AUDIO_CHAT}?token={token(USER)}") as ws:
            await ws.send_json({"action": "set_thread", "threadId": THREAD})
            await receive_event(ws, "thread.updated")
            await ws.send_json({"type": "text_message", "content": "Tell me everything."})
            async with asyncio.timeout(TURN_TIMEOUT_S):
                while (await ws.receive()).type != aiohttp.WSMsgType.BINARY:
                    pass  # until the AI is heard
            await ws.send_json({"action": "stop"})
            ended = await receive_event(ws, "end_of_response")
            await receive_event(ws, "session.ended")
            saved = await receive_event(ws, "status")
            # Read the moment the page is told, as an app that lists the thread at once would.
            rows = thread_rows(db, THREAD)
    assert saved["message"].startswith("Conversation saved"), saved
    assert ended["interrupted"] is True
    assert len(rows) == 3, rows
    said = rows[2][1]
    assert rows == [
        ("user", APP_TEXT, "text"),
        ("user", "Tell me everything.", "text"),
        ("assistant", said, "voice"),
    ]
    assert said and LONG_ANSWER.startswith(said), said
