"""The server under hostile input, engine faults, vanished peers, shutdown and many calls."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from conftest import BASE_SETTINGS, ServerFactory, echo_agent, openai_agent, serve_process
from fake_openai import FakeOpenAI
from speech import speak
from test_conversation import make, of, talk, until

from rtcvoice.audio import STT_RATE, resample_pcm
from rtcvoice.client import VoiceCallClient
from rtcvoice.engines import Engines
from rtcvoice.engines.base import FloatAudio, TtsError
from rtcvoice.store.sqlite import SqliteStore

API = "/api/v1/voice"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


# -- engine faults ----------------------------------------------------------------------------------
async def test_an_agent_that_hangs_times_out_with_an_apology_and_the_call_goes_on(
    shared_engines: Engines, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fault = "hang"
    conv, events, sink = make(shared_engines, openai_agent(fake_openai, llm_timeout_s=1.0), llm_timeout_s=1.0)
    try:
        await conv.handle_client_message('{"type": "text_message", "content": "Hello?"}')
        await until(events, "end_of_response", timeout=15)
        assert [e["code"] for e in of(events, "error")] in (["agent_timeout"], ["agent_error"])
        assert sink.written > 0  # the apology was spoken
        fake_openai.fault = None
        fake_openai.reply = "Back again."
        await conv.handle_client_message('{"type": "text_message", "content": "Hello again?"}')
        await until(events, "end_of_response", 2)
    finally:
        await conv.aclose()
    assert of(events, "end_of_response")[1]["text"] == "Back again."


async def test_an_agent_streaming_garbage_is_an_error_not_a_crash(
    shared_engines: Engines, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fault = "garbage"
    conv, events, _sink = make(shared_engines, openai_agent(fake_openai))
    try:
        await conv.handle_client_message('{"type": "text_message", "content": "Hello?"}')
        await until(events, "end_of_response")
    finally:
        await conv.aclose()
    error = of(events, "error")[0]
    assert error["code"] == "agent_error" and error["message"]
    assert not [e for e in of(events, "error") if e["code"] == "internal_error"]


class FailingTts:
    """hibari, except that the second piece of every reply fails halfway through."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.name, self.sample_rate, self.default_voice = real.name, real.sample_rate, real.default_voice
        self.calls = 0

    async def synthesize(
        self, text: str, *, voice: str | None = None, speed: float = 1.0
    ) -> AsyncIterator[FloatAudio]:
        self.calls += 1
        async for chunk in self._real.synthesize(text, voice=voice, speed=speed):
            if self.calls % 2 == 0:
                yield chunk[: chunk.size // 2]
                raise TtsError("The speech service dropped the connection.")
            yield chunk

    def voices(self) -> list[Any]:
        return list(self._real.voices())

    async def warm_up(self) -> None: ...

    async def aclose(self) -> None: ...


async def test_tts_failing_mid_sentence_is_reported_and_the_next_turn_works(
    shared_engines: Engines, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = "First sentence is fine. Second sentence breaks. Third sentence is fine again."
    engines = dataclasses.replace(shared_engines, tts=FailingTts(shared_engines.tts))
    conv, events, sink = make(engines, openai_agent(fake_openai))
    try:
        await conv.handle_client_message('{"type": "text_message", "content": "Talk to me."}')
        await until(events, "end_of_response")
        first_audio = sink.written
        await conv.handle_client_message('{"type": "text_message", "content": "Again?"}')
        await until(events, "end_of_response", 2)
    finally:
        await conv.aclose()
    errors = of(events, "error")
    assert errors and all(e["code"] == "tts_error" and e["message"] for e in errors)
    assert first_audio > 0 and sink.written > first_audio  # the sentences around the failure were spoken
    ends = of(events, "end_of_response")
    assert ends[0]["text"] == fake_openai.reply and ends[1]["interrupted"] is False
    # The text is complete even where the voice failed: it stays visible to the caller.
    assert [m["role"] for m in conv.history] == ["user", "assistant", "user", "assistant"]


# -- hostile audio ----------------------------------------------------------------------------------
async def test_clipping_noise_and_silence_change_nothing(shared_engines: Engines) -> None:
    conv, events, _sink = make(shared_engines, echo_agent())
    square = np.where(np.arange(STT_RATE * 2) % 40 < 20, 32767, -32768).astype(np.int16)
    try:
        await talk(conv, (square, STT_RATE), (np.zeros(STT_RATE * 2, np.int16), STT_RATE))
        await asyncio.sleep(0.5)
        await conv.handle_client_message('{"type": "text_message", "content": "Are you there?"}')
        await until(events, "end_of_response")
    finally:
        await conv.aclose()
    assert of(events, "end_of_response")[-1]["text"] == "You said: Are you there?"
    assert not [e for e in of(events, "error") if e["code"] == "internal_error"]


async def test_hours_of_speech_are_cut_into_bounded_turns(shared_engines: Engines) -> None:
    """A caller who never stops: no turn grows past the limit, and memory stays bounded."""
    conv, events, _sink = make(shared_engines, echo_agent(), max_utterance_s=6.0)
    clip = resample_pcm(
        *speak("This is a long monologue that goes on and on without any pause", 0.0, 0.0), STT_RATE
    )
    endless = np.tile(clip, int(np.ceil(90 * STT_RATE / clip.size)))  # 90 s of unbroken speech
    biggest = 0
    try:
        for i in range(0, endless.size, 3200):  # 10x faster than real time
            await conv.push_audio(endless[i : i + 3200])
            biggest = max(biggest, conv._utterance.samples)
            await asyncio.sleep(0.02)
    finally:
        await conv.aclose()
    assert biggest <= (6.0 + 0.1) * STT_RATE
    assert len(of(events, "speech_stopped")) >= 90 // 6 - 2


async def test_binary_garbage_on_the_websocket_gets_an_error_and_the_call_goes_on(
    start_server: ServerFactory,
) -> None:
    url = await start_server(agent=echo_agent())
    rng = np.random.default_rng(7)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}{API}/session/start", json={}) as resp:
            started = await resp.json()
        async with http.ws_connect(started["ws_url"]) as ws:
            await ws.send_bytes(b"\x01\x02\x03")  # not whole samples
            await ws.send_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())  # noise, as audio
            await ws.send_bytes(b"\x00" * 200_000)  # larger than a frame may be
            await ws.send_str("{{{ not json")
            await ws.send_json({"type": "text_message", "content": "Still fine?"})
            events: list[dict[str, Any]] = []
            async with asyncio.timeout(30):
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        events.append(json.loads(msg.data))
                        if events[-1]["type"] == "end_of_response":
                            break
                    elif msg.type != aiohttp.WSMsgType.BINARY:
                        break
    codes = [e["code"] for e in events if e["type"] == "error"]
    assert "invalid_audio" in codes and "invalid_json" in codes
    assert events[-1]["type"] == "end_of_response" and events[-1]["text"] == "You said: Still fine?"


