"""TTS engines (hibari, edge, openai), the OpenAI-compatible STT engine and the TTS factory.

The network engines run against real local servers that speak their wire protocols
(tests/fake_speech_servers.py): nothing here reaches the internet.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import edge_tts.communicate
import numpy as np
import pytest
from conftest import record_threads
from fake_speech_servers import FakeEdgeServer, FakeOpenAISpeech, tone

from rtcvoice.engines.base import FloatAudio, SttError, TextToSpeech, TtsError
from rtcvoice.engines.stt.openai_transcribe import OpenAITranscribeStt
from rtcvoice.engines.tts import create_tts
from rtcvoice.engines.tts.edge import EdgeTts
from rtcvoice.engines.tts.hibari import HibariTts
from rtcvoice.engines.tts.openai_speech import OpenAISpeechTts
from rtcvoice.settings import Settings

RATE = 24_000
SETTINGS = Settings.from_env({})


def rms(audio: FloatAudio) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0


async def collect(stream: AsyncIterator[FloatAudio]) -> list[FloatAudio]:
    return [chunk async for chunk in stream]


@pytest.fixture(scope="module")
async def hibari_tts() -> AsyncIterator[HibariTts]:
    tts = HibariTts()
    await tts.warm_up()
    yield tts
    await tts.aclose()


@pytest.fixture
def no_hibari_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hibari cache and downloads off: only what ships in the wheel is on disk."""
    monkeypatch.setenv("HIBARI_HOME", str(tmp_path))
    monkeypatch.delenv("RTCVOICE_ALLOW_DOWNLOADS", raising=False)
    return tmp_path


# -- hibari -----------------------------------------------------------------------------------------


async def test_hibari_yields_24khz_float_audio_one_chunk_per_sentence(hibari_tts: HibariTts) -> None:
    assert isinstance(hibari_tts, TextToSpeech)
    assert (hibari_tts.name, hibari_tts.sample_rate, hibari_tts.default_voice) == ("hibari", RATE, "heart")
    text = "Good morning. The weather is lovely today! Shall we go for a walk?"
    chunks = await collect(hibari_tts.synthesize(text))
    assert len(chunks) == 3
    for c in chunks:
        assert c.dtype == np.float32 and c.ndim == 1
        assert 0.3 * RATE < len(c) < 4 * RATE  # a short sentence, at 24 kHz
        assert rms(c) > 0.02, "audibly non-silent"
        assert float(np.abs(c).max()) <= 1.0


async def test_hibari_first_sentence_arrives_before_the_rest_is_made(hibari_tts: HibariTts) -> None:
    sentences = [f"This is sentence number {n}, which is long enough to take some time." for n in range(6)]
    stream = hibari_tts.synthesize(" ".join(sentences))
    t0 = time.perf_counter()
    first = await anext(stream)
    first_s = time.perf_counter() - t0
    rest = await collect(stream)
    total_s = time.perf_counter() - t0
    assert first.size and len(rest) == 5
    assert first_s < total_s / 2


async def test_hibari_speed_changes_duration(hibari_tts: HibariTts) -> None:
    text = "Speaking a little faster than usual."
    normal = sum(len(c) for c in await collect(hibari_tts.synthesize(text)))
    fast = sum(len(c) for c in await collect(hibari_tts.synthesize(text, speed=1.5)))
    assert fast < normal * 0.85


