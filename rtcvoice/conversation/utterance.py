"""The caller's current utterance: its 32 ms windows, how loud it got, when its last speech came."""

from __future__ import annotations

from collections import deque

import numpy as np

from ..audio import Int16Audio, rms_dbfs

# Silero's probability takes 1-4 windows to fall below the off threshold after the last word
# (median ~50 ms on the bench questions), while the level falls at once. A window this far below
# the loudest one so far, and this quiet in absolute terms, lets speculation start before the VAD
# agrees. Quiet closures inside words qualify too, so this starts (and drops) about half again
# as many transcriptions while the caller speaks: only when the shared model is idle, so it
# never queues in front of another call's turn (bench/README.md). In background noise the level
# never drops that far, and speculation waits for the VAD as before.
QUIET_BELOW_LOUDEST_DB = 35.0
QUIET_DBFS = -45.0
# ... and only where Silero's probability has begun to fall. Inside a word (a stop's closure) it
# stays near 1 through the quiet window; after the last word it falls over 1-4 windows. Replayed
# over the bench's and pauses.py's utterances, this gate kept 12 of the 16 windows the level rule
# gains and dropped two thirds of the transcriptions it started for nothing (231 -> 164 dropped).
QUIET_MAX_PROB = 0.8


class Utterance:
    """Windows since speech began, with the pre-roll kept from before the VAD fired (so the first
    syllable is transcribed)."""

    def __init__(self, pre_roll_windows: int) -> None:
        self._pre_roll: deque[Int16Audio] = deque(maxlen=max(1, pre_roll_windows))
        self.windows: list[Int16Audio] = []
        self.samples = 0
        self.loudest_db = -120.0
        self.speech_end_at: float | None = None  # when the last window of speech arrived

    def idle(self, window: Int16Audio) -> None:
        """A window outside speech: kept only as pre-roll."""
        self._pre_roll.append(window)

    def begin(self) -> None:
        """Speech was detected: the utterance starts with the pre-roll."""
        self.windows = list(self._pre_roll)
        self.samples = sum(w.size for w in self.windows)
        self._pre_roll.clear()
        self.loudest_db = max((rms_dbfs(w) for w in self.windows), default=-120.0)

    def add(self, window: Int16Audio, *, speech: bool, arrived: float) -> bool:
        """Append a window; returns whether it is quiet enough to mean the words have ended."""
        level = rms_dbfs(window)
        self.loudest_db = max(self.loudest_db, level)
        self.windows.append(window)
        self.samples += window.size
        if speech:
            self.speech_end_at = arrived
        return level < min(QUIET_DBFS, self.loudest_db - QUIET_BELOW_LOUDEST_DB)

    def prepend(self, windows: list[Int16Audio]) -> None:
        self.windows[:0] = windows
        self.samples += sum(w.size for w in windows)

    def audio(self) -> Int16Audio:
        return np.concatenate(self.windows) if self.windows else np.zeros(0, np.int16)

    def take(self) -> list[Int16Audio]:
        """The windows so far; the utterance starts empty again."""
        windows, self.windows, self.samples = self.windows, [], 0
        return windows