async def test_an_offer_with_no_usable_codec_or_too_many_sections_is_refused(
    start_server: ServerFactory,
) -> None:
    url = await start_server(agent=echo_agent())
    fingerprint = ":".join(["AB"] * 32)
    section = (
        "m=audio 9 UDP/TLS/RTP/SAVPF 9\r\nc=IN IP4 0.0.0.0\r\na=mid:{mid}\r\na=sendrecv\r\na=rtpmap:9 G722/8000\r\n"
        "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
        f"a=fingerprint:sha-256 {fingerprint}\r\na=setup:actpass\r\na=rtcp-mux\r\n"
    )
    head = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    g722_only = head + section.format(mid=0)
    many = head + "".join(section.format(mid=i) for i in range(50))
    async with aiohttp.ClientSession() as http:
        for sdp, needle in ((g722_only, "codec"), (many, "media sections")):
            async with http.post(f"{url}{API}/session/start", json={}) as resp:
                sid = (await resp.json())["session_id"]
            async with http.post(
                f"{url}{API}/session/{sid}/offer", json={"sdp": sdp, "type": "offer"}
            ) as resp:
                body = await resp.json()
                assert resp.status == 400 and body["error"]["code"] == "invalid_sdp"
                assert needle in body["error"]["message"], body
        async with http.get(f"{url}{API}/status") as resp:
            assert (await resp.json())["sessions"] == 0


