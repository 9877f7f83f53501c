"""Seed 001: a front end, a Go backend and a Python AI service speaking the voice-session protocol.

Both halves of that system are played here exactly as its API document describes them: the front
end's flow against ``/api/v1/voice/session/...`` (start with ``language``/``model``/``session_type``,
open the absolute ``ws_url``, stream PCM16 16 kHz, ``end_of_input``, end), and a stand-in for the
Go backend calling the AI service's own routes (``/internal/ai/session/start`` with its own session
id, then ``/session/{id}/ws``). Real servers, real speech; the Hindi call runs on engines that
serve Hindi (OpenAI-compatible transcription and Edge voices, both local fakes that speak those
protocols), the English ones on the embedded Whisper.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np
from conftest import BASE_SETTINGS, ServerFactory, openai_agent
from fake_openai import FakeOpenAI
from fake_speech_servers import FakeEdgeServer, FakeOpenAISpeech, tone
from speech import at_16k, speak, wer

from rtcvoice.audio import Int16Audio, int16_to_float
from rtcvoice.engines import Engines
from rtcvoice.engines.stt.openai_transcribe import OpenAITranscribeStt
from rtcvoice.engines.tts.edge import EdgeTts

API = "/api/v1/voice"
QUESTION = "Show me my blood report, please."
ANSWER = "Your blood report looks normal. Your iron is a little low."
HINDI_QUESTION = "मेरी रक्त रिपोर्ट दिखाओ"
HINDI_ANSWER = "आपकी रक्त रिपोर्ट सामान्य है।"
FRAME = 320 * 2  # 20 ms of PCM16 at 16 kHz, as the seed's front end records it


async def stream_turn(
    ws: aiohttp.ClientWebSocketResponse, pcm: Int16Audio
) -> tuple[list[dict[str, Any]], bytes]:
    """Send the utterance as binary audio chunks, then ``end_of_input``; collect until ``end_of_response``."""
    data = pcm.astype("<i2").tobytes()
    for i in range(0, len(data), FRAME):
        await ws.send_bytes(data[i : i + FRAME])
        await asyncio.sleep(0.005)  # faster than real time, as a relay flushing its buffer would
    await ws.send_json({"type": "end_of_input"})
    events: list[dict[str, Any]] = []
    audio = bytearray()
    async with asyncio.timeout(60):
        while not events or events[-1]["type"] != "end_of_response":
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                audio += msg.data
            elif msg.type == aiohttp.WSMsgType.TEXT:
                events.append(json.loads(msg.data))
            else:
                raise AssertionError(f"the socket closed mid-turn: {msg}")
    return events, bytes(audio)


async def thread_messages(http: aiohttp.ClientSession, url: str, thread: str) -> list[tuple[str, str, str]]:
    """(role, content, content_type) of the thread's stored messages, in order."""
    async with http.get(f"{url}/api/v1/chat/threads/{thread}/messages") as resp:
        assert resp.status == 200, await resp.text()
        return [(m["role"], m["content"], m["content_type"]) for m in (await resp.json())["messages"]]


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


async def test_the_seed_request_for_hindi_is_refused_clearly_by_english_only_engines(
    start_server: ServerFactory,
) -> None:
    url = await start_server()
    body = {"language": "hi", "model": "mistral-7b", "session_type": "voice"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}{API}/session/start", json=body) as resp:
            error = (await resp.json())["error"]
        assert resp.status == 400
        assert error["code"] == "unsupported_language"
        # It names the language, the engine that cannot serve it, and what that engine serves.
        assert "Hindi (hi)" in error["message"] and "speech recognition" in error["message"]
        assert "English (en)" in error["message"]
        async with http.get(f"{url}{API}/status") as resp:
            assert (await resp.json())["sessions"] == 0, "nothing was started"


