"""Bearer-JWT auth: who may start, join, end and read what."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import aiohttp
import jwt
import pytest
from conftest import ServerFactory, echo_agent
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SECRET = "a-long-test-secret-for-hs256-signing!"
API = "/api/v1/voice"


def token(user: str, *, secret: str = SECRET, expires_in: float = 300, **claims: Any) -> str:
    payload = {"sub": user, "exp": int(time.time() + expires_in), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def hs256_with_key_bytes(payload: dict[str, Any], key: str) -> str:
    """The classic key-confusion forgery: an HS256 token "signed" with the server's public key."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(payload).encode())
    )
    signature = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, **kw) as resp:
        return resp.status, await resp.json()


@pytest.fixture
async def server(start_server: ServerFactory) -> str:
    return await start_server(agent=echo_agent(), auth_jwt_secret=SECRET)


async def test_requests_without_a_valid_token_get_401_and_create_nothing(server: str) -> None:
    alice = bearer(token("alice"))
    async with aiohttp.ClientSession() as http:
        for headers, code in [
            ({}, "unauthorized"),
            (bearer(token("alice", expires_in=-10)), "token_expired"),
            (bearer(token("alice", secret="some-other-secret-of-enough-length")), "invalid_token"),
            (bearer("not.a.jwt"), "invalid_token"),
            (bearer(jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")), "invalid_token"),  # no expiry
        ]:
            status, body = await call(http, "POST", f"{server}{API}/session/start", json={}, headers=headers)
            assert (status, body["error"]["code"]) == (401, code), body
        async with http.post(f"{server}{API}/session/start", headers={}) as resp:
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        # Nothing was created by any of those.
        status, body = await call(http, "GET", f"{server}{API}/status", headers=alice)
        assert status == 200 and body["sessions"] == 0
        status, body = await call(http, "GET", f"{server}/api/v1/chat/threads", headers=alice)
        assert status == 200 and body["threads"] == []
        # Probes need no token.
        status, _ = await call(http, "GET", f"{server}{API}/health")
        assert status == 200


async def test_a_session_and_its_thread_belong_to_their_user(server: str) -> None:
    alice, bob = bearer(token("alice")), bearer(token("bob"))
    async with aiohttp.ClientSession() as http:
        status, started = await call(http, "POST", f"{server}{API}/session/start", json={}, headers=alice)
        assert status == 200
        sid, thread = started["session_id"], started["thread_id"]
        offer = {"sdp": "v=0\r\n", "type": "offer"}
        for method, path, body in [
            ("POST", f"{API}/session/{sid}/offer", offer),
            ("POST", f"{API}/session/end", {"session_id": sid}),
            ("GET", f"/api/v1/chat/threads/{thread}/messages", None),
        ]:
            status, err = await call(http, method, f"{server}{path}", json=body, headers=bob)
            assert status == 404, (path, err)
        # Bob cannot continue Alice's thread in a call of his own either.
        status, err = await call(
            http, "POST", f"{server}{API}/session/start", json={"thread_id": thread}, headers=bob
        )
        assert (status, err["error"]["code"]) == (404, "thread_not_found")
        # Nor join her session's WebSocket with his token in the query.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{server}{API}/session/{sid}/ws?token={token('bob')}")
        assert refused.value.status == 404
        # Bob sees no threads; Alice sees hers, and can end her session.
        _, listed = await call(http, "GET", f"{server}/api/v1/chat/threads", headers=bob)
        assert listed["threads"] == []
        _, listed = await call(http, "GET", f"{server}/api/v1/chat/threads", headers=alice)
        assert [t["id"] for t in listed["threads"]] == [thread]
        status, _ = await call(
            http, "POST", f"{server}{API}/session/end", json={"session_id": sid}, headers=alice
        )
        assert status == 200


async def test_websocket_routes_take_the_token_from_the_query(server: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server}/api/v1/streaming/realtime") as resp:
            assert resp.status == 401
        async with http.ws_connect(f"{server}/api/v1/streaming/realtime?token={token('carol')}") as ws:
            first = await ws.receive_json(timeout=10)
            assert first["type"] == "session.update"
            thread = first["session"]["thread_id"]
        _, listed = await call(http, "GET", f"{server}/api/v1/chat/threads", headers=bearer(token("carol")))
        assert [t["id"] for t in listed["threads"]] == [thread]


async def test_public_key_tokens_are_verified_with_the_configured_key(start_server: ServerFactory) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    url = await start_server(agent=echo_agent(), auth_jwt_public_key=public_pem, auth_jwt_audience="voice")
    good = jwt.encode({"sub": "dana", "aud": "voice", "exp": int(time.time()) + 60}, key, algorithm="RS256")
    wrong_audience = jwt.encode(
        {"sub": "dana", "aud": "other", "exp": int(time.time()) + 60}, key, algorithm="RS256"
    )
    forged = hs256_with_key_bytes({"sub": "dana", "aud": "voice", "exp": int(time.time()) + 60}, public_pem)
    async with aiohttp.ClientSession() as http:
        status, _ = await call(http, "POST", f"{url}{API}/session/start", json={}, headers=bearer(good))
        assert status == 200
        for bad in (wrong_audience, forged):
            status, _ = await call(http, "POST", f"{url}{API}/session/start", json={}, headers=bearer(bad))
            assert status == 401