# -- limits -----------------------------------------------------------------------------------------
async def test_a_flood_of_events_is_rate_limited_and_the_call_survives(start_server: ServerFactory) -> None:
    url = await start_server(agent=echo_agent(), event_rate_per_s=10.0)
    client = VoiceCallClient(url)
    await client.connect()
    try:
        for i in range(200):
            client.send({"type": "ping", "id": i})
        await asyncio.sleep(1.5)
        limited = [e for e in client.of_type("error") if e["code"] == "rate_limited"]
        pongs = client.of_type("pong")
        assert limited and 10 <= len(pongs) < 100, (len(limited), len(pongs))
        client.send({"type": "text_message", "content": "Hello after the flood."})
        end = await client.wait_count("end_of_response", 1, 30)
        assert end["text"] == "You said: Hello after the flood."
    finally:
        await client.close()


async def test_one_user_cannot_hold_more_than_their_share_of_sessions(start_server: ServerFactory) -> None:
    url = await start_server(agent=echo_agent(), max_sessions_per_user=2)
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(3):
            async with http.post(f"{url}{API}/session/start", json={"user_id": "hal"}) as resp:
                statuses.append((resp.status, (await resp.json()).get("error", {}).get("code")))
        async with http.post(f"{url}{API}/session/start", json={"user_id": "ida"}) as resp:
            other = resp.status
    assert statuses == [(200, None), (200, None), (429, "too_many_sessions_for_user")] and other == 200


async def test_a_call_at_its_maximum_length_is_ended_with_a_reason(start_server: ServerFactory) -> None:
    url = await start_server(agent=echo_agent(), max_call_s=1.5)
    client = VoiceCallClient(url)
    await client.connect()
    try:
        ended = await client.wait_for(lambda e: e.get("type") == "session.ended", 15)
    finally:
        await client.close(end_session=False)
    assert ended["reason"] == "max_call_length"


async def test_a_call_where_nobody_speaks_is_ended_as_idle(start_server: ServerFactory) -> None:
    url = await start_server(agent=echo_agent(), idle_timeout_s=1.5)
    client = VoiceCallClient(url)
    await client.connect()
    try:
        client.send({"type": "ping", "id": 1})  # pings keep the link alive, not the conversation
        ended = await client.wait_for(lambda e: e.get("type") == "session.ended", 15)
    finally:
        await client.close(end_session=False)
    assert ended["reason"] == "idle"
    assert client.of_type("pong")


async def vanish(url: str, client: VoiceCallClient) -> float:
    """Cut the client's network (no packet, no event, no close): seconds until its session is gone."""
    assert client.pc is not None
    connection = client.pc.getTransceivers()[0].sender.transport.transport._connection
    for protocol in connection._protocols:
        protocol.transport.sendto = lambda *args, **kwargs: None  # type: ignore[method-assign]
    cut = time.monotonic()
    try:
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(f"{url}{API}/status") as resp:
                    if (await resp.json())["sessions"] == 0:
                        break
                assert time.monotonic() - cut < 15, "the vanished peer's session is still open"
                await asyncio.sleep(0.2)
    finally:
        await client.close(end_session=False)
    return time.monotonic() - cut


async def test_a_vanished_peer_is_dropped_within_the_timeout(start_server: ServerFactory) -> None:
    url = await start_server(agent=echo_agent(), peer_timeout_s=2.0)
    client = VoiceCallClient(url)
    await client.connect()
    gone_after = await vanish(url, client)
    assert gone_after >= 1.5  # not before the timeout: a brief silence is not a vanished peer
    # And it is recorded (and counted in /metrics) as what it was, not as the client hanging up.
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}{API}/session/end", json={"session_id": client.session_id}) as resp,
    ):
        assert (await resp.json())["reason"] == "peer_timeout"


