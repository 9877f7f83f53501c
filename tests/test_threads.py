"""Threads shared with text chat, and the transports for clients without WebRTC."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import wave
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from conftest import ServerFactory, openai_agent, serve_process
from fake_openai import FakeOpenAI
from pg import PostgresCluster
from speech import at_16k, speak, wer

from rtcvoice.audio import STT_RATE, Int16Audio, int16_to_float, resample_pcm
from rtcvoice.client import VoiceCallClient
from rtcvoice.engines import Engines
from rtcvoice.server.threads import ThreadRecorder
from rtcvoice.store.sqlite import SqliteStore

API = "/api/v1/voice"
Q1, A1 = "What is the capital of France?", "Paris is the capital of France."
Q2, A2 = "And how many people live there?", "About two million people live in Paris."


async def messages(
    http: aiohttp.ClientSession, server: str, thread: str, user: str = ""
) -> list[dict[str, Any]]:
    # Unauthenticated mode: the app names its user; with auth on, the token would.
    query = f"?user_id={user}" if user else ""
    async with http.get(f"{server}/api/v1/chat/threads/{thread}/messages{query}") as resp:
        assert resp.status == 200
        return list((await resp.json())["messages"])


async def ws_turn(
    http: aiohttp.ClientSession, url: str, pcm: Int16Audio, *, speedup: float = 2.0
) -> tuple[list[dict[str, Any]], bytes]:
    """Speak ``pcm`` (16 kHz) over the session WebSocket; collect events and audio until the reply ends."""
    events: list[dict[str, Any]] = []
    audio = bytearray()
    async with http.ws_connect(url) as ws:

        async def speak_into() -> None:
            step = 640  # 20 ms
            for i in range(0, pcm.size, step):
                await ws.send_bytes(pcm[i : i + step].astype("<i2").tobytes())
                await asyncio.sleep(0.02 / speedup)
            silence = np.zeros(step, np.int16).tobytes()
            while not ws.closed:  # a quiet microphone keeps sending silence
                await ws.send_bytes(silence)
                await asyncio.sleep(0.02 / speedup)

        sender = asyncio.create_task(speak_into())
        try:
            async with asyncio.timeout(60):
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        audio += msg.data
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        events.append(json.loads(msg.data))
                        if events[-1]["type"] == "end_of_response":
                            break
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    return events, bytes(audio)


async def test_a_webrtc_call_and_a_websocket_call_continue_one_thread(
    start_server: ServerFactory, fake_openai: FakeOpenAI, shared_engines: Engines
) -> None:
    fake_openai.reply = lambda msgs: A1 if len(msgs) <= 2 else A2
    url = await start_server(agent=openai_agent(fake_openai))

    client = VoiceCallClient(url)
    await client.connect()
    try:
        client.play(*speak(Q1))
        await client.wait_count("end_of_response", 1, 60)
    finally:
        await client.close()
    thread = client.of_type("session.started")[0]["thread_id"]

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}{API}/session/start", json={"thread_id": thread}) as resp:
            started = await resp.json()
        assert started["thread_id"] == thread
        events, audio = await ws_turn(http, started["ws_url"], at_16k(speak(Q2)))
        await asyncio.sleep(0.2)
        stored = await messages(http, url, thread)

    # The WebSocket carried the same events and the spoken answer.
    types = [e["type"] for e in events]
    assert types[0] == "session.started" and "final_transcript" in types and types[-1] == "end_of_response"
    # The socket's voice is at the rate session.started states (16 kHz unless asked otherwise).
    out = events[0]["output_audio"]
    assert (out["format"], out["sample_rate"]) == ("pcm16", 16_000)
    heard = await shared_engines.stt.transcribe(int16_to_float(np.frombuffer(audio, "<i2")))
    assert wer(A2, heard) <= 0.3, heard
    # Both calls' turns are in the thread, in order, as voice messages.
    assert [(m["role"], m["content_type"]) for m in stored] == [
        ("user", "voice"),
        ("assistant", "voice"),
        ("user", "voice"),
        ("assistant", "voice"),
    ]
    assert wer(Q1, stored[0]["content"]) <= 0.25 and stored[1]["content"] == A1
    assert wer(Q2, stored[2]["content"]) <= 0.25 and stored[3]["content"] == A2
    assert stored[0]["session_id"] != stored[2]["session_id"]
    # The second call's agent was given the first call's exchange as context.
    second = fake_openai.requests[-1]["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == A1


async def test_the_realtime_websocket_answers_audio_and_text_inputs(
    start_server: ServerFactory, fake_openai: FakeOpenAI, shared_engines: Engines
) -> None:
    fake_openai.reply = A1
    url = await start_server(agent=openai_agent(fake_openai))
    pcm = at_16k(speak(Q1))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/api/v1/streaming/realtime/erin") as ws:
            hello = await ws.receive_json(timeout=10)
            assert (
                hello["type"] == "session.update"
                and hello["session"]["output_audio"]["sample_rate"] == 24_000
            )
            async with http.get(f"{url}/api/v1/streaming/realtime/status") as resp:
                assert (await resp.json())["connections"] == 1
            await ws.send_json(
                {"type": "session.update", "session": {"instructions": "Be brief.", "speed": 1.1}}
            )
            updated = await ws.receive_json(timeout=10)
            assert updated["type"] == "session.update" and updated["session"]["speed"] == 1.1
            await ws.send_json({"type": "ping", "id": 3})
            assert (await ws.receive_json(timeout=10)) == {"type": "pong", "id": 3}
            audio_b64 = base64.b64encode(pcm.astype("<i2").tobytes()).decode()
            await ws.send_json({"type": "conversation.item.input", "input_audio_buffer": audio_b64})
            got = await receive_until_done(ws)
            await ws.send_json({"type": "conversation.item.input", "input_text": "Thanks!"})
            got_text = await receive_until_done(ws)
            await ws.send_json({"type": "conversation.item.input"})
            assert (await ws.receive_json(timeout=10))["type"] == "error"
        await asyncio.sleep(0.1)
        async with http.get(f"{url}/api/v1/streaming/realtime/health") as resp:
            assert (await resp.json())["connections"] == 0
        thread = hello["session"]["thread_id"]
        async with http.get(f"{url}/api/v1/chat/threads?user_id=erin") as resp:
            assert [t["id"] for t in (await resp.json())["threads"]] == [thread]
        stored = await messages(http, url, thread, "erin")

    transcript = next(e for e in got if e["type"] == "input.transcript")["text"]
    assert wer(Q1, transcript) <= 0.25
    assert "".join(e["delta"] for e in got if e["type"] == "response.delta") == A1
    done = got[-1]
    assert done["type"] == "response.done" and done["text"] == A1 and done["interrupted"] is False
    audio = b"".join(base64.b64decode(e["audio"]) for e in got if e["type"] == "response.audio")
    heard = await shared_engines.stt.transcribe(
        int16_to_float(resample_pcm(np.frombuffer(audio, "<i2"), 24_000, STT_RATE))
    )
    assert wer(A1, heard) <= 0.3, heard
    assert got_text[-1]["type"] == "response.done"
    assert [m["content_type"] for m in stored] == ["voice", "voice", "text", "voice"]


async def receive_until_done(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        while not got or got[-1]["type"] != "response.done":
            got.append(await ws.receive_json())
    return got


async def test_process_transcript_answers_over_plain_http_in_the_thread(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda msgs: A1 if len(msgs) <= 2 else A2
    url = await start_server(agent=openai_agent(fake_openai))
    async with aiohttp.ClientSession() as http:
        body = {"transcript": Q1, "user_id": "frank", "model_name": "house-model"}
        async with http.post(f"{url}{API}/process-transcript", json=body) as resp:
            first = await resp.json()
        assert resp.status == 200 and first["text"] == A1 and first["message_id"] and first["chat_id"]
        body = {"transcript": Q2, "user_id": "frank", "chat_id": first["chat_id"], "with_audio": True}
        async with http.post(f"{url}{API}/process-transcript", json=body) as resp:
            second = await resp.json()
        assert second["text"] == A2 and second["chat_id"] == first["chat_id"]
        with wave.open(io.BytesIO(base64.b64decode(second["audio_wav_base64"]))) as w:
            assert w.getframerate() == 24_000 and w.getnframes() > 24_000 // 2
        async with http.post(f"{url}{API}/process-transcript", json={"transcript": " "}) as resp:
            assert resp.status == 400
        # Another user's thread does not exist for them (an unknown id would be adopted instead).
        async with http.post(
            f"{url}{API}/process-transcript",
            json={"transcript": "hi", "chat_id": first["chat_id"], "user_id": "mallory"},
        ) as resp:
            assert resp.status == 404
        stored = await messages(http, url, first["chat_id"], "frank")
    assert [m["content"] for m in stored] == [Q1, A1, Q2, A2]
    assert stored[1]["id"] == first["message_id"]
    assert fake_openai.requests[-1]["messages"][1:] == [
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": Q2},
    ]


async def test_sigkill_mid_call_loses_no_stored_turn(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    db = tmp_path / "calls.db"
    fake_openai.reply = lambda msgs: A1 if len(msgs) <= 2 else "Let me think about that for a while. " * 5
    fake_openai.token_delay = 0.3  # the second reply is still streaming when the server dies
    proc, url = await serve_process(db, fake_openai)
    client = VoiceCallClient(url)
    try:
        await client.connect()
        client.play(*speak(Q1))
        await client.wait_count("end_of_response", 1, 60)
        client.play(*speak(Q2))
        await client.wait_count("final_transcript", 2, 60)
        await client.wait_count("ai_text", len(A1.split()) + 1, 30)  # the second reply has begun
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
    finally:
        await client.close(end_session=False)
        if proc.poll() is None:
            proc.kill()
    finals = [e["text"] for e in client.of_type("final_transcript")]
    thread = client.of_type("session.started")[0]["thread_id"]

    store = SqliteStore(str(db))
    await store.open()
    try:
        stored = await store.list_messages(thread)
    finally:
        await store.close()
    # Every final transcript and the completed reply are there; the reply cut by the kill is not.
    assert [(m.role, m.content) for m in stored] == [
        ("user", finals[0]),
        ("assistant", A1),
        ("user", finals[1]),
    ]

    # A restarted server serves the same thread.
    proc, url = await serve_process(db, fake_openai)
    try:
        async with aiohttp.ClientSession() as http:
            assert [m["content"] for m in await messages(http, url, thread)] == [finals[0], A1, finals[1]]
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)


async def test_a_postgres_url_keeps_the_threads_in_postgres(
    start_server: ServerFactory, fake_openai: FakeOpenAI, pg_cluster: PostgresCluster
) -> None:
    fake_openai.reply = A1
    url = await start_server(agent=openai_agent(fake_openai), database_url=pg_cluster.create_database())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}{API}/session/start", json={"user_id": "gina"}) as resp:
            started = await resp.json()
        events, _audio = await ws_turn(http, started["ws_url"], at_16k(speak(Q1)))
        stored = await messages(http, url, started["thread_id"], "gina")
    assert events[-1]["type"] == "end_of_response"
    assert [(m["role"], m["content_type"]) for m in stored] == [("user", "voice"), ("assistant", "voice")]
    assert stored[1]["content"] == A1


async def test_a_message_recorded_while_the_call_closes_is_still_written(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "closing.db"))
    await store.open()
    try:
        thread = await store.create_thread(None, "t")
        recorder = ThreadRecorder(store, user_id=None, thread_id=thread.id, session_id="s")
        closing = asyncio.create_task(recorder.aclose())
        await asyncio.sleep(0)  # the close has begun: its end marker is queued
        # e.g. the reply a second, overlapping close was storing as it interrupted the turn
        stored = recorder.record({"role": "assistant", "content": "heard so far"}, {"turn_id": "t1"})
        await closing
        assert await asyncio.wait_for(stored, 5) is not None
        assert [m.content for m in await store.list_messages(thread.id)] == ["heard so far"]
        late = recorder.record({"role": "assistant", "content": "after the end"}, {})
        assert await asyncio.wait_for(late, 5) is None, "a write after the close resolves, unwritten"
    finally:
        await store.close()
