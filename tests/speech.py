"""Speech for tests, made by the project's own TTS, and word error rate for checking it."""

from __future__ import annotations

import re
from functools import lru_cache

import jiwer
import numpy as np

from rtcvoice.audio import STT_RATE, Int16Audio, float_to_int16, resample_pcm, trim_silence

TTS_RATE = 24_000


@lru_cache(maxsize=1)
def _hibari():  # type: ignore[no-untyped-def]
    from hibari import Hibari

    return Hibari()


@lru_cache(maxsize=32)
def speak(text: str, lead_s: float = 0.3, tail_s: float = 1.2) -> tuple[Int16Audio, int]:
    """``text`` spoken by hibari's voice with exactly ``lead_s``/``tail_s`` of silence around it.

    hibari pads ~0.3 s before and ~0.4 s after every sentence; that is cut first, so the pauses
    a test asks for are the pauses it gets.
    """
    audio = trim_silence(_hibari()(text, seed=1), TTS_RATE, keep_lead_s=0.0, keep_tail_s=0.0)
    pad = lambda s: np.zeros(int(s * TTS_RATE), np.float32)  # noqa: E731
    return float_to_int16(np.concatenate([pad(lead_s), audio, pad(tail_s)])), TTS_RATE


def at_16k(clip: tuple[Int16Audio, int]) -> Int16Audio:
    """A clip from :func:`speak` as the PCM16 16 kHz mono that WebSocket clients send."""
    return resample_pcm(clip[0], clip[1], STT_RATE)


def normalize(text: str) -> str:
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return " ".join(text.split())


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return float(jiwer.wer(ref, hyp))