async def test_a_vanished_peer_is_dropped_on_time_though_its_audio_is_read_late(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy server reads a call's audio behind the network. The peer's silence counts from its
    last packet, not from when that packet's audio was read (which kept vanished callers
    4-6 s past the timeout on a loaded server)."""
    from rtcvoice.conversation import Conversation

    read = Conversation.push_audio

    async def slowly(self: Conversation, pcm: Any) -> None:
        await asyncio.sleep(0.04)  # a 20 ms frame takes 40 ms: the reading falls behind
        await read(self, pcm)

    monkeypatch.setattr(Conversation, "push_audio", slowly)
    url = await start_server(agent=echo_agent(), peer_timeout_s=2.0)
    client = VoiceCallClient(url)
    await client.connect()
    await asyncio.sleep(5.0)  # ~2.5 s of audio queued behind the network
    gone_after = await vanish(url, client)
    assert 1.5 <= gone_after < 4.0, gone_after


# -- shutdown ---------------------------------------------------------------------------------------
async def _until_draining(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.get(f"{url}/readyz") as resp:
                if resp.status == 503 and (await resp.json())["status"] == "draining":
                    return
            await asyncio.sleep(0.1)
    raise AssertionError("the server did not start draining")


# SIGINT stops the server; a second SIGTERM cuts a drain short, and its callers are told "drain"
# so they reconnect on their thread to another node.
@pytest.mark.parametrize(
    ("signals", "reason"),
    [(("SIGINT",), "server_shutdown"), (("SIGTERM", "SIGTERM"), "drain")],
    ids=["sigint", "second-sigterm"],
)
async def test_sigint_or_a_second_sigterm_ends_every_call_at_once_and_keeps_what_was_said(
    tmp_path: Path, fake_openai: FakeOpenAI, signals: tuple[str, ...], reason: str
) -> None:
    db = tmp_path / "calls.db"
    fake_openai.reply = "This answer takes a long time to say, sentence after sentence. " * 6
    proc, url = await serve_process(db, fake_openai)
    clients = [VoiceCallClient(url), VoiceCallClient(url)]
    try:
        for client in clients:
            await client.connect()
            client.send({"type": "text_message", "content": "Tell me a long story."})
        for client in clients:
            await client.wait_for(lambda e: e.get("type") == "state" and e["state"] == "speaking", 30)
        await asyncio.sleep(1.0)  # both are mid-reply
        for k, name in enumerate(signals):
            if k:  # the first SIGTERM drains (the calls go on); the second ends them now
                await _until_draining(url)
            proc.send_signal(getattr(signal, name))
        rc = await asyncio.to_thread(proc.wait, 20)
        await asyncio.sleep(0.3)
    finally:
        for client in clients:
            await client.close(end_session=False)
        if proc.poll() is None:
            proc.kill()
    assert rc == 0
    for client in clients:
        assert client.of_type("session.ended")[0]["reason"] == reason
        assert client.of_type("end_of_response")[0]["interrupted"] is True
    store = SqliteStore(str(db))
    await store.open()
    try:
        for client in clients:
            stored = await store.list_messages(client.of_type("session.started")[0]["thread_id"])
            assert [(m.role, m.content_type, m.interrupted) for m in stored] == [
                ("user", "text", False),
                ("assistant", "voice", True),
            ]
            assert fake_openai.reply.startswith(stored[1].content[:30])
    finally:
        await store.close()


# -- many calls -------------------------------------------------------------------------------------
def _resources() -> dict[str, float]:
    gc.collect()
    # Counting objects first: the scan's own memory stays with the interpreter afterwards, so
    # reading RSS after it keeps every measurement on the same footing.
    peer_connections = sum(isinstance(o, RTCPeerConnection) for o in gc.get_objects())
    with open("/proc/self/statm") as f:
        rss_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return {
        "peer_connections": peer_connections,
        "python_blocks": sys.getallocatedblocks(),
        "tasks": len(asyncio.all_tasks()),
        "fds": len(os.listdir("/proc/self/fd")),
        "rss_mb": round(rss_mb, 1),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


async def _one_call(url: str, n: int) -> None:
    client = VoiceCallClient(url)
    try:
        await client.connect()
        if n % 10 == 0:  # some calls also exchange events
            client.send({"type": "text_message", "content": f"Call number {n}."})
            await client.wait_count("end_of_response", 1, 30)
    finally:
        await client.close()


async def test_two_hundred_calls_in_a_row_and_twenty_at_once_leak_nothing(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # pytest keeps every captured log record until the test ends: at INFO, 220 calls' ICE logs
    # alone are tens of MB, which would be the harness's memory, not the server's.
    caplog.set_level(logging.WARNING)
    url = await start_server(agent=echo_agent(), max_sessions=64)

    async def settled() -> dict[str, float]:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                async with http.get(f"{url}{API}/status") as resp:
                    if (await resp.json())["sessions"] == 0:
                        break
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # aiortc's closing tasks finish their last steps
        return _resources()

    # Warm-up, in sequence and at once: thread pools (aiortc's codecs use the default executor)
    # grow to their working size, and each new thread's malloc arena is a one-time cost.
    # The interpreter's and the allocator's pools also grow to a plateau over the first few dozen
    # calls (measured: a one-time step, flat afterwards), so the baseline is taken after it.
    await asyncio.gather(*(_one_call(url, n) for n in range(20)))
    for n in range(60):
        await _one_call(url, n)
    before = await settled()
    started = time.monotonic()
    for n in range(200):
        await _one_call(url, n)
    after_sequence = await settled()
    results = await asyncio.gather(*(_one_call(url, n) for n in range(20)), return_exceptions=True)
    after_burst = await settled()
    report = {
        "before": before,
        "after_200_in_sequence": after_sequence,
        "after_20_at_once": after_burst,
        "seconds": round(time.monotonic() - started, 1),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "leak.json").write_text(json.dumps(report, indent=1))
    assert not [r for r in results if isinstance(r, BaseException)], results
    for after in (after_sequence, after_burst):
        assert after["peer_connections"] == before["peer_connections"], report
        assert after["tasks"] <= before["tasks"] + 2, report
        assert after["fds"] <= before["fds"] + 4, report
        # Python's own heap: 220 calls' sessions, conversations and peers must all be gone
        # (bounded caches such as yarl's URL cache account for the few thousand blocks allowed).
        assert after["python_blocks"] <= before["python_blocks"] + 20_000, report
        # Native memory (onnxruntime, FFmpeg, OpenSSL, malloc arenas) keeps some of what it
        # touched: measured +20 to +27 MB here over 220 calls, flat in a longer run outside
        # pytest. The margin is 40 MB; leaked calls would show above in the counts first.
        assert after["rss_mb"] <= before["rss_mb"] + 40, report


def test_base_settings_leave_room_for_the_tests() -> None:
    assert BASE_SETTINGS.max_sessions >= 20


def test_the_server_caps_glibcs_malloc_arenas_unless_the_environment_chose() -> None:
    """Measured in bench/README.md "Native memory": over 400 calls in batches of 10, two arenas
    level the RSS off (+0.2 MB over the last 200 calls, against +46 MB with glibc's default)."""
    probe = (
        "import os; from rtcvoice.native_memory import limit_malloc_arenas as cap; "
        "print(cap(2), cap(0)); os.environ['MALLOC_ARENA_MAX'] = '4'; print(cap(2))"
    )
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["True", "False", "False"], proc.stdout + proc.stderr


async def test_memory_is_given_back_once_calls_stop_ending_and_collected_only_when_none_is_left() -> None:
    from rtcvoice.native_memory import MallocTrimmer

    live = [1]
    trimmer = MallocTrimmer(idle=lambda: live[0] == 0, delay_s=1.0, max_wait_s=1.6)

    async def trims(n: int) -> None:
        async with asyncio.timeout(10):
            while trimmer.trims < n:
                await asyncio.sleep(0.02)

    try:
        for _ in range(3):  # a burst of calls ending: one trim, after the last of them
            trimmer.call_ended()
            await asyncio.sleep(0.05)
        assert trimmer.trims == 0
        await trims(1)
        assert trimmer.last_collect_ms is None  # a call is still up: no collection
        live[0] = 0
        trimmer.call_ended()
        await trims(2)
        assert trimmer.last_collect_ms is not None
        # Calls that keep ending still get a trim, at most max_wait_s after the first of them.
        for _ in range(15):
            trimmer.call_ended()
            await asyncio.sleep(0.2)
        assert trimmer.trims >= 3
    finally:
        await trimmer.aclose()
