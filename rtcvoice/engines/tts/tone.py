"""A diagnostic TTS that answers each piece of text with a short tone, instantly.

With the echo agent it makes an "instant agent and TTS": what a benchmark then measures is the
transport, the turn-taking and the server itself (``rtcvoice bench --instant``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from ..base import FloatAudio, Voice

RATE = 24_000


class ToneTts:
    name = "tone"
    languages = None  # a beep has no language
    sample_rate = RATE
    default_voice = "tone"

    def __init__(self, seconds_per_word: float = 0.12) -> None:
        self._seconds_per_word = seconds_per_word

    async def synthesize(
        self, text: str, *, voice: str | None = None, speed: float = 1.0
    ) -> AsyncIterator[FloatAudio]:
        words = max(1, len(text.split()))
        n = int(RATE * self._seconds_per_word * words / max(0.5, speed))
        t = np.arange(n, dtype=np.float32) / RATE
        yield (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)

    def voices(self) -> list[Voice]:
        return [Voice(id="tone", name="Tone (diagnostic)", gender="none", language="en-US", engine="tone")]

    async def warm_up(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
