"""NAT traversal: a real coturn, started by turn/start with the shipped config, relays whole calls
from relay-only callers, and honours or refuses the time-limited TURN credentials rtcvoice mints.

Everything stays on this machine: coturn listens on this machine's own non-loopback address
(WebRTC stacks gather no candidates on 127.0.0.1) and relays only to that address.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioice import stun, turn
from aioice.ice import get_host_addresses
from aiortc import RTCIceServer, RTCPeerConnection
from conftest import BASE_SETTINGS, ServerFactory, echo_agent
from speech import speak, wer

from rtcvoice.audio import STT_RATE, int16_to_float, resample_pcm
from rtcvoice.client import CallError, VoiceCallClient
from rtcvoice.engines import Engines
from rtcvoice.server import create_app
from rtcvoice.server.turn import turn_rest_credentials
from rtcvoice.transports.ice import rtc_configuration, turn_allocation_error

ROOT = Path(__file__).resolve().parents[1]
API = "/api/v1/voice"
SECRET = "the-secret-coturn-and-rtcvoice-share"
QUESTION = "What is the capital of France?"


@dataclass
class Coturn:
    ip: str
    port: int
    tls_port: int
    relay_ports: range
    ca_file: Path
    log: Path

    def urls(self, *kinds: str) -> str:
        by_kind = {
            "stun": f"stun:{self.ip}:{self.port}",
            "udp": f"turn:{self.ip}:{self.port}?transport=udp",
            "tcp": f"turn:{self.ip}:{self.port}?transport=tcp",
            "tls": f"turns:{self.ip}:{self.tls_port}",
        }
        return ",".join(by_kind[k] for k in kinds)

    def server(self, kind: str, username: str, password: str) -> RTCIceServer:
        return RTCIceServer(urls=self.urls(kind), username=username, credential=password)


def local_ipv4() -> str:
    # The first address aioice itself gathers host candidates on, so calls can really use it.
    addresses = get_host_addresses(use_ipv4=True, use_ipv6=False)
    if not addresses:
        pytest.fail("no non-loopback IPv4 address on this machine: WebRTC media cannot flow")
    return addresses[0]


def free_port(ip: str) -> int:
    """A port free for both UDP and TCP on ``ip`` (coturn listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((ip, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((ip, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def self_signed_certificate(ip: str, directory: Path) -> tuple[Path, Path]:
    """A certificate for ``ip`` that is its own CA, so a client can be told to trust it alone."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rtcvoice test TURN")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "turn-cert.pem", directory / "turn-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@pytest.fixture(scope="module")
async def coturn(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Coturn]:
    """coturn in the foreground via turn/start on free ports; stopped (not left running) after."""
    if shutil.which("turnserver") is None:
        pytest.fail("coturn's turnserver is not installed: apt-get install coturn (scripts/test does)")
    state = tmp_path_factory.mktemp("coturn")
    ip = local_ipv4()
    cert, key = self_signed_certificate(ip, state)
    base = random.randrange(50_000, 59_000, 100)
    server = Coturn(
        ip=ip,
        port=free_port(ip),
        tls_port=free_port(ip),
        relay_ports=range(base, base + 100),
        ca_file=cert,
        log=state / "turnserver.log",
    )
    env = {
        **os.environ,
        "TURN_SECRET": SECRET,
        "TURN_REALM": "rtcvoice.test",
        "TURN_LISTEN_IP": ip,
        "TURN_PORT": str(server.port),
        "TURN_TLS_PORT": str(server.tls_port),
        "TURN_CERT": str(cert),
        "TURN_PKEY": str(key),
        "TURN_MIN_PORT": str(server.relay_ports.start),
        "TURN_MAX_PORT": str(server.relay_ports.stop - 1),
        "TURN_STATE_DIR": str(state),
    }
    with server.log.open("w") as log:
        proc = subprocess.Popen([str(ROOT / "turn" / "start")], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        username, password = turn_rest_credentials(SECRET, "readiness", 60)
        deadline = time.monotonic() + 15
        while await turn_allocation_error(server.server("udp", username, password), timeout=1) is not None:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"coturn did not start:\n{server.log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)


# -- helpers ------------------------------------------------------------------------------------
async def live_sessions(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{url}{API}/status") as resp:
        return int((await resp.json())["sessions"])


async def until_no_sessions(url: str, within: float = 20.0) -> None:
    """Wait (bounded) for the server to have closed every session on its own."""
    deadline = time.monotonic() + within
    while await live_sessions(url):
        assert time.monotonic() < deadline, "the server kept the session open"
        await asyncio.sleep(0.1)


def turn_entry(started: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in started["ice_servers"] if "username" in s)


async def heard(engines: Engines, client: VoiceCallClient) -> str:
    pcm = resample_pcm(client.received.pcm(), 48_000, STT_RATE)
    return await engines.stt.transcribe(int16_to_float(pcm))


# -- credentials --------------------------------------------------------------------------------
async def test_turn_rest_credentials_are_the_ones_coturn_verifies(coturn: Coturn) -> None:
    username, password = turn_rest_credentials(SECRET, "alice", 3600, now=1_700_000_000)
    assert username == "1700003600:alice"
    expected = base64.b64encode(hmac.new(SECRET.encode(), username.encode(), hashlib.sha1).digest()).decode()
    assert password == expected

    username, password = turn_rest_credentials(SECRET, "alice", 60)
    assert await turn_allocation_error(coturn.server("udp", username, password)) is None
    # The password is bound to the username: it does not carry over to another user.
    other, _ = turn_rest_credentials(SECRET, "mallory", 60)
    assert await turn_allocation_error(coturn.server("udp", other, password)) == "401 Unauthorized"


async def test_session_start_gives_each_session_its_own_expiring_turn_credentials_not_the_static_ones(
    start_server: ServerFactory,
) -> None:
    ip = local_ipv4()  # never contacted: session/start only hands the URLs out
    urls = [
        f"stun:{ip}:3478",
        f"turn:{ip}:3478?transport=udp",
        f"turn:{ip}:3478?transport=tcp",
        f"turns:{ip}:5349",
    ]
    url = await start_server(
        agent=echo_agent(),
        ice_servers=",".join(urls),
        turn_secret=SECRET,
        turn_credential_lifetime_s=900,
        turn_username="static-user",
        turn_password="static-password",
    )
    bodies = []
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            before = time.time()
            async with http.post(f"{url}{API}/session/start", json={}) as resp:
                raw = await resp.text()
            after = time.time()
            assert "static-user" not in raw and "static-password" not in raw
            bodies.append((json.loads(raw), before, after))

    usernames = []
    for body, before, after in bodies:
        stun_entry, turn = body["ice_servers"]
        assert stun_entry == {"urls": urls[:1]}  # STUN needs no credentials: none are attached
        assert turn["urls"] == urls[1:]
        expiry, user = turn["username"].split(":")
        assert int(before + 900) <= int(expiry) <= int(after + 900)
        assert body["session_id"] not in user  # the session id is a capability; TURN sees a digest
        digest = hmac.new(SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
        assert turn["credential"] == base64.b64encode(digest).decode()
        usernames.append(turn["username"])
    assert usernames[0] != usernames[1]

    # Without a secret, the static credentials are what clients get.
    url = await start_server(
        agent=echo_agent(), ice_servers=urls[1], turn_username="static-user", turn_password="static-password"
    )
    async with aiohttp.ClientSession() as http, http.post(f"{url}{API}/session/start", json={}) as resp:
        body = await resp.json()
    assert body["ice_servers"] == [
        {"urls": [urls[1]], "username": "static-user", "credential": "static-password"}
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ice_servers": "https://turn.example.com"}, "not a STUN/TURN URL"),
        ({"ice_servers": "turn:turn.example.com?transport=sctp"}, "transport=udp or transport=tcp"),
        ({"ice_servers": "turn:turn.example.com"}, "TURN URLs need credentials"),
        ({"ice_transport_policy": "relay"}, "needs a turn: or turns: URL"),
    ],
)
def test_ice_settings_that_cannot_work_stop_the_server_before_it_serves(
    shared_engines: Engines, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        create_app(BASE_SETTINGS.replace(**overrides), engines=shared_engines)


# -- relay-only calls ---------------------------------------------------------------------------
async def test_relay_only_call_holds_a_spoken_exchange_through_coturn(
    coturn: Coturn, start_server: ServerFactory, shared_engines: Engines
) -> None:
    url = await start_server(agent=echo_agent(), ice_servers=coturn.urls("stun", "udp"), turn_secret=SECRET)
    client = VoiceCallClient(url, relay_only=True)
    try:
        await client.connect()
        offer = client.pc.localDescription.sdp if client.pc else ""
        client.play(*speak(QUESTION))
        end = await client.wait_count("end_of_response", 1, 60)
        await asyncio.sleep(0.4)  # the last frames are in flight behind the event
        pair = client.selected_candidate_pair()
    finally:
        await client.close()

    # The caller offered nothing but its relay, and the call ran over it.
    assert "typ relay" in offer and "typ host" not in offer and "typ srflx" not in offer
    assert pair is not None and pair.local_type == "relay", pair
    assert pair.local_address[0] == coturn.ip and pair.local_address[1] in coturn.relay_ports
    assert client.candidate_pair == pair

    final = client.of_type("final_transcript")
    assert len(final) == 1 and wer(QUESTION, final[0]["text"]) <= 0.25, final
    assert end["interrupted"] is False and end["text"] == f"You said: {final[0]['text']}"
    assert wer(end["text"], await heard(shared_engines, client)) <= 0.35


async def test_relay_only_call_reaches_turn_over_tls(
    coturn: Coturn, start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caller trusts coturn's self-signed certificate, and only it, as a browser trusts a CA.
    monkeypatch.setenv("SSL_CERT_FILE", str(coturn.ca_file))
    url = await start_server(
        agent=echo_agent(), ice_servers=coturn.urls("udp", "tcp", "tls"), turn_secret=SECRET
    )
    client = VoiceCallClient(url, relay_only=True, turn_transport="tls")
    try:
        await client.connect()
        client.send({"type": "text_message", "content": "Hello over TLS."})
        end = await client.wait_count("end_of_response", 1, 60)
        await asyncio.sleep(0.4)
    finally:
        await client.close()
    assert client.turn_server is not None and client.turn_server.urls == coturn.urls("tls")
    assert client.candidate_pair is not None and client.candidate_pair.local_type == "relay"
    assert end["text"] == "You said: Hello over TLS."
    assert client.received.first_sound_after(0.0) is not None  # the spoken reply came back


async def test_server_peer_can_be_relay_only_too(coturn: Coturn, start_server: ServerFactory) -> None:
    url = await start_server(
        agent=echo_agent(), ice_servers=coturn.urls("udp"), turn_secret=SECRET, ice_transport_policy="relay"
    )
    client = VoiceCallClient(url, relay_only=True)
    try:
        await client.connect()
        client.send({"type": "text_message", "content": "Relay to relay."})
        end = await client.wait_count("end_of_response", 1, 60)
    finally:
        await client.close()
    assert end["text"] == "You said: Relay to relay."
    pair = client.candidate_pair
    assert pair is not None and (pair.local_type, pair.remote_type) == ("relay", "relay")
    assert pair.remote_address[1] in coturn.relay_ports


# -- refused credentials ------------------------------------------------------------------------
async def test_forged_turn_credentials_are_refused_and_the_relay_only_call_fails_cleanly(
    coturn: Coturn, start_server: ServerFactory
) -> None:
    # A server whose secret is not coturn's signs credentials coturn must not honour.
    url = await start_server(
        agent=echo_agent(), ice_servers=coturn.urls("udp"), turn_secret="not-coturns-secret"
    )
    client = VoiceCallClient(url, relay_only=True)
    try:
        started = await client.start_session()
        turn = turn_entry(started)
        forged = coturn.server("udp", turn["username"], turn["credential"])
        assert await turn_allocation_error(forged) == "401 Unauthorized"
        with pytest.raises(CallError, match=r"refused the credentials \(401 Unauthorized\)"):
            await asyncio.wait_for(client.connect(), 30)  # fails with the reason, never hangs
    finally:
        await client.close()
    assert await live_sessions(url) == 0


async def test_server_ends_a_session_whose_caller_got_no_relay_and_went_silent(
    coturn: Coturn, start_server: ServerFactory
) -> None:
    """Like a browser with iceTransportPolicy relay whose TURN credentials were refused: it still
    sends its offer, with no candidate at all, and never says goodbye."""
    url = await start_server(
        agent=echo_agent(),
        ice_servers=coturn.urls("udp"),
        turn_secret="not-coturns-secret",
        ice_connect_timeout_s=1.0,
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}{API}/session/start", json={}) as resp:
            started = await resp.json()
        turn = turn_entry(started)
        pc = RTCPeerConnection(
            rtc_configuration([coturn.server("udp", turn["username"], turn["credential"])], relay_only=True)
        )
        try:
            pc.addTransceiver("audio")
            pc.createDataChannel("events")
            await pc.setLocalDescription(await pc.createOffer())
            assert "a=candidate:" not in pc.localDescription.sdp
            # Chrome leaves out end-of-candidates, so the server can only give up by its timeout.
            sdp = pc.localDescription.sdp.replace("a=end-of-candidates\r\n", "")
            async with http.post(
                f"{url}{API}/session/{started['session_id']}/offer", json={"sdp": sdp}
            ) as resp:
                assert resp.status == 200, await resp.text()
            await until_no_sessions(url)
        finally:
            await pc.close()


async def test_relay_only_server_with_refused_credentials_fails_the_offer_and_ends_the_session(
    coturn: Coturn, start_server: ServerFactory
) -> None:
    url = await start_server(
        agent=echo_agent(),
        ice_servers=coturn.urls("udp"),
        turn_secret="not-coturns-secret",
        ice_transport_policy="relay",
    )
    client = VoiceCallClient(url)  # the caller may use any path; the server can offer none
    try:
        await client.start_session()
        with pytest.raises(CallError, match="HTTP 503 relay_unavailable"):
            await asyncio.wait_for(client.connect(), 30)
        assert await live_sessions(url) == 0  # ended by the server, before the caller hung up
    finally:
        await client.close()


async def test_turn_credentials_from_session_start_expire_after_their_lifetime(
    coturn: Coturn, start_server: ServerFactory
) -> None:
    url = await start_server(
        agent=echo_agent(), ice_servers=coturn.urls("udp"), turn_secret=SECRET, turn_credential_lifetime_s=1
    )
    client = VoiceCallClient(url, relay_only=True)
    try:
        before = time.time()
        started = await client.start_session()
        after = time.time()
        turn = turn_entry(started)
        expiry = int(turn["username"].split(":")[0])
        assert int(before + 1) <= expiry <= int(after + 1)
        # Signed with coturn's own secret: expiry is the only thing wrong with them once it passes.
        digest = hmac.new(SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
        assert turn["credential"] == base64.b64encode(digest).decode()

        # coturn compares whole seconds: wait until its clock (this machine's) is past the expiry.
        await asyncio.sleep(max(0.0, expiry + 1 - time.time()) + 0.05)
        expired = coturn.server("udp", turn["username"], turn["credential"])
        assert await turn_allocation_error(expired) == "401 Unauthorized"
        with pytest.raises(CallError, match="refused the credentials"):
            await asyncio.wait_for(client.connect(), 30)
    finally:
        await client.close()
    assert await live_sessions(url) == 0


# -- the command line ---------------------------------------------------------------------------
async def test_rtcvoice_call_relay_only_goes_through_turn_over_tcp_and_reports_the_pair(
    coturn: Coturn, start_server: ServerFactory
) -> None:
    good = await start_server(agent=echo_agent(), ice_servers=coturn.urls("udp", "tcp"), turn_secret=SECRET)
    forged = await start_server(agent=echo_agent(), ice_servers=coturn.urls("udp"), turn_secret="forged")

    async def call(server: str, *flags: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "rtcvoice", "call", "--server", server, "--text", "Hi.", "--quiet"]
        return await asyncio.to_thread(
            subprocess.run, [*argv, *flags], capture_output=True, text=True, timeout=120
        )

    ok, refused = await asyncio.gather(
        call(good, "--relay-only", "--turn-transport", "tcp"), call(forged, "--relay-only")
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    summary = json.loads(ok.stdout.splitlines()[-1])
    assert summary["ai_said"] == ["You said: Hi."]
    assert summary["ice"]["local"] == "relay" and summary["ice"]["turn"] == coturn.urls("tcp")

    assert refused.returncode == 1
    assert "refused the credentials (401 Unauthorized)" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_shipped_coturn_config_keeps_the_relay_out_of_private_networks() -> None:
    """turn/turnserver.conf denies every private and special range (checked here by address, and
    by coturn itself in the next test)."""
    denied = []
    for line in (ROOT / "turn" / "turnserver.conf").read_text().splitlines():
        if line.startswith("denied-peer-ip="):
            low, _, high = line.split("=", 1)[1].partition("-")
            denied.append((ipaddress.ip_address(low), ipaddress.ip_address(high or low)))

    def is_denied(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(low.version == ip.version and low <= ip <= high for low, high in denied)  # type: ignore[operator]

    for address in (
        "10.1.2.3",
        "172.20.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "fd00::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
        "2002:a00:1::1",
    ):
        assert is_denied(address), address
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700::1111"):
        assert not is_denied(address), address
    assert "no-multicast-peers" in (ROOT / "turn" / "turnserver.conf").read_text()


async def test_coturn_refuses_to_relay_into_private_networks(coturn: Coturn) -> None:
    """Only the rtcvoice host's own address is let through the deny list (allowed-peer-ip)."""
    username, password = turn_rest_credentials(SECRET, "prober", 60)
    errors: list[Exception] = []

    class Probe(asyncio.DatagramProtocol):
        def error_received(self, exc: Exception) -> None:
            errors.append(exc)

    transport, _ = await turn.create_turn_endpoint(
        Probe, server_addr=(coturn.ip, coturn.port), username=username, password=password
    )
    try:
        # coturn answers the channel binding with 403 and relays nothing: no packet leaves.
        private = [a for a in ("169.254.169.254", "10.255.255.254", "192.168.255.254") if a != coturn.ip]
        for address in private:
            transport.sendto(b"probe", (address, 9))
        deadline = time.monotonic() + 10
        while len(errors) < len(private) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        transport.close()
    assert len(errors) == len(private), errors
    assert all(isinstance(e, stun.TransactionFailed) and e.response.error_code == 403 for e in errors), errors
