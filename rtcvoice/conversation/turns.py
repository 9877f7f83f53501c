"""End-of-turn detection from a stream of per-window speech probabilities.

Pure logic (no I/O, no clock): the conversation feeds it Silero probabilities and acts on what it
returns, which keeps the thresholds testable with synthetic sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class TurnEvent(Enum):
    SPEECH_START = "speech_start"
    TURN_END = "turn_end"


@dataclass
class TurnDetector:
    window_ms: int
    threshold: float = 0.5
    min_speech_ms: int = 96
    end_silence_ms: int = 500

    def __post_init__(self) -> None:
        # Hysteresis: once speaking, a window must drop clearly below the threshold to count as silence.
        self.off_threshold = max(0.05, self.threshold - 0.15)
        self.min_speech_windows = max(1, math.ceil(self.min_speech_ms / self.window_ms))
        self.silence_windows = max(1, math.ceil(self.end_silence_ms / self.window_ms))
        self.reset()

    @property
    def silence_ms(self) -> int:
        """The silence so far, in whole windows."""
        return self.silence_run * self.window_ms

    @property
    def turn_end_silence_ms(self) -> int:
        """The silence that ends a turn, rounded up to whole windows."""
        return self.silence_windows * self.window_ms

    def reset(self) -> None:
        self.in_speech = False
        self.speech_run = 0
        self.silence_run = 0
        self.windows = 0
        self.last_speech_window = -1

    def feed(self, prob: float) -> TurnEvent | None:
        self.windows += 1
        if not self.in_speech:
            self.speech_run = self.speech_run + 1 if prob >= self.threshold else 0
            if self.speech_run >= self.min_speech_windows:
                self.in_speech = True
                self.silence_run = 0
                self.last_speech_window = self.windows - 1
                return TurnEvent.SPEECH_START
            return None
        if prob >= self.off_threshold:
            self.silence_run = 0
            self.last_speech_window = self.windows - 1
            return None
        self.silence_run += 1
        if self.silence_run >= self.silence_windows:
            self.in_speech = False
            self.speech_run = 0
            self.silence_run = 0
            return TurnEvent.TURN_END
        return None
