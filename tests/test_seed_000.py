"""Seed 000's own client code against rtcvoice: its RTK Query voice slice and its socket.io session.

tests/seeds/000/src/redux/features/voice/voiceApi.ts is the seed's file, verbatim; the harness next
to it does what the seed's app does with it (tests/seeds/000/harness.ts). esbuild bundles the two
with the API's URL as ``process.env.VITE_API_URL``, as the app's bundler would, and the page is
served from another origin than the API, so every request the seed makes is cross-origin, as it
is when the app runs on its own dev server. The fast tests below check the same contract at the
route level: the ``{data}`` envelope, CORS preflights, Socket.IO with auth on, and the seed
client's way of carrying on after socket.io-client reconnects.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import jwt
import pytest
import socketio
from aiohttp import web
from conftest import ServerFactory, openai_agent
from fake_openai import FakeOpenAI
from playwright.async_api import Page, Playwright

# pw and silence_wav are fixtures: imported here, pytest finds them for this module's tests.
from test_browser import chromium, eventually, live_sessions, pw, silence_wav  # noqa: F401

from rtcvoice.conversation.replies import APOLOGY

SEEDS = Path(__file__).resolve().parent / "seeds"
SEED = SEEDS / "000"
ESBUILD = SEEDS / "node_modules" / ".bin" / "esbuild"
AI_VOICE = "/api/v1/ai/voice"
NAMESPACE = "/api/v1/"  # where socket.io-client goes when given the REST base URL
SECRET = "seed-000-test-secret-of-32-bytes-or-more"
# Generous: two busy cores run Chromium, the servers and the test.
PAGE_TIMEOUT_MS = 120_000
EVENT_TIMEOUT_S = 60.0

# sha256 of the seed's code block: the copy must stay byte-for-byte the seed's.
SEED_FILE_SHA256 = "30c55ab3fdb2fba810c944c42a9553f981a471b7f293ae8c2f6bed463fc79b6d"

USER = "seed-user-7"
CHAT = "chat-42"  # the app's own chat id: rtcvoice has never seen it
HTTP_QUESTION = "What is the capital of France?"
SOCKET_QUESTION = "And what is the capital of Italy?"
REPLIES = {
    HTTP_QUESTION: "Paris is the capital of France.",
    SOCKET_QUESTION: "Rome is the capital of Italy.",
}


def answer(messages: list[dict[str, Any]]) -> str:
    """The fake LLM's reply to the last user message (a fixed one per question)."""
    return REPLIES.get(str(messages[-1].get("content", "")), "I did not catch that.")


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# -- the page: bundled harness, served from origins other than the API's ----------------------------
async def bundle_harness(api_url: str, out_dir: Path) -> None:
    """harness.ts and the seed's file as one browser script, with the API's URL defined in."""
    if not ESBUILD.exists():
        pytest.fail(f"{ESBUILD} is missing: scripts/test installs it (npm ci in tests/seeds).")
    proc = await asyncio.create_subprocess_exec(
        str(ESBUILD),
        str(SEED / "harness.ts"),
        "--bundle",
        "--format=iife",
        "--platform=browser",
        "--target=chrome110",
        f"--tsconfig={SEED / 'tsconfig.json'}",  # its paths give the seed's '@/...' imports
        f"--define:process.env.VITE_API_URL={json.dumps(api_url)}",
        f"--outfile={out_dir / 'harness.js'}",
        "--log-level=warning",
        cwd=SEEDS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode(errors="replace")


@pytest.fixture
async def page_origins(tmp_path: Path) -> AsyncIterator[tuple[str, str, Path]]:
    """One static site on two ports: (the app's origin, a stranger's origin, the site's folder).

    Two ports are two origins to a browser; only the first is put in the API's cors_origins.
    """
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "index.html").write_text(
        '<!doctype html><meta charset="utf-8"><title>seed 000</title><script src="harness.js"></script>\n'
    )
    app = web.Application()
    app.router.add_static("/", site_dir)
    runner = web.AppRunner(app)
    await runner.setup()
    urls = []
    for _ in range(2):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        urls.append(f"http://127.0.0.1:{port}")
    try:
        yield urls[0], urls[1], site_dir
    finally:
        await runner.cleanup()


