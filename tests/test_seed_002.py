"""The realtime voice API of seed 002, served unchanged: its own Python and JavaScript clients,
kept verbatim in tests/seeds/002/, run as written against rtcvoice.

Only their host changes (``ws://localhost:8000`` is replaced, by plain string replacement, when a
test runs them). The seed's JavaScript client sends its text input before its socket is open,
which every browser refuses; the last test shows that, and that moving that one send into
``onopen`` is all it takes to get the reply.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from conftest import ServerFactory, openai_agent
from fake_openai import FakeOpenAI, _usage
from playwright.async_api import ConsoleMessage, Page, Playwright, WebSocket
from speech import speak, wer
from test_auth import SECRET, bearer, token
from test_browser import chromium, pw, silence_wav  # noqa: F401  (fixtures shared with the browser tests)

from rtcvoice.audio import STT_RATE, int16_to_float, resample_pcm
from rtcvoice.engines import Engines

SEED = Path(__file__).parent / "seeds" / "002"
SEED_HOST = "ws://localhost:8000"
REALTIME = "/api/v1/streaming/realtime"
# What the seed's clients say, and what the fake agent answers them.
HELLO = "Hello, how are you?"
REPLY = "I am doing very well, thank you for asking. How can I help you today?"
QUESTION = "What is the tallest mountain in the world?"
ANSWER = "Mount Everest is the tallest mountain in the world."
# The seed's full session.update, as its "Request Types" section writes it.
SEED_SESSION_UPDATE = {
    "type": "session.update",
    "session_update": {
        "voice": "alloy",
        "language": "en",
        "instructions": "You are a helpful AI assistant.",
        "temperature": 0.8,
        "max_response_output_tokens": 4096,
    },
}
# Generous: two shared cores run the server's Whisper and TTS, a client and maybe Chromium.
TURN_TIMEOUT_S = 120.0

Message = dict[str, Any]


def ws_base(url: str) -> str:
    return "ws://" + url.removeprefix("http://")


def seed_source(name: str, url: str) -> str:
    """The seed's client, aimed at this test's server: the only change made to it."""
    source = (SEED / name).read_text()
    assert source.count(SEED_HOST) == 1, f"{name} no longer names {SEED_HOST} once"
    return source.replace(SEED_HOST, ws_base(url))


async def run_python_client(
    script: Path, until: Callable[[Message], bool], timeout: float = TURN_TIMEOUT_S
) -> list[Message]:
    """Run the seed's Python client until it prints a message ``until`` accepts; what it printed.

    It loops forever printing ``Received: {data}`` (a Python dict), so the test stops it.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-u",  # its print()s must reach the pipe as they happen, not when a buffer fills
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=64 * 1024 * 1024,  # one printed response.audio carries a whole chunk of base64 audio
    )
    assert proc.stdout is not None and proc.stderr is not None
    received: list[Message] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    stderr = (await proc.stderr.read()).decode()
                    raise AssertionError(
                        f"the seed's client exited ({await proc.wait()}) after {received!r}:\n{stderr[-3000:]}"
                    )
                assert line.startswith("Received: "), line
                received.append(ast.literal_eval(line.removeprefix("Received: ").strip()))
                if until(received[-1]):
                    return received
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


def of_type(messages: list[Message], kind: str) -> list[Message]:
    return [m for m in messages if m["type"] == kind]


def is_done(message: Message) -> bool:
    return message["type"] == "response.done"


def check_response_shapes(messages: list[Message]) -> None:
    """Every ``response.*`` message in the seed's nested shape, with its timestamp."""
    for m in messages:
        if m["type"].startswith("response."):
            assert set(m) == {"type", "response"}, m
            assert isinstance(m["response"]["timestamp"], float), m
    for m in of_type(messages, "response.delta"):
        assert isinstance(m["response"]["delta"]["content"], str), m
    for m in of_type(messages, "response.audio"):
        assert isinstance(m["response"]["audio"], str), m


async def heard(engines: Engines, messages: list[Message]) -> str:
    """What the ``response.audio`` messages say: pcm16 at 24 kHz, transcribed at 16 kHz."""
    pcm = b"".join(base64.b64decode(m["response"]["audio"]) for m in of_type(messages, "response.audio"))
    audio = resample_pcm(np.frombuffer(pcm, "<i2"), 24_000, STT_RATE)
    return await engines.stt.transcribe(int16_to_float(audio))


def reported_usage(fake: FakeOpenAI, reply: str) -> dict[str, int]:
    """The usage the fake OpenAI server sent in its last stream (its own formula)."""
    usage = _usage(fake.requests[-1]["messages"], reply)
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}


