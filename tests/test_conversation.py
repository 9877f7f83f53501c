"""The conversation state machine without a network: audio in, events and audio out."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import numpy as np
import pytest
from conftest import BASE_SETTINGS, echo_agent, openai_agent
from fake_openai import FakeOpenAI
from speech import speak, wer

from rtcvoice.audio import STT_RATE, Int16Audio, resample_pcm
from rtcvoice.conversation import Conversation
from rtcvoice.engines import Engines
from rtcvoice.engines.agents.echo import EchoAgent
from rtcvoice.engines.base import Agent


class InstantSink:
    """Plays everything the moment it is written (no pacing): only the order matters here."""

    sample_rate = 48_000

    def __init__(self) -> None:
        self.written = 0
        self.chunks: list[Int16Audio] = []

    @property
    def queued(self) -> int:
        return 0

    def write(self, pcm: Int16Audio) -> int:
        self.chunks.append(pcm)
        self.written += pcm.size
        return self.written

    def flush(self) -> int:
        return self.written

    def pause(self) -> None:
        pass  # everything written was played already

    def resume(self) -> None:
        pass

    def wait_played(self, position: int) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        fut.set_result(True)
        return fut


def make(
    engines: Engines, agent: Agent, *, sink: InstantSink | None = None, **settings: Any
) -> tuple[Conversation, list[dict[str, Any]], InstantSink]:
    events: list[dict[str, Any]] = []
    sink = sink if sink is not None else InstantSink()
    conv = Conversation(
        session_id="s1",
        settings=BASE_SETTINGS.replace(**settings),
        engines=dataclasses.replace(engines, agent=agent),
        vad=engines.vad.stream(),
        sink=sink,
        send=events.append,
        executor=engines.audio_executor,
    )
    conv.start()
    return conv, events, sink


async def talk(conv: Conversation, *clips: tuple[Int16Audio, int]) -> None:
    """Feed clips back to back in real time, 20 ms at a time, as a transport would."""
    pcm = np.concatenate([resample_pcm(p, r, STT_RATE) for p, r in clips])
    for i in range(0, pcm.size, 320):
        await conv.push_audio(pcm[i : i + 320])
        await asyncio.sleep(0.02)


async def until(events: list[dict[str, Any]], type_: str, n: int = 1, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while sum(e["type"] == type_ for e in events) < n:
            await asyncio.sleep(0.02)


def of(events: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_]


async def test_a_pause_inside_a_sentence_does_not_answer_half_of_it(shared_engines: Engines) -> None:
    # 300 ms of silence: long enough to start a speculative answer, too short to end the turn
    # (the half said before the pause does not read as a question; one that does is below).
    conv, events, _sink = make(shared_engines, echo_agent())
    try:
        await talk(
            conv, speak("Tell me a fun fact", tail_s=0.3), speak("about the moon.", lead_s=0.0, tail_s=1.0)
        )
        await until(events, "end_of_response")
    finally:
        await conv.aclose()
    finals = of(events, "final_transcript")
    assert len(finals) == 1 and wer("Tell me a fun fact about the moon.", finals[0]["text"]) <= 0.2, finals
    assert len(of(events, "speech_stopped")) == 1
    # Nothing of the dropped guess leaked: one reply, about the whole question, once in history.
    assert len(of(events, "end_of_response")) == 1
    assert [m["role"] for m in conv.history] == ["user", "assistant"]
    assert conv.history[0]["content"] == finals[0]["text"]


async def test_a_dropped_speculation_is_the_partial_transcript_not_a_second_pass(
    shared_engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pause starts a speculative answer; the caller goes on, which drops it. Its Whisper
    # pass was paid for: its words show as the partial transcript, and no partial pass
    # transcribes the same half sentence again.
    conv, events, _sink = make(shared_engines, echo_agent(), partial_interval_ms=1000)
    passes: list[float] = []
    transcribe = shared_engines.stt.transcribe

    async def counted(audio: Any, **kwargs: Any) -> str:
        passes.append(audio.size / STT_RATE)
        return await transcribe(audio, **kwargs)

    speculations: list[int] = []
    speculate = conv._speculate

    def recorded() -> None:
        speculations.append(conv._utterance.samples)
        speculate()

    monkeypatch.setattr(shared_engines.stt, "transcribe", counted)
    monkeypatch.setattr(conv, "_speculate", recorded)
    try:
        await talk(
            conv,
            speak("Tell me a fun fact about", tail_s=0.3),
            speak("the moon and the stars.", lead_s=0.0, tail_s=1.0),
        )
        await until(events, "end_of_response")
    finally:
        await conv.aclose()
    partials = of(events, "partial_transcript")
    assert partials and wer("Tell me a fun fact about", partials[0]["text"]) <= 0.2, partials
    final = of(events, "final_transcript")[0]["text"]
    assert wer("Tell me a fun fact about the moon and the stars.", final) <= 0.2, final
    assert len(speculations) >= 2, speculations  # the dropped one and the one answered
    # A partial pass comes a full interval after the last speculation (talk() feeds audio in
    # real time, so seconds of audio are seconds of the call), never right after one to redo
    # the half sentence it had heard.
    starts = [n / STT_RATE for n in speculations]
    partial_passes = [s for s in passes if s not in starts]
    assert len(passes) - len(partial_passes) == len(speculations), (passes, starts)
    for at in partial_passes:
        assert at - max(s for s in starts if s <= at) >= 0.9, (passes, starts)


async def test_the_answer_is_prepared_during_the_end_of_turn_silence(shared_engines: Engines) -> None:
    conv, events, sink = make(shared_engines, echo_agent())
    try:
        await talk(conv, speak("How many legs does a spider have?", tail_s=1.0))
        await until(events, "end_of_response")
    finally:
        await conv.aclose()
    metrics = of(events, "metrics")[0]
    assert metrics["speculative"] is True
    # STT, the agent and TTS ran (in part) before the turn ended, so less than all of it is left.
    total = metrics["stt"] + metrics["llm_first_sentence"] + metrics["tts_first_audio"]
    assert metrics["compute_after_turn_end"] < total, metrics
    # The events still come in the order a client expects.
    order = [
        e["type"]
        for e in events
        if e["type"] in ("speech_stopped", "final_transcript", "ai_text", "end_of_response")
    ]
    assert order[0] == "speech_stopped" and order[1] == "final_transcript" and order[-1] == "end_of_response"
    assert sink.written > 0


async def test_speculation_starts_when_the_level_falls_before_the_vad_agrees(
    shared_engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Silero's probability stays above the off threshold for ~140 ms after "have?"; the level
    # falls at once. Under steady noise the level never falls that far, so the VAD decides; so
    # it does while the shared model transcribes for someone else.
    pcm, rate = speak("How many legs does a spider have?", tail_s=1.0)
    noise = np.random.default_rng(1).normal(0, 0.018 * 32768, pcm.size)  # about -35 dBFS
    noisy = np.clip(pcm + noise, -32768, 32767).astype(np.int16)
    started: dict[str, list[int]] = {}
    for name, audio in (("clean", pcm), ("noisy", noisy), ("busy", pcm)):
        # Another call's transcription in flight, as WhisperStt counts it.
        monkeypatch.setattr(shared_engines.stt, "pending", 1 if name == "busy" else 0)
        # No partial transcripts: one still running at the last word would count as busy too.
        conv, events, _sink = make(shared_engines, echo_agent(), partial_interval_ms=60_000)
        speculate = conv._speculate

        def recorded(conv: Conversation = conv, name: str = name, speculate: Any = speculate) -> None:
            started.setdefault(name, []).append(conv.detector.silence_run)
            speculate()

        monkeypatch.setattr(conv, "_speculate", recorded)
        try:
            await talk(conv, (audio, rate))
            await until(events, "end_of_response")
        finally:
            await conv.aclose()
        assert len(of(events, "final_transcript")) == 1 and len(of(events, "end_of_response")) == 1
    # Clean: the answer was started while the VAD still counted the tail as speech.
    assert started["clean"][-1] == 0, started
    # Noisy, or the model busy: only once the VAD heard silence.
    assert all(run >= 1 for run in started["noisy"] + started["busy"]), started


async def test_noise_gets_no_answer(shared_engines: Engines) -> None:
    conv, events, _sink = make(shared_engines, echo_agent())
    rng = np.random.default_rng(1)
    noise = (rng.normal(0, 0.3, STT_RATE * 2) * 32767).clip(-32768, 32767).astype(np.int16)
    try:
        await talk(conv, (noise, STT_RATE), (np.zeros(STT_RATE, np.int16), STT_RATE))
        await asyncio.sleep(0.5)
    finally:
        await conv.aclose()
    assert not of(events, "ai_text") and not of(events, "end_of_response")


async def test_an_agent_failure_is_reported_and_spoken_and_the_call_goes_on(
    shared_engines: Engines, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fault = "500"
    conv, events, sink = make(shared_engines, openai_agent(fake_openai))
    try:
        await conv.handle_client_message('{"type": "text_message", "content": "Hello?"}')
        await until(events, "end_of_response")
        error = of(events, "error")[0]
        assert error["code"] == "agent_error" and "500" in error["message"]
        assert sink.written > 0  # the apology was spoken
        fake_openai.fault = None
        fake_openai.reply = "Now it works."
        await conv.handle_client_message('{"type": "text_message", "content": "Again?"}')
        await until(events, "end_of_response", 2)
    finally:
        await conv.aclose()
    assert of(events, "end_of_response")[1]["text"] == "Now it works."


async def test_closing_is_idempotent_and_stops_a_turn_in_flight(
    shared_engines: Engines, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = "One two three four five six seven eight nine ten."
    fake_openai.token_delay = 0.2
    conv, events, _sink = make(shared_engines, openai_agent(fake_openai))
    await conv.handle_client_message('{"type": "text_message", "content": "Count slowly."}')
    await until(events, "ai_text")
    await conv.aclose()
    await conv.aclose()
    count = len(events)
    await asyncio.sleep(0.5)
    assert len(events) == count  # nothing is emitted after close
    assert all(t.done() for t in conv._side_tasks) and (conv._turn_task is None or conv._turn_task.done())


class PacedSink(InstantSink):
    """Plays in real time, so a reply is still being heard when the caller speaks again."""

    def __init__(self) -> None:
        super().__init__()
        self.started: float | None = None

    def wait_played(self, position: int) -> asyncio.Future[bool]:
        loop = asyncio.get_running_loop()
        if self.started is None:
            self.started = loop.time()
        fut: asyncio.Future[bool] = loop.create_future()
        due = self.started + position / self.sample_rate

        def play() -> None:
            if not fut.done():
                fut.set_result(True)

        loop.call_at(due, play)
        return fut

    def flush(self) -> int:
        return self.written


async def test_a_finished_question_ends_the_turn_sooner_than_a_statement(shared_engines: Engines) -> None:
    conv, events, _sink = make(shared_engines, echo_agent(), turn_policy="question")
    try:
        await talk(
            conv,
            speak("How many legs does a spider have?", tail_s=1.0),
            speak("Tell me a fun fact about the moon.", tail_s=1.2),
        )
        await until(events, "end_of_response", 2)
    finally:
        await conv.aclose()
    question, statement = (m["end_of_turn_silence"] for m in of(events, "metrics"))
    settings = conv.settings
    # The question's transcript ended in "?" well before its shorter silence had passed.
    assert settings.question_end_of_turn_ms <= question < settings.end_of_turn_silence_ms, question
    assert statement >= settings.end_of_turn_silence_ms, statement
    assert [e["text"][-1] for e in of(events, "final_transcript")] == ["?", "."]


async def test_the_shorter_silence_for_questions_can_be_turned_off(shared_engines: Engines) -> None:
    conv, events, _sink = make(
        shared_engines, echo_agent(), turn_policy="question", question_end_of_turn_ms=0
    )
    try:
        await talk(conv, speak("How many legs does a spider have?", tail_s=1.0))
        await until(events, "end_of_response")
    finally:
        await conv.aclose()
    assert of(events, "metrics")[0]["end_of_turn_silence"] >= conv.settings.end_of_turn_silence_ms


async def test_a_caller_who_goes_on_after_a_question_shaped_pause_is_answered_as_a_whole(
    shared_engines: Engines, fake_openai: FakeOpenAI
) -> None:
    # "Can you tell me?" then ~450 ms of silence: longer than the question's end-of-turn
    # silence, shorter than the statement's. The turn ends early as a question and the answer
    # starts; the caller goes on, which interrupts it, and the next turn hears both halves.
    fake_openai.reply = "Sure, what would you like to know about it today?"
    fake_openai.token_delay = 0.02
    conv, events, _sink = make(
        shared_engines, openai_agent(fake_openai), sink=PacedSink(), turn_policy="question"
    )
    rest = "how long it takes to drive from Boston to New York?"
    try:
        await talk(conv, speak("Can you tell me?", tail_s=0.45), speak(rest, lead_s=0.0, tail_s=1.2))
        await until(events, "end_of_response", 2)
    finally:
        await conv.aclose()
    first, second = of(events, "final_transcript")
    assert first["text"].endswith("?"), first
    ends = of(events, "end_of_response")
    assert ends[0]["turn_id"] == first["turn_id"] and ends[0]["interrupted"] is True
    assert second["continues"] == first["turn_id"]
    assert wer("Can you tell me " + rest, second["text"]) <= 0.25, second
    assert fake_openai.requests[-1]["messages"][-1]["content"] == second["text"]


class PreparingEcho(EchoAgent):
    def __init__(self, events: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.prepared: list[list[dict[str, str]]] = []
        self.events = events  # where a prepare with the caller's words is noted, in order

    async def prepare(self, messages: list[Any], *, said: str = "") -> None:
        self.prepared.append([dict(m) for m in messages])
        if said and self.events is not None:
            self.events.append({"type": "prepared_words", "said": said})


async def test_the_agent_reads_the_callers_words_so_far_while_the_caller_speaks(
    shared_engines: Engines,
) -> None:
    agent = PreparingEcho()
    conv, events, _sink = make(shared_engines, agent, partial_interval_ms=700)
    agent.events = events
    try:
        await talk(
            conv, speak("Could you tell me a fun fact about the moon and the stars tonight?", tail_s=1.0)
        )
        await until(events, "end_of_response")
    finally:
        await conv.aclose()
    kinds = [e["type"] for e in events]
    partials = [e["text"] for e in events if e["type"] == "partial_transcript"]
    prepared = [e["said"] for e in events if e["type"] == "prepared_words"]
    # The partial transcripts are handed on to be read while the caller still speaks, before the
    # turn ends, in order. One shown while an early answer is already out (a dropped guess's
    # words, on a busy machine) is not: that answer's prompt is the one the model should keep.
    assert prepared and prepared == partials[: len(prepared)], (prepared, partials)
    assert max(i for i, k in enumerate(kinds) if k == "prepared_words") < kinds.index("final_transcript")


async def test_the_agent_reads_the_history_before_the_next_turn_is_asked(shared_engines: Engines) -> None:
    agent = PreparingEcho()
    conv, events, _sink = make(shared_engines, agent)
    try:
        await asyncio.sleep(0)
        await conv.handle_client_message('{"type": "text_message", "content": "Hello there."}')
        await until(events, "end_of_response")
        await asyncio.sleep(0.05)
    finally:
        await conv.aclose()
    system = {"role": "system", "content": conv.config.instructions}
    assert agent.prepared[0] == [system]  # at the start of the call
    assert agent.prepared[-1] == [
        system,
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "You said: Hello there."},
    ]


async def test_a_quiet_closure_inside_a_word_starts_no_transcription(
    shared_engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The level of a stop's closure falls as far as the end of a sentence does, but Silero's
    # probability stays near 1 through it: only a quiet window where the probability has begun
    # to fall starts an answer ahead of the VAD.
    conv, _events, _sink = make(shared_engines, echo_agent(), partial_interval_ms=60_000)
    started: list[int] = []
    monkeypatch.setattr(conv, "_speculate", lambda: started.append(conv.detector.windows))
    loud = (np.sin(np.arange(512) / 3.0) * 12000).astype(np.int16)
    quiet = np.zeros(512, np.int16)
    try:
        for window, prob in [(loud, 0.99)] * 6 + [(quiet, 0.97), (loud, 0.99), (quiet, 0.6)]:
            await conv._on_window(window, prob, time.monotonic())
    finally:
        await conv.aclose()
    assert started == [9], started  # the last window, not the closure (the 7th)
