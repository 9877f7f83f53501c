"""Natural turn-taking with real speech, Silero and Whisper: the silence that ends a turn depends on
what was said, words that follow a turn ended too early join it, and a cough or an "mm-hmm" over
the AI pauses its reply instead of ending it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from conftest import BASE_SETTINGS, ServerFactory, echo_agent, openai_agent
from fake_openai import FakeOpenAI
from speech import speak, wer
from test_conversation import make, of, talk, until

from rtcvoice.audio import STT_RATE, FloatAudio, int16_to_float, resample_pcm
from rtcvoice.client import VoiceCallClient
from rtcvoice.conversation import Conversation
from rtcvoice.conversation.endpointing import QuestionPolicy, SemanticPolicy, SilencePolicy
from rtcvoice.conversation.interruptions import (
    REJOIN_HEARD_S,
    SoundJudge,
    asks_for_the_floor,
    continues_sentence,
    is_backchannel,
    rejoinable,
)
from rtcvoice.conversation.turns import Turn, TurnDetector
from rtcvoice.conversation.utterance import Utterance
from rtcvoice.engines import Engines
from rtcvoice.engines.vad import WINDOW_MS
from rtcvoice.transports.tracks import PacedAudioTrack


class Fixed:
    def __init__(self, p: float) -> None:
        self.name = f"fixed-{p}"
        self.p = p

    def probability(self, text: str, audio: FloatAudio) -> float:
        return self.p


def test_the_semantic_policy_waits_longer_the_less_finished_an_utterance_sounds() -> None:
    quiet = np.zeros(16000, np.float32)
    silences = [
        SemanticPolicy([Fixed(p)], 320, 500, 1600).judge("", quiet).silence_ms for p in (0.9, 0.5, 0.1)
    ]
    assert silences == [320, 500, 1600]
    # Two models: one sure "not done" pulls an unsure other below the finished line.
    assert SemanticPolicy([Fixed(0.7), Fixed(0.1)], 320, 500, 1600).judge("", quiet).reason == "unfinished"
    assert QuestionPolicy(500, 360).judge("Can you?", quiet).silence_ms == 360
    assert QuestionPolicy(500, 360).judge("Tell me.", quiet).silence_ms == 500
    assert SilencePolicy(500).judge("Tell me?", quiet).silence_ms == 500


async def test_what_the_caller_had_heard_of_the_reply_is_counted_from_when_their_speech_began() -> None:
    # The VAD is sure of speech min_speech_ms after it began: a caller who went on 0.55 s into
    # the early reply was taken as answering it (0.65 s by then) and their words as a new turn.
    now = time.monotonic()
    turn = Turn(id="t", source="voice", silence_ms=320.0, ended_at=now - 1.0)
    turn.marks["first_audio_played"] = now - (REJOIN_HEARD_S + 0.05)
    assert rejoinable(turn, BASE_SETTINGS, 0, spoken_s=0.096)
    assert not rejoinable(turn, BASE_SETTINGS, 0, spoken_s=0.0)


def test_listener_noises_are_backchannels_and_requests_are_not() -> None:
    for text in ("Mm-hmm.", "Yeah, yeah.", "Okay.", "Uh-huh", "I see.", "", "..."):
        assert is_backchannel(text), text
    for text in ("Stop.", "Wait, what?", "No.", "Yeah, but what about cats?", "Tell me more."):
        assert not is_backchannel(text), text
        assert asks_for_the_floor(text), text
    # One or two words that ask nothing: a listener noise Whisper misheard ("Uh-huh." as "It hurts.").
    for text in ("Mama.", "It hurts.", "Yeah.", "Hmm?", ""):
        assert not asks_for_the_floor(text), text


async def test_a_thinking_pause_after_a_word_that_cannot_end_a_sentence_is_not_the_end(
    shared_engines: Engines,
) -> None:
    # 900 ms of silence after "for": the silence-only policy (500 ms) answers "I want to book a
    # table for" and then "four people ..." as a second turn.
    conv, events, _sink = make(shared_engines, echo_agent())
    try:
        await talk(
            conv,
            speak("I want to book a table for", tail_s=0.9),
            speak("four people tomorrow evening.", lead_s=0.0, tail_s=1.8),
        )
        await until(events, "end_of_response")
    finally:
        await conv.aclose()
    finals = of(events, "final_transcript")
    assert len(finals) == 1, finals
    assert wer("I want to book a table for four people tomorrow evening.", finals[0]["text"]) <= 0.2, finals
    assert len(of(events, "speech_stopped")) == 1


async def test_a_finished_request_ends_the_turn_sooner_than_the_plain_silence(
    shared_engines: Engines,
) -> None:
    conv, events, _sink = make(shared_engines, echo_agent())
    try:
        await talk(conv, speak("Tell me something about octopuses.", tail_s=1.2))
        await until(events, "end_of_response")
    finally:
        await conv.aclose()
    metrics = of(events, "metrics")[0]
    assert metrics["end_of_turn_reason"] == "finished", metrics
    assert metrics["end_of_turn_silence"] < conv.settings.end_of_turn_silence_ms, metrics


async def cut_short(
    engines: Engines, fake: FakeOpenAI, first: str, pause_s: float, rest: str
) -> tuple[Conversation, list[dict[str, Any]]]:
    """Speak ``first``, pause, then ``rest``, with a 300 ms silence-only policy that ends the
    turn inside the pause, so its answer has started when the caller goes on."""
    fake.reply = "Sure, I can help you with that booking right away."
    fake.token_delay = 0.02
    track = PacedAudioTrack()
    async with playing(track):
        conv, events, _sink = make(
            engines,
            openai_agent(fake),
            sink=track,  # type: ignore[arg-type]
            turn_policy="silence",
            end_of_turn_silence_ms=300,
        )
        try:
            await talk(conv, speak(first, tail_s=pause_s), speak(rest, lead_s=0.0, tail_s=1.2))
            await until(events, "end_of_response", 2)
        finally:
            await conv.aclose()
    return conv, events


async def test_words_that_follow_a_turn_ended_too_early_join_it(
    shared_engines: Engines, fake_openai: FakeOpenAI
) -> None:
    # The next reply is to the whole sentence, which alone stays in the agent's history.
    conv, events = await cut_short(
        shared_engines, fake_openai, "I would like to book a table", 0.7, "for four people tomorrow evening."
    )
    first, second = of(events, "final_transcript")
    assert second["continues"] == first["turn_id"], (first, second)
    assert wer("I would like to book a table for four people tomorrow evening.", second["text"]) <= 0.2
    ends = of(events, "end_of_response")
    assert ends[0]["turn_id"] == first["turn_id"] and ends[0]["interrupted"] is True
    assert fake_openai.requests[-1]["messages"][-1]["content"] == second["text"]
    assert [m["content"] for m in conv.history if m["role"] == "user"] == [second["text"]]


async def test_two_words_soon_after_a_turn_ended_too_early_join_it_rather_than_resume_its_reply(
    shared_engines: Engines, fake_openai: FakeOpenAI
) -> None:
    # "for two." is shorter than --barge-in-ms and no request: over a reply it would be a
    # listener's noise, but right after the caller's own turn it is the rest of their sentence.
    _conv, events = await cut_short(shared_engines, fake_openai, "I would like a table", 0.6, "for two.")
    first, second = of(events, "final_transcript")
    assert second["continues"] == first["turn_id"], (first, second)
    assert wer("I would like a table for two.", second["text"]) <= 0.2, second
    assert not of(events, "playback_resumed")


def test_words_that_hang_on_the_sentence_before_continue_it_and_a_reply_to_the_ai_does_not() -> None:
    for text in ("In Paris this weekend.", "Uh, for four people.", "and how they change colour", "Please."):
        assert continues_sentence(text), text
    for text in ("Okay.", "What about Rome?", "But why?", "Paris.", "", "Um..."):
        assert not continues_sentence(text), text


async def test_words_that_attach_to_a_turn_ended_too_early_join_it_though_its_reply_was_heard(
    shared_engines: Engines, fake_openai: FakeOpenAI
) -> None:
    # The caller goes on after hearing more than REJOIN_HEARD_S of the early reply: by then an
    # "okay" answers it (and resumes it), but "in Paris ..." can only finish their question.
    pause_s = 1.5
    conv, events = await cut_short(
        shared_engines, fake_openai, "What is the weather like?", pause_s, "in Paris this weekend?"
    )
    first, second = of(events, "final_transcript")
    heard_s = pause_s - of(events, "metrics")[0]["voice_to_voice"] / 1000.0
    assert heard_s > REJOIN_HEARD_S, of(events, "metrics")  # else the timing alone would join them
    assert second["continues"] == first["turn_id"], (first, second)
    assert wer("What is the weather like? In Paris this weekend?", second["text"]) <= 0.2, second
    assert [m["content"] for m in conv.history if m["role"] == "user"] == [second["text"]]


async def judge_a_long_sound(*, may_continue: bool, words: list[str]) -> tuple[list[bool], list[str]]:
    """Speech over the AI for twice --barge-in-ms, its transcriptions scripted: how the AI was
    interrupted (whether the sound joined the caller's turn), and the transcripts left unasked."""
    detector = TurnDetector(WINDOW_MS, min_speech_ms=BASE_SETTINGS.min_speech_ms)
    utterance = Utterance(4)
    utterance.idle(np.zeros(512, np.int16))
    utterance.begin()
    left, barged, tasks = list(words), [], []

    async def transcribe(audio: Any) -> str:
        await asyncio.sleep(0.05)  # a Whisper pass: the caller may stop meanwhile
        return left.pop(0)

    async def barge_in(turn: Turn, rejoin: bool) -> None:
        barged.append(rejoin)

    judge = SoundJudge(
        settings=BASE_SETTINGS,
        detector=detector,
        utterance=utterance,
        sink=PacedAudioTrack(),
        transcribe=transcribe,
        barge_in=barge_in,
        end_user_turn=lambda: None,
        emit=lambda *args, **kwargs: None,
        own=tasks.append,
        session_id="t",
    )
    while not detector.in_speech:  # the sound is judged from when the VAD is sure of it
        detector.feed(0.9)
    judge.begin(Turn(id="t", source="voice"), rejoin=False, may_continue=may_continue)
    # Speech for twice --barge-in-ms, then silence until the sound is judged.
    for prob in [0.9] * (2 * BASE_SETTINGS.barge_in_ms // WINDOW_MS) + [0.0] * 20:
        if judge.pending is None:
            break
        await judge.on_window(detector.feed(prob))
        await asyncio.sleep(WINDOW_MS / 1000 / 4)
    await asyncio.gather(*tasks)  # a transcription asked for beyond the script fails here
    return barged, left


async def test_a_long_sound_that_may_finish_the_callers_sentence_is_transcribed_again_before_it_interrupts() -> (
    None
):
    # The midway check's short audio may lack the first word ("4. 4." was Whisper's midway
    # transcript of espeak-ng's "For four people" in the corpus): at twice --barge-in-ms the sound
    # interrupts by its length, and its words then say whether it joins the caller's turn.
    words = ["4. 4.", "For four people tomorrow"]
    assert await judge_a_long_sound(may_continue=True, words=words) == ([True], [])
    # Three words at the midway check would interrupt as a new turn; here they are read again.
    assert await judge_a_long_sound(may_continue=True, words=["Four people to", words[1]]) == ([True], [])
    assert await judge_a_long_sound(may_continue=True, words=["Uh", "What about Rome?"]) == ([False], [])
    # Later into the reply, length alone decides, without another transcription.
    assert await judge_a_long_sound(may_continue=False, words=words) == ([False], words[1:])


@contextlib.asynccontextmanager
async def playing(track: PacedAudioTrack) -> AsyncIterator[list[int]]:
    """Pull frames in real time as aiortc's sender would; yields the samples played per frame."""
    played: list[int] = []

    async def pull() -> None:
        while True:
            frame = await track.recv()
            played.append(int(np.count_nonzero(frame.to_ndarray())))

    task = asyncio.create_task(pull())
    try:
        yield played
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


LONG_REPLY = (
    "Octopuses have three hearts and blue blood. Two of the hearts pump blood through the gills, "
    "and the third pumps it through the rest of the body. They can also change colour in a moment."
)


async def speaking_call(
    engines: Engines, fake: FakeOpenAI, track: PacedAudioTrack
) -> tuple[Conversation, list[dict[str, Any]]]:
    fake.reply = LONG_REPLY
    conv, events, _ = make(engines, openai_agent(fake), sink=track)  # type: ignore[arg-type]
    await talk(conv, speak("Tell me about octopuses.", tail_s=0.8))
    async with asyncio.timeout(20):
        while "first_audio_played" not in str(of(events, "metrics")) and not of(events, "metrics"):
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.8)  # a sentence into the reply
    return conv, events


# "Okay, sure." (0.83 s) outlasts --barge-in-ms (640): its words, not its length, say it is no interruption.
@pytest.mark.parametrize("sound", ["Uh-huh.", "Okay.", "Okay, sure."])
async def test_a_backchannel_over_the_ai_pauses_its_reply_and_it_resumes_where_it_stopped(
    shared_engines: Engines, fake_openai: FakeOpenAI, sound: str
) -> None:
    track = PacedAudioTrack()
    async with playing(track):
        conv, events = await speaking_call(shared_engines, fake_openai, track)
        try:
            await talk(conv, speak(sound, lead_s=0.0, tail_s=0.6))
            await until(events, "end_of_response", timeout=40)
        finally:
            await conv.aclose()
    turn_id = of(events, "final_transcript")[0]["turn_id"]
    paused, resumed = of(events, "playback_paused"), of(events, "playback_resumed")
    assert [e["turn_id"] for e in paused] == [turn_id] and [e["turn_id"] for e in resumed] == [turn_id]
    end = of(events, "end_of_response")[0]
    assert end["interrupted"] is False and end["text"] == LONG_REPLY
    # Every sample of the reply was played: the pause held the playhead, it dropped nothing.
    assert track.playhead.played == track.playhead.written
    assert len(of(events, "final_transcript")) == 1  # the noise was no turn of its own
    assert [m["content"] for m in conv.history] == [of(events, "final_transcript")[0]["text"], LONG_REPLY]


async def test_real_words_over_the_ai_interrupt_it_and_only_what_was_heard_is_kept(
    shared_engines: Engines, fake_openai: FakeOpenAI
) -> None:
    track = PacedAudioTrack()
    async with playing(track):
        conv, events = await speaking_call(shared_engines, fake_openai, track)
        try:
            await talk(conv, speak("Wait, stop. Tell me about cats instead.", lead_s=0.0, tail_s=1.2))
            async with asyncio.timeout(40):
                while not any("cats" in r["messages"][-1]["content"].lower() for r in fake_openai.requests):
                    await asyncio.sleep(0.05)
        finally:
            await conv.aclose()
    first = of(events, "end_of_response")[0]
    assert first["interrupted"] is True
    heard = conv.history[1]["content"]
    assert heard and LONG_REPLY.startswith(heard) and heard != LONG_REPLY
    assert not of(events, "playback_resumed")


async def test_over_webrtc_a_thinking_pause_is_heard_whole_and_an_uh_huh_does_not_cut_the_reply(
    start_server: ServerFactory, fake_openai: FakeOpenAI, shared_engines: Engines
) -> None:
    fake_openai.reply = LONG_REPLY
    url = await start_server(agent=openai_agent(fake_openai))
    client = VoiceCallClient(url)
    await client.connect()
    try:
        (half, rate), (rest, _) = (
            speak("I want to book a table for", tail_s=1.0),
            speak("four people tomorrow evening.", lead_s=0.0),
        )
        client.play(np.concatenate([half, rest]), rate)
        await client.wait_for(lambda e: e.get("type") == "state" and e["state"] == "speaking", 60)
        await asyncio.sleep(1.0)
        client.play(*speak("Uh-huh.", lead_s=0.0, tail_s=0.5))
        end = await client.wait_count("end_of_response", 1, 60)
        await asyncio.sleep(0.4)  # the last frames are in flight behind the event
    finally:
        await client.close()
    finals = client.of_type("final_transcript")
    assert len(finals) == 1, finals
    assert wer("I want to book a table for four people tomorrow evening.", finals[0]["text"]) <= 0.2
    assert client.of_type("playback_paused") and client.of_type("playback_resumed")
    assert end["interrupted"] is False and end["text"] == LONG_REPLY
    # The caller heard the whole reply, once, in order.
    heard = await shared_engines.stt.transcribe(
        int16_to_float(resample_pcm(client.received.pcm(), 48_000, STT_RATE))
    )
    assert wer(LONG_REPLY, heard) <= 0.3, heard