async def harness_results(page: Page, url: str) -> dict[str, Any]:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    await page.wait_for_function("window.__results && window.__results.done", timeout=PAGE_TIMEOUT_MS)
    results: dict[str, Any] = await page.evaluate("window.__results")
    assert not errors, errors
    assert "harnessError" not in results, results
    return results


async def thread_messages(api: str, thread_id: str, user: str) -> tuple[int, dict[str, Any]]:
    query = urlencode({"user_id": user})
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{api}/api/v1/chat/threads/{thread_id}/messages?{query}") as resp,
    ):
        return resp.status, await resp.json()


# -- the browser test -------------------------------------------------------------------------------
async def test_the_seeds_voice_slice_and_socket_session_work_from_another_origin(
    pw: Playwright,  # noqa: F811
    silence_wav: Path,  # noqa: F811
    start_server: ServerFactory,
    fake_openai: FakeOpenAI,
    page_origins: tuple[str, str, Path],
) -> None:
    app_origin, stranger_origin, site_dir = page_origins
    fake_openai.reply = answer
    api = await start_server(agent=openai_agent(fake_openai), cors_origins=app_origin)
    await bundle_harness(f"{api}/api/v1/", site_dir)
    query = {
        "userId": USER,
        "chatId": CHAT,
        "httpTranscript": HTTP_QUESTION,
        "socketTranscript": SOCKET_QUESTION,
        "modelName": "app-chosen-model",
    }

    async with chromium(pw, silence_wav) as context:
        app_page = await context.new_page()
        results = await harness_results(app_page, f"{app_origin}/index.html?{urlencode(query)}")
        asked_before_stranger = len(fake_openai.requests)
        stranger_page = await context.new_page()
        blocked = await harness_results(
            stranger_page,
            f"{stranger_origin}/index.html?{urlencode({**query, 'chatId': 'chat-blocked', 'probe': '1'})}",
        )

    # Cross-origin, as the app on its own dev server: the API's URL came from the bundle's define.
    assert results["apiUrl"] == f"{api}/api/v1/"
    assert results["origin"] == app_origin != origin(api)

    # The three REST endpoints, read through the slice's transformResponse (r => r.data).
    assert results["status"] == {
        "data": {"webrtc": True, "speechRecognition": True, "speechSynthesis": True},
        "error": None,
    }, results
    assert results["voices"]["error"] is None, results["voices"]
    voices = results["voices"]["data"]
    assert voices, results["voices"]
    for voice in voices:
        assert set(voice) == {"id", "name", "gender", "lang"}, voice
        assert isinstance(voice["lang"], str) and voice["lang"], voice
    processed = results["processed"]
    assert processed.get("error") is None, processed
    assert processed["data"]["text"] == REPLIES[HTTP_QUESTION]
    assert processed["data"]["chatId"] == CHAT
    assert processed["data"]["messageId"]
    http_turn = next(r for r in fake_openai.requests if r["messages"][-1]["content"] == HTTP_QUESTION)
    assert http_turn["model"] == "app-chosen-model"  # the slice's optional modelName went through

    # The socket.io session, on the namespace the REST URL implies.
    assert "sessionError" not in results, results
    assert results["namespace"] == NAMESPACE
    assert results["session"]["sessionId"]
    assert len(results["responses"]) == 1, results["responses"]
    response = results["responses"][0]
    assert response["text"] == REPLIES[SOCKET_QUESTION]
    assert response["messageId"]

    # Everything landed in the app's chat id, owned by the app's user, in order.
    status, body = await thread_messages(api, CHAT, USER)
    assert status == 200, body
    assert body["thread"]["user_id"] == USER
    stored = [(m["role"], m["content"], m["content_type"]) for m in body["messages"]]
    assert stored[:2] == [
        ("user", HTTP_QUESTION, "voice"),
        ("assistant", REPLIES[HTTP_QUESTION], "text"),
    ], stored
    assert [(role, content) for role, content, _ in stored[2:]] == [
        ("user", SOCKET_QUESTION),
        ("assistant", REPLIES[SOCKET_QUESTION]),
    ], stored
    assert stored[2][2] == "voice", stored  # the browser heard it: a spoken turn
    assert body["messages"][1]["id"] == processed["data"]["messageId"]
    assert body["messages"][3]["id"] == response["messageId"]
    assert (
        body["messages"][2]["session_id"]
        == body["messages"][3]["session_id"]
        == results["session"]["sessionId"]
    )

    # The socket turn's agent saw the HTTP turn as history.
    asked = [r["messages"] for r in fake_openai.requests]
    socket_turn = next(m for m in asked if m[-1]["content"] == SOCKET_QUESTION)
    history = [(m["role"], m["content"]) for m in socket_turn if m["role"] != "system"]
    assert history == [
        ("user", HTTP_QUESTION),
        ("assistant", REPLIES[HTTP_QUESTION]),
        ("user", SOCKET_QUESTION),
    ], history

    # end-voice-session (and the disconnect after it) ended the server's session.
    assert await eventually(lambda: _no_sessions(api), timeout=30.0)

    # A page on an origin not in cors_origins: the same code, refused by the browser at every step.
    assert blocked["origin"] == stranger_origin != origin(api)
    assert stranger_origin != app_origin
    for step in ("status", "voices", "processed"):
        assert (blocked[step]["error"] or {}).get("status") == "FETCH_ERROR", blocked[step]
    assert "session" not in blocked and "sessionError" in blocked, blocked  # socket.io's connect_error
    # The JSON POST needs a preflight, which was refused: it never reached the handler.
    status, _ = await thread_messages(api, "chat-blocked", USER)
    assert status == 404
    assert len(fake_openai.requests) == asked_before_stranger, "the stranger's transcript reached the agent"