async def test_the_seed_front_end_flow_in_hindi_on_engines_that_serve_it(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = HINDI_ANSWER
    async with (
        FakeOpenAISpeech(transcript=HINDI_QUESTION) as speech_api,
        FakeEdgeServer(speech=tone) as edge,  # hibari, its default, reads no Devanagari
    ):
        url = await start_server(
            agent=openai_agent(fake_openai),
            stt=OpenAITranscribeStt(BASE_SETTINGS.replace(stt="openai", openai_base_url=speech_api.base_url)),
            tts=EdgeTts(url=edge.url),
        )
        async with aiohttp.ClientSession() as http:
            body = {"language": "hi", "model": "mistral-7b", "session_type": "voice"}
            async with http.post(f"{url}{API}/session/start", json=body) as resp:
                started = await resp.json()
            assert resp.status == 200, started
            # The seed's front end hands ws_url to its WebSocket as it is: it must be absolute.
            assert (
                started["ws_url"]
                == f"ws://127.0.0.1:{url.rsplit(':', 1)[1]}{API}/session/{started['session_id']}/ws"
            )
            end = {"session_id": started["session_id"]}
            async with http.ws_connect(started["ws_url"]) as ws:
                hello = await ws.receive_json(timeout=10)
                events, audio = await stream_turn(ws, at_16k(speak(QUESTION)))
                async with http.post(f"{url}{API}/session/end", json=end) as resp:
                    ended = await resp.json()
                last = [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]
            # The seed's front end may end a session whose socket is already gone: that is done too.
            async with http.post(f"{url}{API}/session/end", json=end) as resp:
                again = await resp.json()
            stored = await thread_messages(http, url, started["thread_id"])

    assert hello["type"] == "session.started" and hello["language"] == "hi"
    # The seed's output audio is 16 kHz PCM16 mono, and the greeting says so in so many words.
    assert hello["output_audio"]["sample_rate"] == 16_000 and hello["output_audio"]["format"] == "pcm16"
    assert hello["input_audio"] == {"format": "pcm16", "sample_rate": 16_000}
    assert of(events, "final_transcript")[0]["text"] == HINDI_QUESTION
    assert "".join(e["text"] for e in of(events, "ai_text")) == HINDI_ANSWER
    assert len(audio) > 16_000, "the reply was spoken as binary audio"
    assert ended["message"] == "Session ended successfully" and ended["ended"] is True
    assert last[-1]["type"] == "session.ended" and last[-1]["reason"] == "client_hangup"
    assert resp.status == 200 and again["message"] == "Session ended successfully"
    # Honoured: the language went to the transcriber, the model and the language to the LLM, and
    # a Hindi voice read the reply.
    assert speech_api.transcriptions[-1].language == "hi"
    request = fake_openai.requests[-1]
    assert request["model"] == "mistral-7b"
    assert "Hindi" in request["messages"][0]["content"]
    assert edge.requests[-1].voice.startswith("Microsoft Server Speech Text to Speech Voice (hi-IN")
    assert stored == [("user", HINDI_QUESTION, "voice"), ("assistant", HINDI_ANSWER, "voice")]


async def test_a_text_session_type_streams_text_and_no_audio(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = ANSWER
    url = await start_server(agent=openai_agent(fake_openai))
    async with aiohttp.ClientSession() as http:
        body = {"language": "en", "session_type": "text"}
        async with http.post(f"{url}{API}/session/start", json=body) as resp:
            started = await resp.json()
        async with http.ws_connect(started["ws_url"]) as ws:
            hello = await ws.receive_json(timeout=10)
            await ws.send_json({"type": "text_message", "content": QUESTION})
            got: list[aiohttp.WSMessage] = []
            async with asyncio.timeout(30):
                while (
                    not got
                    or got[-1].type != aiohttp.WSMsgType.TEXT
                    or '"end_of_response"' not in got[-1].data
                ):
                    got.append(await ws.receive())
    assert hello["output_audio"] is None and hello["tts"] is None
    assert all(m.type == aiohttp.WSMsgType.TEXT for m in got), "no audio on a text session"
    done = json.loads(got[-1].data)
    assert done["text"] == ANSWER and done["message_id"]


async def test_a_backend_drives_the_ai_service_routes_with_its_own_session_ids(
    start_server: ServerFactory, fake_openai: FakeOpenAI, shared_engines: Engines
) -> None:
    """The Go backend's side: /internal/ai/session/start, then relay audio over /session/{id}/ws."""
    fake_openai.reply = ANSWER
    url = await start_server(agent=openai_agent(fake_openai), internal_token="backend-secret")
    auth = {"Authorization": "Bearer backend-secret"}
    body = {"session_id": "vsn_8df91e", "language": "en", "model": "mistral-7b"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/internal/ai/session/start", json=body) as resp:
            assert resp.status == 401, "the AI service's routes are the backend's alone"
        async with http.post(f"{url}/internal/ai/session/start", json=body, headers=auth) as resp:
            started = await resp.json()
        assert started["session_id"] == "vsn_8df91e"
        assert started["ws_url"] == f"ws://127.0.0.1:{url.rsplit(':', 1)[1]}/session/vsn_8df91e/ws"
        async with http.post(f"{url}/internal/ai/session/start", json=body, headers=auth) as resp:
            assert resp.status == 409 and (await resp.json())["error"]["code"] == "session_exists"

        async with http.ws_connect(started["ws_url"], headers=auth) as ws:
            hello = await ws.receive_json(timeout=10)
            events, audio = await stream_turn(ws, at_16k(speak(QUESTION)))
        async with http.post(
            f"{url}/internal/ai/session/end", json={"session_id": "vsn_8df91e"}, headers=auth
        ) as resp:
            assert resp.status == 404, "the call already ended when its socket closed"
        # The session had no thread: the call's first message made one, and said so.
        assert hello["thread_id"] is None
        thread = next(e["thread_id"] for e in events if e["type"] == "thread.updated")
        stored = await thread_messages(http, url, thread)

    assert hello["session_id"] == "vsn_8df91e"
    assert wer(QUESTION, of(events, "final_transcript")[0]["text"]) <= 0.25
    assert "".join(e["text"] for e in of(events, "ai_text")) == ANSWER
    assert fake_openai.requests[-1]["model"] == "mistral-7b"
    # The relayed audio is the answer, at the 16 kHz the seed's audio table gives.
    heard = await shared_engines.stt.transcribe(int16_to_float(np.frombuffer(audio, "<i2")))
    assert wer(ANSWER, heard) <= 0.3, heard
    [(role, said, kind), reply] = stored
    assert (role, kind) == ("user", "voice") and wer(QUESTION, said) <= 0.25
    assert reply == ("assistant", ANSWER, "voice")


async def test_ending_a_reopened_session_id_ends_the_live_session_not_the_old_one(
    start_server: ServerFactory,
) -> None:
    """A backend that reuses its session id: the id's first session ended, its second is live."""
    url = await start_server()
    body = {"session_id": "vsn_again", "session_type": "text"}
    end = {"session_id": "vsn_again"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/internal/ai/session/start", json=body) as resp:
            assert resp.status == 200
        async with http.post(f"{url}{API}/session/end", json=end) as resp:
            assert (await resp.json())["reason"] == "client_hangup"
        async with http.post(f"{url}/internal/ai/session/start", json=body) as resp:
            assert resp.status == 200, "the id is free again once its session ended"
        async with http.post(f"{url}{API}/session/end", json=end) as resp:
            ended = await resp.json()
        async with http.get(f"{url}{API}/status") as resp:
            sessions = (await resp.json())["sessions"]
    assert ended["reason"] == "client_hangup", "the live session was ended, not reported as the old one"
    assert sessions == 0