def usage_of(messages: list[Message]) -> dict[str, int]:
    """The tokens the ``response.done`` says the reply cost."""
    (done,) = of_type(messages, "response.done")
    usage = done["response"]["usage"]
    return {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"]}


async def thread_messages(url: str, thread: str, user: str) -> list[tuple[str, str]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/api/v1/chat/threads/{thread}/messages?user_id={user}") as resp,
    ):
        assert resp.status == 200
        return [(m["role"], m["content"]) for m in (await resp.json())["messages"]]


async def receive_until(ws: aiohttp.ClientWebSocketResponse, kind: str) -> list[Message]:
    got: list[Message] = []
    async with asyncio.timeout(TURN_TIMEOUT_S):
        while not got or got[-1]["type"] != kind:
            got.append(await ws.receive_json())
    return got


# -- the seed's Python client ------------------------------------------------------------------------
async def test_the_seeds_python_client_gets_a_spoken_reply_in_the_seeds_shapes(
    start_server: ServerFactory, fake_openai: FakeOpenAI, shared_engines: Engines, tmp_path: Path
) -> None:
    fake_openai.reply = REPLY
    url = await start_server(agent=openai_agent(fake_openai))
    script = tmp_path / "realtime_client.py"
    script.write_text(seed_source("realtime_client.py", url))

    got = await run_python_client(script, is_done)

    # The greeting, then the answer to the client's session.update: the seed's shape.
    updates = of_type(got, "session.update")
    assert len(updates) == 2, got
    for m in updates:
        assert {"id", "voice", "language"} <= set(m["session"]), m
    assert updates[1]["session"]["language"] == "en"
    # 'alloy' is an OpenAI voice, not one of this server's: said in the seed's error shape,
    # while the rest of the update applied and the session keeps a voice it has.
    (error,) = of_type(got, "error")
    assert set(error) == {"type", "error"} and error["error"]["code"] == "invalid_voice", error
    assert "'alloy'" in error["error"]["message"]
    assert updates[1]["session"]["voice"] == shared_engines.tts.default_voice

    check_response_shapes(got)
    assert "".join(m["response"]["delta"]["content"] for m in of_type(got, "response.delta")) == REPLY
    said = await heard(shared_engines, got)
    assert wer(REPLY, said) <= 0.3, said
    usage = usage_of(got)
    assert usage == reported_usage(fake_openai, REPLY) and min(usage.values()) > 0, usage

    # The conversation is the thread of the user in the path.
    thread = updates[0]["session"]["thread_id"]
    assert await thread_messages(url, thread, "test_user") == [("user", HELLO), ("assistant", REPLY)]
    assert fake_openai.requests[-1]["messages"][-1] == {"role": "user", "content": HELLO}


async def test_the_seeds_full_session_update_reaches_the_agent(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = REPLY
    url = await start_server(agent=openai_agent(fake_openai))
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{url}{REALTIME}/test_user") as ws,
    ):
        greeting = await ws.receive_json(timeout=30)
        assert greeting["type"] == "session.update"
        await ws.send_json(SEED_SESSION_UPDATE)
        answer = await receive_until(ws, "session.update")
        # The seed's ping, answered in its pong shape with the client's own timestamp.
        await ws.send_json({"type": "ping", "ping": {"timestamp": 1234567890.123}})
        assert await ws.receive_json(timeout=30) == {"type": "pong", "timestamp": 1234567890.123}
        await ws.send_json(
            {
                "type": "conversation.item.input",
                "conversation_item_input": {"type": "input_text", "text": HELLO},
            }
        )
        reply = await receive_until(ws, "response.done")

    error, updated = answer
    assert error["type"] == "error" and error["error"]["code"] == "invalid_voice", error
    assert set(error) == {"type", "error"} and set(error["error"]) == {"code", "message"}
    session = updated["session"]
    assert session["voice"] == greeting["session"]["voice"]  # unchanged: 'alloy' is not offered
    assert (session["language"], session["temperature"], session["max_response_output_tokens"]) == (
        "en",
        0.8,
        4096,
    )
    assert session["instructions"] == "You are a helpful AI assistant."
    check_response_shapes(reply)
    assert "".join(m["response"]["delta"]["content"] for m in of_type(reply, "response.delta")) == REPLY
    sent = fake_openai.requests[-1]
    assert (sent["temperature"], sent["max_tokens"]) == (0.8, 4096)
    assert sent["messages"][0] == {"role": "system", "content": "You are a helpful AI assistant."}


async def test_audio_input_in_the_seeds_shape_is_transcribed_and_answered(
    start_server: ServerFactory, fake_openai: FakeOpenAI, shared_engines: Engines
) -> None:
    fake_openai.reply = ANSWER
    url = await start_server(agent=openai_agent(fake_openai))
    pcm, rate = speak(QUESTION)
    assert rate == 24_000  # the seed's pcm16, as OpenAI's Realtime API has it
    audio = base64.b64encode(pcm.astype("<i2").tobytes()).decode()
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{url}{REALTIME}/test_user") as ws,
    ):
        greeting = await ws.receive_json(timeout=30)
        await ws.send_json(
            {
                "type": "conversation.item.input",
                "conversation_item_input": {"type": "input_audio_buffer", "audio": audio},
            }
        )
        got = await receive_until(ws, "response.done")

    check_response_shapes(got)
    assert "".join(m["response"]["delta"]["content"] for m in of_type(got, "response.delta")) == ANSWER
    said = await heard(shared_engines, got)
    assert wer(ANSWER, said) <= 0.3, said
    # What the server heard is what the agent was asked, and the thread keeps both.
    asked = fake_openai.requests[-1]["messages"][-1]["content"]
    assert wer(QUESTION, asked) <= 0.3, asked
    stored = await thread_messages(url, greeting["session"]["thread_id"], "test_user")
    assert stored == [("user", asked), ("assistant", ANSWER)]


