"""End to end: a real aiortc client calls a real server; speech in, speech out."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from conftest import ServerFactory, echo_agent, openai_agent, record_threads
from fake_openai import FakeOpenAI
from speech import speak, wer

from rtcvoice.audio import STT_RATE, int16_to_float, resample_pcm, rms_dbfs
from rtcvoice.client import VoiceCallClient
from rtcvoice.engines import Engines
from rtcvoice.engines.stt.whisper import WhisperStt
from rtcvoice.engines.tts.hibari import HibariTts
from rtcvoice.engines.vad import SileroVad

QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France. It is famous for the Eiffel Tower."
METRIC_KEYS = ("end_of_turn", "stt", "llm_first_token", "tts_first_audio", "voice_to_voice")


async def transcribe_received(engines: Engines, client: VoiceCallClient) -> str:
    pcm = resample_pcm(client.received.pcm(), 48_000, STT_RATE)
    return await engines.stt.transcribe(int16_to_float(pcm))


async def call(url: str, **session: Any) -> VoiceCallClient:
    client = VoiceCallClient(url)
    await client.connect(session=session)
    return client


async def test_spoken_question_gets_a_spoken_answer(
    start_server: ServerFactory, fake_openai: FakeOpenAI, shared_engines: Engines
) -> None:
    fake_openai.reply = ANSWER
    url = await start_server(agent=openai_agent(fake_openai))
    client = await call(url)
    try:
        client.play(*speak(QUESTION))
        end = await client.wait_count("end_of_response", 1, 60)
        await asyncio.sleep(0.4)  # the last frames are in flight behind the event
    finally:
        await client.close()

    assert end["interrupted"] is False
    finals = client.of_type("final_transcript")
    assert len(finals) == 1 and wer(QUESTION, finals[0]["text"]) <= 0.25, finals
    assert "".join(e["text"] for e in client.of_type("ai_text")) == ANSWER
    assert [e["state"] for e in client.of_type("state")] == ["listening", "thinking", "speaking", "listening"]
    assert client.of_type("speech_started") and client.of_type("speech_stopped")
    metrics = client.of_type("metrics")
    assert len(metrics) == 1 and all(isinstance(metrics[0][k], float) for k in METRIC_KEYS), metrics
    assert all(e["session_id"] == client.session_id for _t, e in client.events)

    # The agent got the system prompt and what the user said.
    sent = fake_openai.requests[0]["messages"]
    assert sent[0]["role"] == "system" and sent[-1] == {"role": "user", "content": finals[0]["text"]}

    # What came back over the audio track is the answer, spoken.
    heard = await transcribe_received(shared_engines, client)
    assert wer(ANSWER, heard) <= 0.3, heard


async def test_partial_transcripts_arrive_while_the_user_speaks(start_server: ServerFactory) -> None:
    url = await start_server(agent=echo_agent(), partial_interval_ms=400)
    client = await call(url)
    try:
        long_question = (
            "Could you tell me how far it is from the earth to the moon, and how long the trip takes?"
        )
        client.play(*speak(long_question))
        # "...to the moon?" then a 352 ms pause: should a turn end there as a question, the
        # caller's going on interrupts it and the next turn hears both halves.
        answered = await client.wait_for(
            lambda e: e.get("type") == "end_of_response" and not e["interrupted"], 60
        )
    finally:
        await client.close()
    types = [e["type"] for _t, e in client.events]
    partials = client.of_type("partial_transcript")
    assert len(partials) >= 2, types
    # Partials come between speech_started and speech_stopped, before the final.
    assert types.index("speech_started") < types.index("partial_transcript") < types.index("speech_stopped")
    final = next(e for e in client.of_type("final_transcript") if e["turn_id"] == answered["turn_id"])
    assert wer(long_question, final["text"]) <= 0.25, client.of_type("final_transcript")


async def test_barge_in_stops_the_reply_and_keeps_what_was_said(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    long_reply = " ".join(
        f"This is sentence number {n} of a very long answer that goes on and on." for n in range(1, 9)
    )
    fake_openai.reply = long_reply
    url = await start_server(agent=openai_agent(fake_openai))
    client = await call(url)
    try:
        client.play(*speak(QUESTION))
        await client.wait_for(lambda e: e.get("type") == "state" and e["state"] == "speaking", 60)
        await asyncio.sleep(1.5)
        fake_openai.reply = "Sure, I will stop."
        # No comma: after "Stop," and its pause the turn could end (it sounds finished) and the
        # next reply begin inside the window this test expects to be quiet.
        barge_at = time.monotonic()  # the mic is idle: the words start now
        client.play(*speak("Please stop talking now.", lead_s=0.0))
        first_end = await client.wait_count("end_of_response", 1, 30)
        second_end = await client.wait_count("end_of_response", 2, 60)
    finally:
        await client.close()

    assert first_end["interrupted"] is True
    assert second_end["interrupted"] is False
    # The reply was audible before the barge-in and went quiet as the caller began, long before
    # the eight sentences (~30 s) would have ended, and stayed quiet while they spoke (whenever
    # the server judged the words an interruption: they ask for the floor).
    assert rms_dbfs(client.received.between(barge_at - 1.0, barge_at - 0.2)) > -35
    spoke_until = client.speech_ends[-1]
    assert spoke_until - barge_at > 1.0
    quiet = client.received.between(barge_at + 0.5, spoke_until)
    assert quiet.size and rms_dbfs(quiet) < -55, rms_dbfs(quiet)

    # History keeps only what the caller heard, marked by the second request to the agent.
    second_request = fake_openai.requests[1]["messages"]
    said = [m for m in second_request if m["role"] == "assistant"]
    assert len(said) == 1
    assert said[0]["content"] and long_reply.startswith(said[0]["content"][:40])
    assert len(said[0]["content"]) < len(long_reply) / 2


async def test_text_messages_and_control_events_share_the_call(start_server: ServerFactory) -> None:
    url = await start_server(agent=echo_agent())
    client = await call(url)
    try:
        client.send({"type": "ping", "id": 7})
        pong = await client.wait_for(lambda e: e.get("type") == "pong", 10)
        assert pong["id"] == 7
        client._channel.send("this is not json")
        client.send({"type": "launch_rockets"})
        client.send({"type": "session.update", "voice": "no-such-voice"})
        client.send({"type": "text_message", "content": 42})
        errors = [await client.wait_count("error", n, 10) for n in (1, 2, 3, 4)]
        assert [e["code"] for e in errors] == [
            "invalid_json",
            "unknown_event",
            "invalid_voice",
            "invalid_event",
        ]
        # The refused voice still answered with the settings in force; this is the second answer.
        assert client.of_type("session.updated")[0]["voice"] == "heart"
        client.send({"type": "session.update", "instructions": "Be brief.", "speed": 1.2})
        updated = await client.wait_count("session.updated", 2, 10)
        assert updated["speed"] == 1.2
        client.send({"type": "text_message", "content": "Hello from the keyboard."})
        end = await client.wait_count("end_of_response", 1, 30)
        assert end["text"] == "You said: Hello from the keyboard."
        assert client.of_type("metrics")[0]["tts_first_audio"] is not None
    finally:
        await client.close()


async def test_interrupt_event_stops_speaking_at_once(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = " ".join(["This answer is long and it keeps going for a while."] * 6)
    url = await start_server(agent=openai_agent(fake_openai))
    client = await call(url)
    try:
        client.send({"type": "text_message", "content": "Talk for a while."})
        await client.wait_for(lambda e: e.get("type") == "state" and e["state"] == "speaking", 30)
        await asyncio.sleep(1.0)
        client.send({"type": "interrupt"})
        end = await client.wait_count("end_of_response", 1, 10)
        t = client.event_time(end)
        await asyncio.sleep(1.2)
    finally:
        await client.close()
    assert end["interrupted"] is True
    assert rms_dbfs(client.received.between(t + 0.25, t + 1.0)) < -55


async def test_nothing_blocks_the_event_loop_during_a_call(
    start_server: ServerFactory, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine compute never runs on the loop thread, and no callback spends long on its CPU.

    Not asyncio's debug-mode wall-clock watch: on a shared 2-core machine a callback that does
    nothing can take 100 ms of wall time while the OS runs another process (CI saw 118 ms in
    an ICE check). Thread identity and the loop thread's own CPU time do not depend on load.
    CPU time alone would miss Whisper, whose work happens on CTranslate2's threads while the
    caller waits, hence the per-engine check; the CPU watch covers the rest (this process's
    client resamples on its loop, so resampling is not in the per-engine list).
    """
    loop_thread = threading.get_ident()
    fake_openai.reply = ANSWER
    url = await start_server(agent=openai_agent(fake_openai))
    question = speak(QUESTION)  # the test's own synthesis runs before the watch starts

    compute_threads = {
        "stt": record_threads(monkeypatch, WhisperStt, "_transcribe"),
        "vad": record_threads(monkeypatch, SileroVad, "_run"),
        "tts": record_threads(monkeypatch, HibariTts, "_render", static=True),
    }

    slow: list[tuple[float, str]] = []
    callbacks = 0
    run = asyncio.events.Handle._run

    def measured(handle: asyncio.events.Handle) -> None:
        nonlocal callbacks
        if threading.get_ident() != loop_thread:
            return run(handle)
        callbacks += 1
        started = time.thread_time()
        try:
            return run(handle)
        finally:
            # A callback here normally costs well under 10 ms; 25 ms is the worst seen (offer).
            spent = time.thread_time() - started
            if spent > 0.05:
                slow.append((round(spent, 3), repr(handle)[:300]))

    monkeypatch.setattr(asyncio.events.Handle, "_run", measured)
    client = await call(url)
    try:
        client.play(*question)
        client.send({"type": "text_message", "content": "And in one word?"})
        await client.wait_count("end_of_response", 2, 60)
    finally:
        await client.close()
        monkeypatch.undo()

    assert all(compute_threads.values()), compute_threads  # each engine ran during the call
    on_loop = [label for label, threads in compute_threads.items() if loop_thread in threads]
    assert not on_loop, f"ran on the event loop thread: {on_loop}"
    assert callbacks > 1000  # the CPU watch saw the call
    assert not slow, slow
