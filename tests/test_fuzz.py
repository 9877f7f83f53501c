"""Property-based fuzzing of what clients control: signaling requests and call events.

Thousands of generated inputs; the properties: no 5xx, no exception escapes, and the server (or
the conversation) still works afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BASE_SETTINGS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtcvoice.conversation import ClientEvent, Conversation, EventError, parse_client_event
from rtcvoice.engines import Engines, load_engines
from rtcvoice.engines.agents.echo import EchoAgent
from rtcvoice.engines.tts.tone import ToneTts
from rtcvoice.server import create_app

API = "/api/v1/voice"
SDP_LINES = [
    "v=0",
    "o=- 1 1 IN IP4 0.0.0.0",
    "s=-",
    "t=0 0",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111",
    "m=video 9 UDP/TLS/RTP/SAVPF 96",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    "c=IN IP4 0.0.0.0",
    "a=rtpmap:111 opus/48000/2",
    "a=rtpmap:9 G722/8000",
    "a=mid:0",
    "a=sendrecv",
    "a=ice-ufrag:abcd",
    "a=ice-pwd:abcdefghijklmnopqrstuvwx",
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
    "a=setup:actpass",
    "a=rtcp-mux",
    "a=group:BUNDLE 0",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
sdp_like = st.lists(st.sampled_from(SDP_LINES) | st.text(max_size=30), max_size=25).map("\r\n".join)
offer_bodies = (
    st.binary(max_size=400)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {"sdp": sdp_like, "type": st.sampled_from(["offer", "answer", "", "pranswer"])}
    ).map(lambda v: json.dumps(v).encode())
)
client_events = (
    st.binary(max_size=200)
    | st.text(max_size=200)
    | json_values.map(json.dumps)
    | st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                ["text_message", "interrupt", "session.update", "ping", "set_thread", "end_of_input", "x"]
            )
        },
        optional={
            "content": json_values,
            "voice": json_values,
            "speed": json_values,
            "instructions": json_values,
            "language": json_values,
            "thread_id": json_values,
            "session": json_values,
        },
    ).map(json.dumps)
)


class ServerThread:
    """A real server on its own event loop in a thread, so hypothesis can drive it synchronously."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._tmp = tmp
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        from aiohttp import web

        settings_ = BASE_SETTINGS.replace(
            tts="tone", max_sessions=100_000, session_start_timeout_s=0.5, db_path=str(self._tmp / "fuzz.db")
        )
        engines = await load_engines(settings_, warm=False)  # no media reaches STT here
        runner = web.AppRunner(create_app(settings_, engines=engines))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()
        await engines.aclose()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(60), "the fuzz server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            raw = err.read()
            return err.code, json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(tmp_path_factory.mktemp("fuzz")) as server:
        yield server


def assert_clean(status: int, body: Any) -> None:
    assert status < 500, (status, body)
    if status >= 400:
        assert isinstance(body, dict) and set(body["error"]) == {"code", "message"}, body


FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(body=offer_bodies)
def test_fuzzed_offers_get_4xx_not_5xx(fuzz_server: ServerThread, body: bytes) -> None:
    status, started = fuzz_server.request("POST", f"{API}/session/start", b"{}")
    assert status == 200
    status, answer = fuzz_server.request("POST", f"{API}/session/{started['session_id']}/offer", body)
    assert_clean(status, answer)
    fuzz_server.request(
        "POST", f"{API}/session/end", json.dumps({"session_id": started["session_id"]}).encode()
    )


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.sampled_from(
        [
            f"{API}/session/start",
            f"{API}/session/end",
            f"{API}/status",
            f"{API}/voices",
            f"{API}/process-transcript",
            "/api/v1/chat/threads",
            "/api/v1/chat/threads/x/messages",
            f"{API}/session/x/offer",
        ]
    )
    | st.text(alphabet="abcdefghij/._-%~0123456789", max_size=40).map(lambda p: "/api/v1/" + p),
    body=st.none() | st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_fuzzed_requests_on_every_route_get_no_5xx(
    fuzz_server: ServerThread, method: str, path: str, body: bytes | None
) -> None:
    if path.endswith("process-transcript") and body is not None and b"transcript" in body:
        body = b"{}"  # a valid transcript would ask the agent: that is the call tests' business
    status, answer = fuzz_server.request(method, path, body if method != "GET" else None)
    assert_clean(status, answer)


def test_the_fuzzed_server_is_healthy_afterwards(fuzz_server: ServerThread) -> None:
    status, body = fuzz_server.request("GET", f"{API}/health")
    assert status == 200 and body["status"] == "healthy"
    status, body = fuzz_server.request("POST", f"{API}/session/start", b"{}")
    assert status == 200 and body["session_id"]


@settings(max_examples=3000, deadline=None)
@given(raw=client_events)
def test_fuzzed_client_events_parse_or_fail_with_a_clear_error(raw: str | bytes) -> None:
    try:
        event = parse_client_event(raw)
    except EventError as exc:
        assert exc.code and exc.message
    else:
        assert isinstance(event, ClientEvent) and event.type in (
            "text_message",
            "interrupt",
            "session.update",
            "ping",
            "set_thread",
            "end_of_input",
        )


class Collect:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)


@pytest.fixture(scope="module")
def fuzzed_conversation(
    shared_engines: Engines,
) -> Iterator[tuple[asyncio.AbstractEventLoop, Conversation, Collect]]:
    """One call that every fuzzed event goes to, on a private loop that hypothesis can drive."""
    from test_conversation import InstantSink

    loop = asyncio.new_event_loop()
    engines = dataclasses.replace(shared_engines, agent=EchoAgent(), tts=ToneTts())
    collect = Collect()
    conv = Conversation(
        session_id="fuzz",
        settings=BASE_SETTINGS,
        engines=engines,
        vad=engines.vad.stream(),
        sink=InstantSink(),
        send=collect,
        executor=engines.audio_executor,
    )
    yield loop, conv, collect
    loop.run_until_complete(conv.aclose())
    loop.close()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=client_events)
def test_fuzzed_events_never_break_the_call(
    fuzzed_conversation: tuple[asyncio.AbstractEventLoop, Conversation, Collect], raw: str | bytes
) -> None:
    loop, conv, _collect = fuzzed_conversation
    loop.run_until_complete(conv.handle_client_message(raw))  # must not raise


def test_the_fuzzed_call_still_answers(
    fuzzed_conversation: tuple[asyncio.AbstractEventLoop, Conversation, Collect],
) -> None:
    loop, conv, collect = fuzzed_conversation

    async def ask() -> dict[str, Any]:
        conv.config.speed = 1.0
        await conv.handle_client_message(json.dumps({"type": "text_message", "content": "Still there?"}))
        async with asyncio.timeout(20):
            while True:
                ends = [
                    e
                    for e in collect.events
                    if e["type"] == "end_of_response" and e.get("text", "").endswith("Still there?")
                ]
                if ends:
                    return ends[-1]
                await asyncio.sleep(0.02)

    assert loop.run_until_complete(ask())["interrupted"] is False
    assert not [e for e in collect.events if e["type"] == "error" and e["code"] == "internal_error"]
