"""Whisper's short window: as accurate as the full one on short turns, never used where it cannot be."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from speech import speak, wer

from rtcvoice.audio import STT_RATE, int16_to_float, resample_pcm
from rtcvoice.engines import Engines
from rtcvoice.engines.stt.whisper import WhisperStt

SHORT = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Please remind me to call my mother at seven thirty tonight.",
]
LONG = (
    "I am planning a birthday party for my daughter next Saturday, and I need ideas for games that "
    "ten children can play indoors, because the weather forecast says it will rain all afternoon."
)


def audio(text: str) -> np.ndarray:
    pcm, rate = speak(text, lead_s=0.2, tail_s=0.3)
    return int16_to_float(resample_pcm(pcm, rate, STT_RATE))


class Paths:
    """Counts which decoding path each transcription took."""

    def __init__(self, stt: WhisperStt, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = 0
        self.window_results: list[str | None] = []
        full, window = stt._transcribe_full, stt._transcribe_window

        def count_full(*args: Any) -> str:
            self.full += 1
            return full(*args)

        def count_window(*args: Any) -> str | None:
            result = window(*args)
            self.window_results.append(result)
            return result

        monkeypatch.setattr(stt, "_transcribe_full", count_full)
        monkeypatch.setattr(stt, "_transcribe_window", count_window)


@pytest.fixture
def stt(shared_engines: Engines) -> WhisperStt:
    assert isinstance(shared_engines.stt, WhisperStt)
    return shared_engines.stt


async def test_short_turns_are_transcribed_in_the_short_window_as_well_as_in_the_full_one(
    stt: WhisperStt, monkeypatch: pytest.MonkeyPatch
) -> None:
    full_window = WhisperStt(window_s=30.0)
    try:
        paths = Paths(stt, monkeypatch)
        for text in SHORT:
            clip = audio(text)
            short, full = await stt.transcribe(clip), await full_window.transcribe(clip)
            assert wer(text, short) <= wer(text, full) + 0.1, (text, short, full)
            assert wer(text, short) <= 0.2, (text, short)
        assert paths.full == 0 and len(paths.window_results) == len(SHORT), vars(paths)
    finally:
        await full_window.aclose()


async def test_a_turn_longer_than_the_window_is_transcribed_to_its_last_word(
    stt: WhisperStt, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = audio(LONG)
    assert clip.size / STT_RATE > 9.0  # would not fit the 10 s window with room to spare
    paths = Paths(stt, monkeypatch)
    text = await stt.transcribe(clip)
    assert paths.full == 1 and not paths.window_results
    assert wer(LONG, text) <= 0.2, text
    assert "afternoon" in text.lower()


async def test_silence_and_noise_give_no_words_in_the_short_window(stt: WhisperStt) -> None:
    rng = np.random.default_rng(3)
    for clip in (np.zeros(STT_RATE, np.float32), rng.normal(0, 0.01, STT_RATE).astype(np.float32)):
        text = await stt.transcribe(clip)
        assert not any(ch.isalnum() for ch in text), text


async def test_a_window_too_short_for_whisper_falls_back_instead_of_repeating_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 3.3 s window makes tiny.en loop ("What time is it? What time is it? ..."); the loop is
    # caught and the turn is transcribed again in the full window.
    tiny_window = WhisperStt(window_s=3.3)
    try:
        paths = Paths(tiny_window, monkeypatch)
        text = "What time is it?"
        heard = await tiny_window.transcribe(audio(text))
        assert paths.window_results == [None] and paths.full == 1, vars(paths)
        assert wer(text, heard) <= 0.2, heard
    finally:
        await tiny_window.aclose()


async def test_a_cancelled_transcription_counts_as_pending_until_its_pass_ends(
    stt: WhisperStt, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A partial overtaken by the end of the turn is cancelled, but Whisper cannot stop mid-pass:
    # until the pass ends the model is busy, and optional work must not be queued behind it.
    import threading

    entered, release = threading.Event(), threading.Event()
    passes: list[str] = []
    transcribe = stt._transcribe

    def slow(*args: Any) -> str:
        entered.set()
        release.wait(10)
        text = transcribe(*args)
        passes.append(text)
        return text

    monkeypatch.setattr(stt, "_transcribe", slow)
    running = asyncio.create_task(stt.transcribe(audio(SHORT[0])))
    assert await asyncio.to_thread(entered.wait, 10)
    queued = asyncio.create_task(stt.transcribe(audio(SHORT[1])))
    await asyncio.sleep(0.05)
    assert stt.pending == 2
    for task in (running, queued):
        task.cancel()
    await asyncio.gather(running, queued, return_exceptions=True)
    assert stt.pending == 1  # the running pass; the queued one was dropped before it began
    release.set()
    for _ in range(200):
        if stt.pending == 0:
            break
        await asyncio.sleep(0.05)
    assert stt.pending == 0 and len(passes) == 1


BLAS_THREADS = """
import asyncio, json
import numpy
from threadpoolctl import threadpool_info
from rtcvoice.engines import load_engines
from rtcvoice.settings import Settings

def blas_threads():
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

before = blas_threads()
engines = asyncio.run(load_engines(Settings.from_env({}, agent="echo", tts="tone"), warm=False))
print(json.dumps({"before": before, "after": blas_threads()}))
"""


def test_numpy_blas_runs_one_thread_once_the_engines_load() -> None:
    """OpenBLAS's spare threads spin for work beside Whisper's encoder: on 2 cores a pass took half
    again as long and twice the CPU (rtcvoice/engines/blas.py). In a fresh process, as the limit is
    process-wide and this run's engines are already loaded."""
    done = subprocess.run(
        [sys.executable, "-c", BLAS_THREADS], capture_output=True, text=True, timeout=120, check=True
    )
    threads = json.loads(done.stdout.strip().splitlines()[-1])
    if max(threads["before"], default=1) < 2:
        pytest.skip("NumPy's BLAS runs one thread here anyway (one core, or no OpenBLAS)")
    assert threads["after"] and set(threads["after"]) == {1}
