"""What a client chooses for its call when it starts it, read from the start request and checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..conversation.config import SessionConfig
from ..conversation.events import EventError, session_choices
from ..engines import Engines
from .errors import ApiError

if TYPE_CHECKING:
    from ..conversation import Conversation

MIN_OUTPUT_RATE, MAX_OUTPUT_RATE = 8_000, 48_000
SESSION_TYPES = ("voice", "text")
# The names other systems give the same choices in their start requests.
ALIASES = {
    "model_name": "model",
    "modelName": "model",
    "max_response_output_tokens": "max_tokens",
    "sessionType": "session_type",
    "outputSampleRate": "output_sample_rate",
}


@dataclass(frozen=True)
class CallOptions:
    """What a client chose for its call when it started it; what it left out keeps the server's default."""

    # Checked session settings, as a session.update would carry them (voice, language, model...).
    choices: dict[str, Any] = field(default_factory=dict)
    # "text": the client speaks and listens itself; the call sends no audio (and takes none).
    session_type: str = "voice"
    output_sample_rate: int | None = None

    @property
    def speaks(self) -> bool:
        return self.session_type == "voice"

    @property
    def language(self) -> str | None:
        value = self.choices.get("language")
        return value if isinstance(value, str) else None

    def apply(self, conversation: Conversation) -> None:
        # Checked when the call was asked for; the same engines serve it now.
        conversation.config.update(conversation.engines, self.choices, speaks=self.speaks)
        if "tools" in self.choices:  # the page's own tools, declared when it starts the call
            conversation.tools.declare(self.choices["tools"])


def call_options(engines: Engines, body: dict[str, Any]) -> CallOptions:
    """The options in a session-start body (snake_case or camelCase), checked against the engines.

    The same checks as a ``session.update``: anything the configured engines cannot serve is a
    400 that says what and why, so a call asked for in Hindi is refused, not answered in English.
    """
    fields = {ALIASES.get(k, k): v for k, v in body.items() if v is not None}
    session_type = fields.get("session_type", "voice")
    if session_type not in SESSION_TYPES:
        raise ApiError(400, "invalid_field", f"'session_type' must be one of {', '.join(SESSION_TYPES)}.")
    rate = fields.get("output_sample_rate")
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int) or not MIN_OUTPUT_RATE <= rate <= MAX_OUTPUT_RATE
    ):
        raise ApiError(
            400,
            "invalid_field",
            f"'output_sample_rate' must be a whole number from {MIN_OUTPUT_RATE} to {MAX_OUTPUT_RATE}.",
        )
    speaks = session_type == "voice"
    try:
        choices = session_choices(fields)
    except EventError as exc:
        raise ApiError(400, "invalid_field", exc.message) from None
    # Tried on a scratch configuration: the first choice the engines refuse is the answer.
    scratch = SessionConfig(voice="", instructions="", language="en", speed=1.0)
    refused = scratch.update(engines, choices, speaks=speaks)
    if refused:
        raise ApiError(400, refused[0].code, str(refused[0]))
    if "language" in choices:
        choices["language"] = scratch.language  # "en-US" is kept as "en"
    return CallOptions(
        choices=choices,
        session_type=session_type,
        output_sample_rate=rate,
    )
