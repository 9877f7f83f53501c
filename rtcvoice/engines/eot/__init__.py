"""Models of whether the caller has finished their turn: the semantic half of end-of-turn detection.

Each model answers one question about an utterance that has just gone quiet: how likely is it
that the caller is done (rather than pausing to think)? The conversation's turn policy
(``rtcvoice.conversation.endpointing``) turns that probability into how much silence ends the
turn. Models look at the transcript made during the silence, at the audio, or at both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ...audio import FloatAudio
from ..base import EngineError

if TYPE_CHECKING:
    from ...settings import Settings

MODEL_NAMES = ("words", "smart-turn", "llm")


class EndOfTurnModel(Protocol):
    """P(the caller is done) for an utterance that has just gone quiet."""

    name: str

    def probability(self, text: str, audio: FloatAudio) -> float:
        """``text``: the transcript so far; ``audio``: the utterance, 16 kHz mono float32.

        Blocking (CPU): the conversation calls it from an executor. Returns a value in [0, 1].
        """
        ...


def create_eot_models(settings: Settings) -> list[EndOfTurnModel]:
    """The models ``turn_models`` names, for ``turn_policy=semantic`` (none for the other policies).

    Raises EngineError naming the setting when a model is unknown or cannot load.
    """
    if settings.turn_policy != "semantic":
        return []
    names = [n.strip() for n in settings.turn_models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown or not names:
        raise EngineError(
            f"turn_models={settings.turn_models!r}: choose from {', '.join(MODEL_NAMES)} "
            "(comma-separated), or set turn_policy=silence",
            code="invalid_turn_models",
        )
    models: list[EndOfTurnModel] = []
    for name in names:
        if name == "words":
            from .words import TrailingWordsModel

            models.append(TrailingWordsModel())
        elif name == "smart-turn":
            from .smart_turn import SmartTurnModel

            try:
                models.append(SmartTurnModel.load())
            except (FileNotFoundError, OSError) as exc:
                raise EngineError(f"turn_models=smart-turn: {exc}", code="turn_model_missing") from exc
        else:
            from .llm import LlamaEndOfTurn

            try:
                models.append(LlamaEndOfTurn.load())
            except (FileNotFoundError, OSError, ImportError) as exc:
                raise EngineError(f"turn_models=llm: {exc}", code="turn_model_missing") from exc
    return models
