"""Signaling input from clients: every mistake gets a 4xx JSON error, and the server keeps serving."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from conftest import ServerFactory, echo_agent

API = "/api/v1/voice"
VIDEO_ONLY_SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:96 VP8/90000\r\n"
AUDIO_GARBAGE_SDP = "v=0\r\nm=audio this is not sdp\r\n\x00\x01 nonsense"


def offer_body(sdp: str) -> bytes:
    return json.dumps({"sdp": sdp, "type": "offer"}).encode()


async def request(
    http: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, **kw) as resp:
        assert resp.content_type == "application/json", (resp.status, await resp.text())
        return resp.status, await resp.json()


async def new_session(http: aiohttp.ClientSession, url: str) -> str:
    status, body = await request(http, "POST", f"{url}{API}/session/start", json={})
    assert status == 200
    return str(body["session_id"])


@pytest.fixture
async def server(start_server: ServerFactory) -> str:
    return await start_server(agent=echo_agent())


async def test_status_health_and_voices_describe_the_server(server: str) -> None:
    async with aiohttp.ClientSession() as http:
        status, body = await request(http, "GET", f"{server}{API}/status")
        assert status == 200 and body["engines"] == {"stt": "whisper", "agent": "echo", "tts": "hibari"}
        status, body = await request(http, "GET", f"{server}{API}/health")
        assert status == 200 and body["status"] == "healthy"
        status, body = await request(http, "GET", f"{server}{API}/voices")
        assert (
            status == 200 and any(v["id"] == "heart" for v in body["voices"]) and body["default"] == "heart"
        )


async def test_session_start_returns_an_id_and_no_ice_servers_by_default(server: str) -> None:
    async with aiohttp.ClientSession() as http:
        status, body = await request(http, "POST", f"{server}{API}/session/start")
    assert status == 200
    assert len(body["session_id"]) == 32
    assert body["ice_servers"] == []  # offline by default: no STUN server is contacted
    assert body["offer_url"] == f"{API}/session/{body['session_id']}/offer"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2, 3]", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b'{"type": "offer"}', 400, "invalid_sdp"),
        (b'{"sdp": 12, "type": "offer"}', 400, "invalid_sdp"),
        (b'{"sdp": "hello", "type": "offer"}', 400, "invalid_sdp"),
        (b'{"sdp": "v=0\\r\\n", "type": "answer"}', 400, "invalid_sdp"),
        (offer_body(VIDEO_ONLY_SDP), 400, "invalid_sdp"),
        (offer_body(AUDIO_GARBAGE_SDP), 400, "invalid_sdp"),
        (b'{"sdp": "v=0' + b"a" * 70_000 + b'", "type": "offer"}', 413, "sdp_too_large"),
        (b'{"sdp": "' + b"a" * 300_000 + b'"}', 413, "request_too_large"),
    ],
)
async def test_bad_offers_get_a_clear_4xx(server: str, body: bytes, status: int, code: str) -> None:
    async with aiohttp.ClientSession() as http:
        sid = await new_session(http, server)
        got, err = await request(http, "POST", f"{server}{API}/session/{sid}/offer", data=body)
        assert (got, err["error"]["code"]) == (status, code), err
        assert err["error"]["message"]
        # The server still serves.
        ok, _ = await request(http, "GET", f"{server}{API}/status")
        assert ok == 200


async def test_unknown_sessions_and_bad_requests_are_4xx(server: str) -> None:
    async with aiohttp.ClientSession() as http:
        status, err = await request(
            http, "POST", f"{server}{API}/session/nope/offer", json={"sdp": "v=0", "type": "offer"}
        )
        assert (status, err["error"]["code"]) == (404, "session_not_found")
        status, err = await request(http, "POST", f"{server}{API}/session/end", json={"session_id": "nope"})
        assert (status, err["error"]["code"]) == (404, "session_not_found")
        status, err = await request(http, "POST", f"{server}{API}/session/end", json={})
        assert (status, err["error"]["code"]) == (400, "invalid_field")
        status, err = await request(http, "GET", f"{server}{API}/session/start")
        assert (status, err["error"]["code"]) == (405, "method_not_allowed")
        status, err = await request(http, "GET", f"{server}/api/v1/nothing-here")
        assert (status, err["error"]["code"]) == (404, "not_found")
        status, err = await request(http, "POST", f"{server}{API}/session/start", json={"voice": "nobody"})
        assert (status, err["error"]["code"]) == (400, "invalid_voice")
        status, err = await request(http, "POST", f"{server}{API}/session/start", json={"thread_id": 5})
        assert (status, err["error"]["code"]) == (400, "invalid_field")


async def test_a_bad_offer_ends_its_session(server: str) -> None:
    async with aiohttp.ClientSession() as http:
        sid = await new_session(http, server)
        await request(http, "POST", f"{server}{API}/session/{sid}/offer", json={"sdp": "garbage"})
        # Already over: ending it again is no error, and says why it ended.
        status, ended = await request(http, "POST", f"{server}{API}/session/end", json={"session_id": sid})
        assert status == 200 and ended["reason"] == "bad_offer"
        status, _ = await request(
            http, "POST", f"{server}{API}/session/end", json={"session_id": "never-was"}
        )
        assert status == 404
        _, body = await request(http, "GET", f"{server}{API}/status")
        assert body["sessions"] == 0


async def test_session_limit_answers_503_with_retry_after(start_server: ServerFactory) -> None:
    url = await start_server(agent=echo_agent(), max_sessions=2)
    async with aiohttp.ClientSession() as http:
        await new_session(http, url)
        await new_session(http, url)
        async with http.post(f"{url}{API}/session/start") as resp:
            assert resp.status == 503 and resp.headers["Retry-After"]
            assert (await resp.json())["error"]["code"] == "too_many_sessions"


async def test_a_session_never_offered_expires(start_server: ServerFactory) -> None:
    import asyncio

    url = await start_server(agent=echo_agent(), session_start_timeout_s=0.3)
    async with aiohttp.ClientSession() as http:
        sid = await new_session(http, url)
        await asyncio.sleep(0.6)
        status, err = await request(
            http, "POST", f"{url}{API}/session/{sid}/offer", json={"sdp": "v=0", "type": "offer"}
        )
        assert (status, err["error"]["code"]) == (404, "session_not_found")
