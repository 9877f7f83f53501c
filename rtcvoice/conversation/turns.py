"""A turn's record, and the detection of speech and silence from per-window speech probabilities.

The detector is pure logic (no I/O, no clock): the conversation feeds it Silero probabilities and
acts on what it returns, which keeps the thresholds testable with synthetic sequences. How much
silence ends a turn is the turn policy's to say (endpointing.py); the detector's own silence is
the ceiling.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from ..audio import Int16Audio
from ..engines.base import ChatMessage
from .endpointing import Verdict


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


@dataclass
class Turn:
    id: str
    source: Literal["voice", "text"]
    user_text: str = ""
    ai_text: str = ""
    # (start, end, text) of each piece of speech queued in the sink, in sink positions.
    spoken: list[tuple[int, int, str]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    metrics_sent: bool = False
    # A turn started during the end-of-turn silence runs ahead: its audio waits for ``committed``
    # (the silence really ended the turn; see Conversation._speculate). Its events wait in
    # ``held`` until ``shown``, which for a voice turn also waits for its transcript to be
    # stored: the client never sees a transcript the thread does not have.
    speculative: bool = False
    committed: asyncio.Event = field(default_factory=asyncio.Event)
    shown: bool = True
    held: list[Callable[[], None]] = field(default_factory=list)
    user_message: ChatMessage | None = None
    user_message_id: str | None = None  # the stored user message (tool calls are kept after it)
    reply_id: str | None = None  # the stored assistant message
    reply_message: ChatMessage | None = None  # the assistant message, as far as it was heard
    usage: dict[str, int] | None = None
    underruns: int = 0
    finished: bool = False
    # The turn policy's verdict, made during the silence (speculative turns only).
    verdict: Verdict | None = None
    # The silence that ended the turn (the verdict's, or the detector's ceiling); None when the
    # turn was ended without one (end_of_input, a whole recording, the length limit).
    silence_ms: float | None = None
    # The caller's speech (32 ms windows) and when the turn ended: a caller who goes on speaking
    # soon after is heard whole, this audio and the new words as one turn.
    audio: list[Int16Audio] = field(default_factory=list)
    ended_at: float | None = None
    # The turn this one goes on with: it ended too early and the caller went on speaking.
    continues: str | None = None
    # The tool calls and results of this reply (tool_calls.py), kept in the history before it.
    tool_messages: list[ChatMessage] = field(default_factory=list)
    hang_up: bool = False  # the AI ended the call (end_call): it ends once this reply is heard

    def __post_init__(self) -> None:
        if not self.speculative:
            self.committed.set()
        if self.source == "voice":
            self.shown = False

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic())

    def said_before(self, heard: int) -> str:
        """What the listener heard: every piece whose first sample was played before ``heard``."""
        return " ".join(text for start, _end, text in self.spoken if start < heard).strip()

    def metrics(self) -> dict[str, float | None]:
        m = self.marks

        def span(a: str, b: str) -> float | None:
            return round((m[b] - m[a]) * 1000.0, 1) if a in m and b in m else None

        overhead = compute_after = None
        if "turn_end" in m and "tts_first_audio" in m:
            # The part of STT + LLM + TTS that speculation did not hide behind the silence.
            compute_after = round(max(0.0, m["tts_first_audio"] - m["turn_end"]) * 1000.0, 1)
        eot = span("speech_end", "turn_end")
        if eot is not None and "first_audio_played" in m and "tts_first_audio" in m:
            # Time that is neither the configured silence nor STT/LLM/TTS compute: VAD and
            # executor hops before the turn ends, then queueing and pacing after the audio is ready.
            ready = max(m["turn_end"], m["tts_first_audio"])
            # A turn ended by the client (end_of_input) or by length waited for no silence.
            waited = max(0.0, eot - self.silence_ms) if self.silence_ms is not None else 0.0
            overhead = round(waited + (m["first_audio_played"] - ready) * 1000.0, 1)
        return {
            "compute_after_turn_end": compute_after,
            "server_overhead": overhead,
            "end_of_turn": span("speech_end", "turn_end"),
            "stt": span("stt_start", "stt_end"),
            "llm_first_token": span("llm_start", "llm_first_token"),
            "llm_first_sentence": span("llm_start", "tts_start"),
            "tts_first_audio": span("tts_start", "tts_first_audio"),
            "voice_to_voice": span("speech_end", "first_audio_played"),
        }
