"""Measure the pauses inside single utterances, to choose ``end_of_turn_silence_ms``.

    .venv/bin/python bench/pauses.py      (needs espeak-ng for the second voice)

Speaks multi-clause sentences with hibari and espeak-ng (two rates), runs the same Silero VAD
the server uses, and prints every silent gap between speech windows inside an utterance. The
end-of-turn silence must be longer than these, or the server answers half a sentence.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from speech import speak  # noqa: E402

from rtcvoice.audio import Int16Audio, int16_to_float, read_wav, resample_pcm  # noqa: E402
from rtcvoice.engines.vad import WINDOW_MS, SileroVad  # noqa: E402

TEXTS = [
    "Well, I was wondering, if it is not too much trouble, whether you could help me plan a trip to Rome.",
    "My name is Anna, I live in Berlin, and I would like to book a table for four people tomorrow evening.",
    "So the thing is, um, my laptop keeps crashing, especially when I open the browser, and I do not know why.",
    "Can you tell me, roughly, how long it takes to drive from Boston to New York on a Friday afternoon?",
    "First, preheat the oven; then, mix the flour and the eggs; finally, bake it for twenty minutes.",
]


def gaps_ms(vad: SileroVad, pcm: Int16Audio, rate: int, off_threshold: float = 0.35) -> list[int]:
    probs = np.array(vad.stream().process(int16_to_float(resample_pcm(pcm, rate, 16_000))))
    speech = np.flatnonzero(probs >= off_threshold)
    if speech.size == 0:
        return []
    out, run = [], 0
    for is_speech in probs[speech[0] : speech[-1] + 1] >= off_threshold:
        if not is_speech:
            run += 1
        elif run:
            out.append(run * WINDOW_MS)
            run = 0
    return out


def main() -> None:
    vad = SileroVad()
    gaps: list[int] = []
    for text in TEXTS:
        gaps += gaps_ms(vad, *speak(text))
        if shutil.which("espeak-ng"):
            with tempfile.NamedTemporaryFile(suffix=".wav") as f:
                for words_per_minute in ("140", "175"):
                    subprocess.run(["espeak-ng", "-s", words_per_minute, "-w", f.name, text], check=True)
                    gaps += gaps_ms(vad, *read_wav(f.name))
    print("pauses inside utterances (ms):", sorted(gaps))
    print(f"max {max(gaps)} ms, p95 {np.percentile(gaps, 95):.0f} ms, over {len(gaps)} pauses")


if __name__ == "__main__":
    main()
