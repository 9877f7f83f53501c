"""What a client chooses for its call when it starts it, read from the start request and checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..conversation.events import MAX_TEXT_CHARS, MAX_TOKENS_LIMIT
from ..engines import EngineError, Engines
from ..engines.agents import check_model
from ..engines.languages import check_language
from .bodies import optional_str
from .errors import ApiError

if TYPE_CHECKING:
    from ..conversation import Conversation

MIN_OUTPUT_RATE, MAX_OUTPUT_RATE = 8_000, 48_000
SESSION_TYPES = ("voice", "text")


@dataclass(frozen=True)
class CallOptions:
    """What a client chose for its call when it started it; None leaves the server's default."""

    voice: str | None = None
    instructions: str | None = None
    language: str | None = None
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    # "text": the client speaks and listens itself; the call sends no audio (and takes none).
    session_type: str = "voice"
    output_sample_rate: int | None = None

    @property
    def speaks(self) -> bool:
        return self.session_type == "voice"

    def apply(self, conversation: Conversation) -> None:
        config = conversation.config
        for name in ("voice", "instructions", "language", "model", "temperature", "max_tokens"):
            value = getattr(self, name)
            if value is not None:
                setattr(config, name, value)
        if self.language is not None and self.voice is None:
            config.voice = conversation.voice_for(self.language, config.voice)


def call_options(engines: Engines, body: dict[str, Any]) -> CallOptions:
    """The options in a session-start body (snake_case or camelCase), checked against the engines.

    Anything the configured engines cannot serve is a 400 that says what and why: a call asked
    for in Hindi is refused, not answered in English.
    """
    session_type = _field(body, "session_type", "sessionType") or "voice"
    if session_type not in SESSION_TYPES:
        raise ApiError(400, "invalid_field", f"'session_type' must be one of {', '.join(SESSION_TYPES)}.")
    speaks = session_type == "voice"
    voice = _field(body, "voice", max_len=200)
    if voice is not None and voice not in {v.id for v in engines.tts.voices()}:
        raise ApiError(400, "invalid_voice", f"Unknown voice {voice[:64]!r}; see GET /api/v1/voice/voices.")
    language = _field(body, "language", max_len=35)
    model = _field(body, "model", "model_name", "modelName", max_len=200)
    try:
        if language is not None:
            language = check_language(engines, language, speech_in=speaks, speech_out=speaks)
        if model is not None:
            check_model(engines.agent, model)
    except EngineError as exc:
        raise ApiError(400, exc.code, str(exc)) from None
    return CallOptions(
        voice=voice,
        instructions=_field(body, "instructions", max_len=MAX_TEXT_CHARS),
        language=language,
        model=model,
        temperature=_number(body, 0.0, 2.0, "temperature"),
        max_tokens=_whole(body, 1, MAX_TOKENS_LIMIT, "max_tokens", "max_response_output_tokens"),
        session_type=session_type,
        output_sample_rate=_whole(
            body, MIN_OUTPUT_RATE, MAX_OUTPUT_RATE, "output_sample_rate", "outputSampleRate"
        ),
    )


def _field(body: dict[str, Any], *names: str, max_len: int = 4000) -> str | None:
    for name in names:
        if body.get(name) is not None:
            return optional_str(body, name, max_len)
    return None


def _number(body: dict[str, Any], low: float, high: float, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, "invalid_field", f"'{name}' must be a number from {low:g} to {high:g}.")
    return float(value)


def _whole(body: dict[str, Any], low: int, high: int, *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ApiError(400, "invalid_field", f"'{name}' must be a whole number from {low} to {high}.")
        return value
    return None
