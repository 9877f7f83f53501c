"""What a session has chosen (voice, language, instructions, model, sampling) and how a client changes it.

Every choice is checked against the engines that would serve it: a voice the TTS lacks, a
language an engine cannot serve or a model the agent cannot switch to is refused with the reason,
and the other choices in the same update still apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..engines.agents import check_model
from ..engines.base import EngineError, Engines
from ..engines.languages import check_language


@dataclass
class SessionConfig:
    voice: str
    instructions: str
    language: str
    speed: float
    # The agent's own defaults apply where these are None.
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    timezone: str | None = None  # the caller's, for tools (current_time)

    def update(self, engines: Engines, data: dict[str, Any], *, speaks: bool) -> list[EngineError]:
        """Apply the fields of a parsed ``session.update``; returns what was refused, one error each.

        ``speaks``: the call has audio, so the STT and TTS must serve its language too (a text-only
        call, whose client recognises and speaks itself, needs only the agent).
        """
        refused: list[EngineError] = []
        if "language" in data:
            try:
                self.language = check_language(engines, data["language"], speech_in=speaks, speech_out=speaks)
            except EngineError as exc:
                refused.append(exc)
            else:
                if "voice" not in data:
                    self.voice = voice_for(engines, self.language, self.voice)
        if "voice" in data:
            known = {v.id for v in engines.tts.voices()}
            if known and data["voice"] not in known:
                refused.append(
                    EngineError(
                        f"Unknown voice {data['voice'][:64]!r}; see GET /api/v1/voice/voices.",
                        code="invalid_voice",
                    )
                )
            else:
                self.voice = data["voice"]
        if "model" in data:
            try:
                check_model(engines.agent, data["model"])
            except EngineError as exc:
                refused.append(exc)
            else:
                self.model = data["model"]
        if "instructions" in data:
            self.instructions = data["instructions"]
        if "speed" in data:
            self.speed = float(data["speed"])
        if "temperature" in data:
            self.temperature = float(data["temperature"])
        if "max_tokens" in data:
            self.max_tokens = int(data["max_tokens"])
        if "timezone" in data:
            try:
                ZoneInfo(data["timezone"])
            except (ZoneInfoNotFoundError, ValueError):
                refused.append(
                    EngineError(f"Unknown time zone {data['timezone'][:64]!r}.", code="invalid_timezone")
                )
            else:
                self.timezone = data["timezone"]
        return refused

    def as_event(self) -> dict[str, Any]:
        """The choices in force, as ``session.updated`` reports them."""
        return {
            "voice": self.voice,
            "language": self.language,
            "speed": self.speed,
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "timezone": self.timezone,
        }


def voice_for(engines: Engines, language: str, current: str) -> str:
    """The current voice if it speaks ``language``, else the first one that does."""
    speaks = [v.id for v in engines.tts.voices() if v.language.split("-")[0].lower() == language]
    if not speaks or current in speaks:
        return current
    return speaks[0]