async def test_hibari_synthesis_runs_off_the_event_loop(
    hibari_tts: HibariTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hibari

    loop_thread = threading.get_ident()
    work_threads = record_threads(monkeypatch, hibari.Hibari, "from_ids")

    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    text = " ".join(
        f"Paragraph {n}: the quick brown fox jumps over the lazy dog, and then it runs far away "
        "across the wide green field towards the distant hills."
        for n in range(8)
    )
    tick = asyncio.create_task(ticker())
    t0, cpu0 = time.perf_counter(), time.thread_time()
    chunks = await collect(hibari_tts.synthesize(text))
    elapsed, loop_cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    stop.set()
    await tick

    assert len(chunks) == 8
    assert work_threads and loop_thread not in work_threads, "synthesis ran on the event loop thread"
    # The loop stayed responsive throughout: ticks kept coming, and the loop thread itself was
    # nearly idle. Its CPU time, not the largest gap between ticks: on a shared machine the OS
    # alone can hold a tick back 100 ms, while 8 paragraphs on the loop would cost seconds.
    assert len(gaps) >= elapsed / 0.01 * 0.3
    assert loop_cpu < 0.2 * elapsed, f"the loop thread was busy {loop_cpu:.2f} s of {elapsed:.2f} s"


async def test_hibari_stops_synthesizing_when_the_consumer_stops(
    hibari_tts: HibariTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hibari

    calls = 0
    original = hibari.Hibari.from_ids

    def counting_from_ids(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(hibari.Hibari, "from_ids", counting_from_ids)
    stream = hibari_tts.synthesize(" ".join(f"Sentence number {n} of a long answer." for n in range(10)))
    assert (await anext(stream)).size
    await stream.aclose()  # what cancelling the consumer does on barge-in
    await asyncio.sleep(0.1)
    assert calls == 1, "sentences after the interruption were still synthesized"


async def test_hibari_unknown_voice_is_a_tts_error_listing_valid_voices(
    hibari_tts: HibariTts, no_hibari_downloads: Path
) -> None:
    with pytest.raises(TtsError, match="heart") as err:
        await collect(hibari_tts.synthesize("Hello.", voice="no-such-voice"))
    assert "no-such-voice" in str(err.value)
    with pytest.raises(TtsError, match="heart"):
        HibariTts("no-such-voice")


async def test_hibari_never_downloads_a_voice_by_default(no_hibari_downloads: Path) -> None:
    # emma is a real hibari voice that is not in the wheel: asking for it must not fetch it.
    with pytest.raises(TtsError, match="RTCVOICE_ALLOW_DOWNLOADS") as err:
        HibariTts("emma")
    assert "heart" in str(err.value)
    tts = HibariTts()
    try:
        with pytest.raises(TtsError, match="not downloaded"):
            await collect(tts.synthesize("Hello.", voice="emma"))
    finally:
        await tts.aclose()
    assert await asyncio.to_thread(lambda: list(no_hibari_downloads.iterdir())) == []


async def test_hibari_voices_lists_heart_offline_and_only_voices_on_disk(no_hibari_downloads: Path) -> None:
    tts = HibariTts()
    try:
        voices = {v.id: v for v in tts.voices()}
        assert set(voices) == {"heart"}
        heart = voices["heart"]
        assert (heart.engine, heart.online, heart.gender, heart.language) == (
            "hibari",
            False,
            "female",
            "en-US",
        )
        assert heart.as_dict()["online"] is False
    finally:
        await tts.aclose()

    # A voice someone fetched beforehand (with the hibari command) is offered too.
    from hibari.voices import VOICES

    (no_hibari_downloads / VOICES["fable"]["file"]).write_bytes(b"placeholder")
    tts = HibariTts()
    try:
        fable = next(v for v in tts.voices() if v.id == "fable")
        assert (fable.gender, fable.language, fable.online) == ("male", "en-GB", False)
    finally:
        await tts.aclose()


async def test_hibari_refuses_work_after_aclose() -> None:
    tts = HibariTts()
    await tts.aclose()
    with pytest.raises(TtsError, match="closed"):
        await collect(tts.synthesize("Hello."))


# -- OpenAI-compatible speech and transcription -----------------------------------------------------


async def test_openai_speech_streams_float_audio_of_the_expected_length() -> None:
    text = "Hello from the speech endpoint."
    async with FakeOpenAISpeech() as fake:
        tts = OpenAISpeechTts(base_url=fake.base_url, default_voice="nova")
        try:
            chunks = await collect(tts.synthesize(text, speed=1.25))
        finally:
            await tts.aclose()
        request = fake.speech_requests[-1]

    expected = tone(text)
    audio = np.concatenate(chunks)
    assert all(c.dtype == np.float32 for c in chunks)
    assert len(chunks) > 1, "audio is yielded as it streams in, not all at the end"
    assert len(audio) == len(expected)
    # Odd-sized network chunks split samples; carrying the half sample over keeps every value right.
    assert np.max(np.abs(audio - expected)) < 2 / 32768
    assert request.body == {
        "model": "tts-1",
        "voice": "nova",
        "input": text,
        "response_format": "pcm",
        "speed": 1.25,
    }
    assert len(request.chunks) > 1 and any(n % 2 for n in request.chunks)


async def test_openai_speech_http_error_is_a_tts_error() -> None:
    async with FakeOpenAISpeech(fail_status=400) as fake:
        tts = OpenAISpeechTts(base_url=fake.base_url, api_key="sk-test")
        try:
            with pytest.raises(TtsError, match="failing on purpose"):
                await collect(tts.synthesize("Hello."))
        finally:
            await tts.aclose()
        assert fake.speech_requests[-1].authorization == "Bearer sk-test"


async def test_openai_speech_needs_a_key_or_a_base_url() -> None:
    with pytest.raises(TtsError, match="OPENAI_API_KEY"):
        OpenAISpeechTts()


async def test_openai_stt_sends_a_16khz_wav_and_returns_its_text() -> None:
    audio = (0.2 * np.sin(2 * np.pi * 300 * np.arange(24_000) / 16_000)).astype(np.float32)
    async with FakeOpenAISpeech(transcript="  Hello there.  ") as fake:
        stt = OpenAITranscribeStt(SETTINGS.replace(stt="openai", openai_base_url=fake.base_url))
        try:
            text = await stt.transcribe(audio, language="en-US")
        finally:
            await stt.aclose()
        sent = fake.transcriptions[-1]

    assert text == "Hello there."
    assert (sent.model, sent.language, sent.filename, sent.content_type) == (
        "whisper-1",
        "en",
        "audio.wav",
        "audio/wav",
    )
    assert (sent.sample_rate, sent.channels, sent.sample_width) == (16_000, 1, 2)
    assert sent.duration_s == pytest.approx(1.5)
    assert np.max(np.abs(sent.audio - audio)) < 2 / 32768


async def test_openai_stt_uses_the_configured_model_and_tts_base_url() -> None:
    async with FakeOpenAISpeech(transcript="ok") as fake:
        settings = SETTINGS.replace(
            stt="openai",
            stt_model="my-whisper",
            tts_base_url=fake.base_url,
            openai_base_url="http://192.0.2.1/v1",
        )
        stt = OpenAITranscribeStt(settings)
        try:
            assert await stt.transcribe(np.zeros(1600, np.float32), language="") == "ok"
        finally:
            await stt.aclose()
        assert fake.transcriptions[-1].model == "my-whisper"
        assert fake.transcriptions[-1].language is None


async def test_openai_stt_http_error_is_an_stt_error() -> None:
    async with FakeOpenAISpeech(fail_status=500) as fake:
        stt = OpenAITranscribeStt(SETTINGS.replace(stt="openai", openai_base_url=fake.base_url))
        try:
            with pytest.raises(SttError):
                await stt.transcribe(np.zeros(16_000, np.float32))
        finally:
            await stt.aclose()


# -- edge -------------------------------------------------------------------------------------------


async def test_edge_engine_decodes_mp3_from_the_edge_protocol_to_24khz_speech() -> None:
    text = "Hello from the edge server. This is a test."
    original_url = vars(edge_tts.communicate)["WSS_URL"]
    async with FakeEdgeServer() as server:
        tts = EdgeTts(url=server.url)
        try:
            chunks = await collect(tts.synthesize(text, speed=1.25))
        finally:
            await tts.aclose()
        request = server.requests[-1]
        sent = server.sent_audio[-1]
    assert vars(edge_tts.communicate)["WSS_URL"] == original_url, "aclose restores edge_tts's endpoint"

    audio = np.concatenate(chunks)
    assert all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    assert len(chunks) > 1, "MP3 is decoded as it arrives, not after the whole sentence"
    assert tts.sample_rate == RATE
    # MP3 adds encoder/decoder padding (tens of ms) but keeps the length and loudness of the speech.
    assert abs(len(audio) - len(sent)) < 0.15 * RATE
    assert rms(audio) > 0.5 * rms(sent) > 0.01
    # The decoded envelope follows the speech that was sent (it is that speech, not noise).
    n = min(len(audio), len(sent)) // 2400 * 2400
    env_sent = np.sqrt(np.mean(sent[:n].reshape(-1, 2400) ** 2, axis=1))
    best = max(
        float(
            np.corrcoef(env_sent, np.sqrt(np.mean(np.roll(audio, -lag)[:n].reshape(-1, 2400) ** 2, axis=1)))[
                0, 1
            ]
        )
        for lag in range(0, 2400, 96)
    )
    assert best > 0.9

    assert request.text == text
    assert request.voice == "Microsoft Server Speech Text to Speech Voice (en-US, AriaNeural)"
    assert request.rate == "+25%"
    assert request.speech_config is not None
    assert "audio-24khz-48kbitrate-mono-mp3" in str(request.speech_config)
    # edge_tts appends its own parameters to the configured endpoint.
    assert {"TrustedClientToken", "ConnectionId", "Sec-MS-GEC", "Sec-MS-GEC-Version"} <= set(request.query)


async def test_edge_consumer_that_stops_early_closes_the_websocket_promptly() -> None:
    text = " ".join(f"Sentence {n} of a long answer that the caller interrupts." for n in range(6))
    async with FakeEdgeServer(chunk_bytes=600) as server:
        tts = EdgeTts(url=server.url)
        try:
            stream = tts.synthesize(text)
            assert (await anext(stream)).size
            t0 = time.perf_counter()
            await stream.aclose()  # what cancelling the consumer does on barge-in
            closing_s = time.perf_counter() - t0
            for _ in range(100):
                if server.requests[-1].closed:
                    break
                await asyncio.sleep(0.01)
        finally:
            await tts.aclose()
        request = server.requests[-1]
    assert request.closed and closing_s < 1.0
    assert request.mp3_bytes < request.mp3_total / 2, "the server stopped sending the rest"


async def test_edge_turn_without_audio_is_a_tts_error() -> None:
    async with FakeEdgeServer(send_audio=False) as server:
        tts = EdgeTts(url=server.url)
        try:
            with pytest.raises(TtsError, match="NoAudioReceived"):
                await collect(tts.synthesize("Hello."))
        finally:
            await tts.aclose()


async def test_edge_unreachable_endpoint_is_a_tts_error() -> None:
    async with FakeEdgeServer() as server:
        url = server.url
    # The server is closed: nothing listens on that port any more.
    tts = EdgeTts(url=url, connect_timeout_s=2)
    try:
        with pytest.raises(TtsError, match="edge-tts failed"):
            await collect(tts.synthesize("Hello."))
    finally:
        await tts.aclose()


async def test_edge_invalid_voice_is_a_tts_error_before_any_network() -> None:
    tts = EdgeTts(url="ws://127.0.0.1:9/never")
    try:
        with pytest.raises(TtsError, match="not a voice"):
            await collect(tts.synthesize("Hello.", voice="not a voice"))
    finally:
        await tts.aclose()


async def test_edge_voices_are_listed_without_the_network_and_marked_online() -> None:
    tts = EdgeTts()
    voices = tts.voices()
    await tts.aclose()
    ids = [v.id for v in voices]
    assert "en-US-AriaNeural" in ids and len(ids) == len(set(ids)) >= 8
    assert all(v.online and v.engine == "edge" for v in voices)
    # English first, and the languages a call may ask for (README "Languages").
    assert voices[0].language == "en-US"
    assert {v.language[:2] for v in voices} == {"en", "hi", "es", "fr", "de"}
    assert {v.gender for v in voices} == {"female", "male"}


# -- factory ----------------------------------------------------------------------------------------


async def test_create_tts_defaults_to_offline_hibari_heart(
    caplog: pytest.LogCaptureFixture, no_hibari_downloads: Path
) -> None:
    with caplog.at_level(logging.INFO, logger="rtcvoice.engines.tts"):
        tts = create_tts(SETTINGS)
    try:
        assert isinstance(tts, HibariTts) and tts.default_voice == "heart"
        assert "hibari" in caplog.text and "heart" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        await tts.aclose()


async def test_create_tts_warns_loudly_that_edge_and_openai_need_the_network(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="rtcvoice.engines.tts"):
        edge = create_tts(SETTINGS.replace(tts="edge", tts_voice="en-GB-SoniaNeural"))
        openai_tts = create_tts(SETTINGS.replace(tts="openai", openai_api_key="sk-x", tts_voice="echo"))
    try:
        assert isinstance(edge, EdgeTts) and edge.default_voice == "en-GB-SoniaNeural"
        assert isinstance(openai_tts, OpenAISpeechTts) and openai_tts.default_voice == "echo"
        assert openai_tts.model == "tts-1"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("edge" in w and "INTERNET" in w for w in warnings)
        assert any("api.openai.com" in w and "NETWORK" in w for w in warnings)
    finally:
        await edge.aclose()
        await openai_tts.aclose()


async def test_create_tts_local_endpoints_are_not_reported_as_network(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="rtcvoice.engines.tts"):
        tts = create_tts(
            SETTINGS.replace(tts="openai", tts_base_url="http://127.0.0.1:8000/v1", tts_model="kokoro")
        )
    try:
        assert isinstance(tts, OpenAISpeechTts) and tts.model == "kokoro"
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        await tts.aclose()


def test_create_tts_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "edge_tts" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(TtsError, match=r"pip install 'rtcvoice\[edge\]'"):
        create_tts(SETTINGS.replace(tts="edge"))


def test_create_tts_errors_are_clear(no_hibari_downloads: Path) -> None:
    with pytest.raises(TtsError, match="hibari, edge, openai or tone"):
        create_tts(SETTINGS.replace(tts="festival"))
    with pytest.raises(TtsError, match="OPENAI_API_KEY"):
        create_tts(SETTINGS.replace(tts="openai"))
    with pytest.raises(TtsError, match="Valid voices: heart"):
        create_tts(SETTINGS.replace(tts="hibari", tts_voice="alloy"))


async def test_tone_tts_answers_instantly_with_an_audible_beep_per_piece() -> None:
    from rtcvoice.engines.tts.tone import ToneTts

    tts = ToneTts()
    chunks = [c async for c in tts.synthesize("three short words")]
    assert len(chunks) == 1 and chunks[0].dtype == np.float32
    assert chunks[0].size == int(0.36 * tts.sample_rate) and float(np.abs(chunks[0]).max()) > 0.2
    assert [v.id for v in tts.voices()] == ["tone"]
