"""Measure the pauses inside single utterances, to choose the end-of-turn silences.

    .venv/bin/python bench/pauses.py      (needs espeak-ng for the second voice)

Speaks multi-clause sentences with hibari and espeak-ng (two rates), runs the same Silero VAD
the server uses, and prints every silent gap between speech windows inside an utterance. The
end-of-turn silence must be longer than these, or the server answers half a sentence.

It also transcribes each utterance up to each pause, as the server does during the silence, and
lists the pauses after which the transcript already ended in "?": the shorter silence the server
allows a question (``--question-end-of-turn-ms``) must be longer than those.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from speech import speak  # noqa: E402

from rtcvoice.audio import STT_RATE, Int16Audio, int16_to_float, read_wav, resample_pcm  # noqa: E402
from rtcvoice.engines.stt.whisper import WhisperStt  # noqa: E402
from rtcvoice.engines.vad import WINDOW, WINDOW_MS, SileroVad  # noqa: E402

TEXTS = [
    "Well, I was wondering, if it is not too much trouble, whether you could help me plan a trip to Rome.",
    "My name is Anna, I live in Berlin, and I would like to book a table for four people tomorrow evening.",
    "So the thing is, um, my laptop keeps crashing, especially when I open the browser, and I do not know why.",
    "Can you tell me, roughly, how long it takes to drive from Boston to New York on a Friday afternoon?",
    "First, preheat the oven; then, mix the flour and the eggs; finally, bake it for twenty minutes.",
    "Could you tell me how far it is from the earth to the moon, and how long the trip takes?",
    "Do you know, by any chance, whether the museum is open on Mondays?",
    "Hmm, let me think. What was the name of that movie with the talking car?",
    "I was going to ask you about, uh, the weather, but actually, never mind, tell me a joke.",
]
OFF_THRESHOLD = 0.35  # the server's hysteresis: below this a window counts as silence


def gaps(vad: SileroVad, pcm: Int16Audio, rate: int) -> list[tuple[int, int]]:
    """(sample where the pause starts, its length in ms) for each pause inside the utterance."""
    audio = resample_pcm(pcm, rate, STT_RATE)
    speech = np.array(vad.stream().process(int16_to_float(audio))) >= OFF_THRESHOLD
    idx = np.flatnonzero(speech)
    if idx.size == 0:
        return []
    out, run = [], 0
    for i in range(idx[0], idx[-1] + 1):
        if not speech[i]:
            run += 1
        elif run:
            out.append(((i - run) * WINDOW, run * WINDOW_MS))
            run = 0
    return out


def voices(text: str) -> list[tuple[str, Int16Audio, int]]:
    out = [("hibari", *speak(text))]
    if shutil.which("espeak-ng"):
        with tempfile.NamedTemporaryFile(suffix=".wav") as f:
            for words_per_minute in ("140", "175"):
                subprocess.run(["espeak-ng", "-s", words_per_minute, "-w", f.name, text], check=True)
                out.append((f"espeak-ng {words_per_minute} wpm", *read_wav(f.name)))
    return out


async def main() -> None:
    vad, stt = SileroVad(), WhisperStt()
    pauses: list[int] = []
    questions: list[tuple[int, str]] = []
    try:
        for text in TEXTS:
            for _voice, pcm, rate in voices(text):
                audio = resample_pcm(pcm, rate, STT_RATE)
                for start, ms in gaps(vad, pcm, rate):
                    pauses.append(ms)
                    # What the server has transcribed one window into this pause.
                    heard = await stt.transcribe(int16_to_float(audio[: start + WINDOW]))
                    if heard.rstrip().endswith("?"):
                        questions.append((ms, heard))
    finally:
        await stt.aclose()
    print("pauses inside utterances (ms):", sorted(pauses))
    print(f"max {max(pauses)} ms, p95 {np.percentile(pauses, 95):.0f} ms, over {len(pauses)} pauses")
    print(f"pauses after which the transcript already read as a question ({len(questions)}):")
    for ms, heard in sorted(questions):
        print(f"  {ms:4d} ms  {heard}")


if __name__ == "__main__":
    asyncio.run(main())