# -- auth: the seed's split ----------------------------------------------------------------------------
async def handshake(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    """101 if the WebSocket opened (and greeted in the seed's shape), else the refusal's status."""
    try:
        async with http.ws_connect(url, **kwargs) as ws:
            assert (await ws.receive_json(timeout=30))["type"] == "session.update"
            return 101
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status


async def test_the_user_route_can_be_open_while_the_bare_route_needs_a_bearer_token(
    start_server: ServerFactory, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    split = await start_server(
        agent=openai_agent(fake_openai), auth_jwt_secret=SECRET, realtime_open_user_route=True
    )
    closed = await start_server(agent=openai_agent(fake_openai), auth_jwt_secret=SECRET)
    async with aiohttp.ClientSession() as http:
        # The seed's split: /{user_id} takes no token, the bare route is "Authenticated".
        assert await handshake(http, f"{split}{REALTIME}/test_user") == 101
        assert await handshake(http, f"{split}{REALTIME}") == 401
        assert await handshake(http, f"{split}{REALTIME}", headers=bearer(token("test_user"))) == 101
        # Off (the default), every realtime route needs a token.
        assert await handshake(http, f"{closed}{REALTIME}/test_user") == 401
        assert await handshake(http, f"{closed}{REALTIME}") == 401
        assert await handshake(http, f"{closed}{REALTIME}", headers=bearer(token("test_user"))) == 101
        assert (
            await handshake(http, f"{closed}{REALTIME}/test_user", headers=bearer(token("test_user"))) == 101
        )
        # A token never speaks for someone else.
        assert await handshake(http, f"{closed}{REALTIME}/test_user", headers=bearer(token("eve"))) == 403

    # The seed's own client, which sends no token, works as written on the open user route.
    script = tmp_path / "realtime_client.py"
    script.write_text(seed_source("realtime_client.py", split))
    got = await run_python_client(script, lambda m: m["type"] == "session.update")
    assert got[0]["session"]["id"]


# -- the seed's JavaScript client, in Chromium -------------------------------------------------------------
class SeedPage:
    """The seed's JavaScript client in a page of this server's origin, with what it did recorded."""

    def __init__(self) -> None:
        self.logged: list[ConsoleMessage] = []
        self.errors: list[str] = []
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.console: list[Message] = []

    def __str__(self) -> str:
        console = [m.text[:200] for m in self.logged]
        return f"sent {self.sent}, received {self.received}, page errors {self.errors}, console {console}"

    def on_websocket(self, ws: WebSocket) -> None:
        ws.on("framesent", lambda payload: self.sent.append(json.loads(payload)))
        ws.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    @property
    def logged_received(self) -> list[ConsoleMessage]:
        return [m for m in self.logged if m.text.startswith("Received:") and len(m.args) == 2]

    async def read_console(self) -> None:
        """What the client itself logged with ``console.log('Received:', message)``."""
        self.console = [await m.args[1].json_value() for m in self.logged_received]


async def open_on_origin(page: Page, url: str, html: str) -> None:
    """Show ``html`` as a page of the server's own origin.

    A document fulfilled by ``page.route`` has no address space of its own, so Chromium's Local
    Network Access checks take it for a public page and refuse its WebSocket to 127.0.0.1
    (net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS). Written into a document the server really
    served, it is a loopback page like any the app would serve.
    """
    await page.goto(f"{url}{REALTIME}/health")
    await page.set_content(html)


async def run_js_client(
    playwright: Playwright, mic: Path, url: str, script: str, until: Callable[[list[Message]], bool]
) -> SeedPage:
    record = SeedPage()
    html = f"<!doctype html><html><head><meta charset='utf-8'></head><body><script>\n{script}\n</script></body></html>"
    async with chromium(playwright, mic) as context:
        page = await context.new_page()
        page.on("console", lambda message: record.logged.append(message))
        page.on("pageerror", lambda err: record.errors.append(f"{err.name}: {err.message}"))
        page.on("websocket", record.on_websocket)
        await open_on_origin(page, url, html)
        try:
            async with asyncio.timeout(TURN_TIMEOUT_S):
                # The client logs each message after the frame is seen: wait for both.
                while not (until(record.received) and len(record.logged_received) >= len(record.received)):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"the page did not get what the test waited for: {record}") from None
        await record.read_console()  # its handles are only readable while the page lives
    return record


def send_moved_into_onopen(source: str) -> str:
    """The one change the seed's client needs: its text input is sent at the end of ``onopen``."""
    text_send = source[source.index("// Send text input") :]
    onopen_end = "  }));\n};\n"  # the end of the session.update send, and of onopen
    assert text_send.rstrip().endswith("}));") and source.count(onopen_end) == 1
    moved = "".join("  " + line for line in text_send.rstrip().splitlines(keepends=True)) + "\n"
    return source.replace(text_send, "").replace(onopen_end, onopen_end[:-3] + moved + "};\n")


async def test_the_seeds_javascript_client_in_chromium(
    pw: Playwright,  # noqa: F811
    start_server: ServerFactory,
    fake_openai: FakeOpenAI,
    silence_wav: Path,  # noqa: F811
) -> None:
    fake_openai.reply = REPLY
    url = await start_server(agent=openai_agent(fake_openai))
    source = seed_source("realtime_client.js", url)

    # As written: ws.send() runs before the socket is open, which throws (InvalidStateError,
    # as the WebSocket standard requires), so the script stops there. onopen still runs: its
    # session.update is sent and answered; the text input never leaves the page.
    as_written = await run_js_client(
        pw, silence_wav, url, source, lambda got: len(of_type(got, "session.update")) == 2
    )
    assert len(as_written.errors) == 1 and as_written.errors[0].startswith("InvalidStateError"), (
        as_written.errors
    )
    assert "CONNECTING" in as_written.errors[0]
    assert as_written.sent == [
        {"type": "session.update", "session_update": {"voice": "alloy", "language": "en"}}
    ]
    logged = as_written.console
    assert [m["type"] for m in logged] == ["session.update", "error", "session.update"], logged
    assert logged[1]["error"]["code"] == "invalid_voice"
    assert not fake_openai.requests

    # Moved into onopen, the same input is answered, in the seed's shapes.
    fixed = await run_js_client(
        pw, silence_wav, url, send_moved_into_onopen(source), lambda got: bool(of_type(got, "response.done"))
    )
    assert fixed.errors == []
    assert [m["type"] for m in fixed.sent] == ["session.update", "conversation.item.input"]
    logged = fixed.console
    assert logged == fixed.received  # the client logged every message it was sent
    check_response_shapes(logged)
    assert "".join(m["response"]["delta"]["content"] for m in of_type(logged, "response.delta")) == REPLY
    assert of_type(logged, "response.audio")
    assert usage_of(logged) == reported_usage(fake_openai, REPLY)
    assert fake_openai.requests[-1]["messages"][-1] == {"role": "user", "content": HELLO}


# The seed's clients as the seed wrote them (a formatter once rewrote the Python one: never again).
SEED_FILES_SHA256 = {
    "realtime_client.py": "9bdb5d8d93481774b6e34e5ec7f6875290e3c4d3abaa5179da0aa9ed9a694e5e",
    "realtime_client.js": "aeb6e7c3d9b3fa0f885031ff53e3783bb32b30e9aae39b5843ec0c4a3400d262",
}


def test_the_seed_clients_are_the_seeds_code_blocks_verbatim() -> None:
    seed_text = Path("/work/shared/seeds/002_e4b6a90b70a50587.txt")
    for name, digest in SEED_FILES_SHA256.items():
        copy = (SEED / name).read_text()
        assert SEED_HOST in copy
        assert hashlib.sha256(copy.encode()).hexdigest() == digest, name
        if seed_text.exists():  # the seeds folder is not part of the repository
            fence = "python" if name.endswith(".py") else "javascript"
            assert f"```{fence}\n{copy}```" in seed_text.read_text(), name