async def _no_sessions(api: str) -> bool:
    return await live_sessions(api) == 0


# -- route level: no browser ------------------------------------------------------------------------
async def test_the_voice_routes_answer_in_a_data_envelope_with_camel_case_fields(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = answer
    api = await start_server(agent=openai_agent(fake_openai))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{api}{AI_VOICE}/status") as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "data": {"webrtc": True, "speechRecognition": True, "speechSynthesis": True}
            }
        async with http.get(f"{api}{AI_VOICE}/available-voices") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert set(body) == {"data"} and body["data"], body
        assert all(set(v) == {"id", "name", "gender", "lang"} for v in body["data"]), body
        async with http.post(
            f"{api}{AI_VOICE}/process-transcript",
            json={"transcript": HTTP_QUESTION, "chatId": "chat-route", "userId": USER, "modelName": "fake"},
        ) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert set(body) == {"data"}, body
        data = body["data"]
        assert {"messageId", "text", "chatId"} <= set(data), data
        assert not any("_" in key for key in data), data  # camelCase only
        assert (data["text"], data["chatId"], data["modelName"]) == (
            REPLIES[HTTP_QUESTION],
            "chat-route",
            "fake",
        )
        assert fake_openai.requests[-1]["model"] == "fake"
        # Errors keep the API's error shape (RTK Query puts it in the query's error.data).
        async with http.post(f"{api}{AI_VOICE}/process-transcript", json={"chatId": "chat-route"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_field"


async def test_cors_answers_only_the_configured_origins(start_server: ServerFactory) -> None:
    app_origin, stranger = "http://app.example:5173", "http://stranger.example"
    api = await start_server(cors_origins=f"{app_origin}, http://other.example")
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with aiohttp.ClientSession() as http:
        async with http.options(
            f"{api}{AI_VOICE}/process-transcript", headers={"Origin": app_origin, **preflight}
        ) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == app_origin
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert "content-type" in resp.headers["Access-Control-Allow-Headers"].lower()
        async with http.options(
            f"{api}{AI_VOICE}/process-transcript", headers={"Origin": stranger, **preflight}
        ) as resp:
            assert resp.status != 204
            assert "Access-Control-Allow-Origin" not in resp.headers
        for who, allowed in ((app_origin, True), (stranger, False)):
            async with http.get(f"{api}{AI_VOICE}/status", headers={"Origin": who}) as resp:
                assert resp.status == 200  # answered; only a browser withholds it from the page
                assert (resp.headers.get("Access-Control-Allow-Origin") == who) is allowed
                # Either way the answer depends on Origin, so caches must keep them apart.
                assert "Origin" in resp.headers.getall("Vary", [])
            # Socket.IO's own check, on its handshake: a stranger gets no session at all.
            async with http.get(f"{api}/socket.io/?EIO=4&transport=polling", headers={"Origin": who}) as resp:
                assert (resp.status == 200) is allowed, await resp.text()
                assert (resp.headers.get("Access-Control-Allow-Origin") == who) is allowed
        # Without an Origin (same-origin pages, servers, curl) nothing changes.
        async with http.get(f"{api}/socket.io/?EIO=4&transport=polling") as resp:
            assert resp.status == 200
        async with http.get(f"{api}{AI_VOICE}/status") as resp:
            assert resp.status == 200
            assert "Access-Control-Allow-Origin" not in resp.headers
            assert "Origin" in resp.headers.getall("Vary", [])


class SeedSocket:
    """A socket.io client on the namespace seed 000's client uses, with its events in a queue."""

    EVENTS = ("voice-session-started", "voice-response", "voice-session-ended", "error")

    def __init__(self) -> None:
        self.client = socketio.AsyncClient(reconnection=False)
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        for name in self.EVENTS:
            self.client.on(
                name, lambda data, name=name: self.events.put_nowait((name, data)), namespace=NAMESPACE
            )

    async def connect(self, api: str, auth: dict[str, str] | None = None) -> SeedSocket:
        await self.client.connect(api, namespaces=[NAMESPACE], auth=auth, wait_timeout=EVENT_TIMEOUT_S)
        return self

    async def emit(self, event: str, data: dict[str, Any]) -> None:
        await self.client.emit(event, data, namespace=NAMESPACE)

    async def expect(self, name: str) -> dict[str, Any]:
        got, data = await asyncio.wait_for(self.events.get(), EVENT_TIMEOUT_S)
        assert got == name, (got, data)
        assert isinstance(data, dict)
        return data

    async def start(self, **body: str) -> str:
        await self.emit("start-voice-session", body)
        return str((await self.expect("voice-session-started"))["sessionId"])


async def test_socketio_with_auth_on_needs_a_token_and_takes_the_user_from_it(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = answer
    api = await start_server(agent=openai_agent(fake_openai), auth_jwt_secret=SECRET)
    exp = int(time.time()) + 300
    good = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
    forged = jwt.encode({"sub": "alice", "exp": exp}, "not-the-secret-" + SECRET, algorithm="HS256")

    for auth in (None, {"token": forged}):
        refused = SeedSocket()
        with pytest.raises(socketio.exceptions.ConnectionError):
            await refused.connect(api, auth)
        await refused.client.disconnect()

    bearer = {"Authorization": f"Bearer {good}"}
    sock = await SeedSocket().connect(api, {"token": good})
    try:
        # The token's user wins over the one the body names.
        session_id = await sock.start(userId="mallory", chatId="chat-auth")
        async with aiohttp.ClientSession(headers=bearer) as http:
            async with http.get(f"{api}/api/v1/voice/status") as resp:
                assert (await resp.json())["sessions"] == 1

            await sock.emit("voice-message", {"sessionId": session_id, "transcript": SOCKET_QUESTION})
            response = await sock.expect("voice-response")
            assert response["text"] == REPLIES[SOCKET_QUESTION]
            # Sent once stored: the thread already holds it, under the id the client got.
            async with http.get(f"{api}/api/v1/chat/threads/chat-auth/messages") as resp:
                body = await resp.json()
            assert body["thread"]["user_id"] == "alice"
            assert [(m["role"], m["content"]) for m in body["messages"]] == [
                ("user", SOCKET_QUESTION),
                ("assistant", REPLIES[SOCKET_QUESTION]),
            ]
            assert body["messages"][-1]["id"] == response["messageId"]

            # end-voice-session alone ends it; the socket stays connected.
            await sock.emit("end-voice-session", {"sessionId": session_id})
            ended = await sock.expect("voice-session-ended")
            assert (ended["sessionId"], ended["reason"]) == (session_id, "client_hangup")
            async with http.get(f"{api}/api/v1/voice/status") as resp:
                assert (await resp.json())["sessions"] == 0
            assert sock.client.connected
    finally:
        await sock.client.disconnect()


async def test_a_reconnected_client_still_sending_its_first_session_id_reaches_its_new_session(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    """What seed 000's client does when socket.io-client reconnects by itself: its connect
    handler starts a new session, but it goes on sending the id of the first one."""
    fake_openai.reply = answer
    api = await start_server(agent=openai_agent(fake_openai))
    first = await SeedSocket().connect(api)
    old_id = await first.start(userId=USER, chatId="chat-reconnect")
    await first.client.disconnect()  # the dropped connection: its session ends with it
    assert await eventually(lambda: _no_sessions(api), timeout=30.0)

    sock = await SeedSocket().connect(api)
    try:
        new_id = await sock.start(userId=USER, chatId="chat-reconnect")
        assert new_id != old_id
        await sock.emit("voice-message", {"sessionId": old_id, "transcript": SOCKET_QUESTION})
        response = await sock.expect("voice-response")
        assert (response["sessionId"], response["text"]) == (new_id, REPLIES[SOCKET_QUESTION])

        # With two sessions on the connection, an id it does not hold names neither.
        second_id = await sock.start(userId=USER, chatId="chat-reconnect")
        await sock.emit("voice-message", {"sessionId": old_id, "transcript": SOCKET_QUESTION})
        assert (await sock.expect("error"))["code"] == "session_not_found"
        await sock.emit("end-voice-session", {"sessionId": second_id})
        assert (await sock.expect("voice-session-ended"))["sessionId"] == second_id
        # Down to one again: the old id reaches the session that is left.
        await sock.emit("end-voice-session", {"sessionId": old_id})
        assert (await sock.expect("voice-session-ended"))["sessionId"] == new_id
        assert await live_sessions(api) == 0
    finally:
        await sock.client.disconnect()


def test_the_seed_file_is_the_seeds_code_block_verbatim() -> None:
    """The seed's file must stay the seed's: only the bundle's define points it at this server."""
    seed_text = Path("/work/shared/seeds/000_f27e8e852728b188.txt")
    copy = (SEED / "src" / "redux" / "features" / "voice" / "voiceApi.ts").read_text()
    assert "process.env.VITE_API_URL || 'http://localhost:5000/api/v1/'" in copy
    assert hashlib.sha256(copy.encode()).hexdigest() == SEED_FILE_SHA256
    if seed_text.exists():  # the seeds folder is not part of the repository
        assert f"```typescript\n{copy}```" in seed_text.read_text()


async def test_a_failing_agent_still_gets_a_voice_response_the_page_can_speak(
    start_server: ServerFactory,
) -> None:
    """The seed's page speaks every voice-response and ignores errors once started: a failed
    turn must give it words to say, not silence or an empty string."""
    async with FakeOpenAI(fault="500") as failing:
        api = await start_server(agent=openai_agent(failing))
        sock = await SeedSocket().connect(api)
        try:
            session_id = await sock.start(userId=USER, chatId="chat-fault")
            await sock.emit("voice-message", {"sessionId": session_id, "transcript": SOCKET_QUESTION})
            error = await sock.expect("error")
            response = await sock.expect("voice-response")
        finally:
            await sock.client.disconnect()
    assert error["code"] == "agent_error" and error["sessionId"] == session_id
    assert response["text"] == APOLOGY and response["messageId"] is None, "the apology is not stored"
