"""The conversation layer: one call's turn-taking, independent of any transport."""

from .conversation import AudioSink, Conversation, ConversationFactory, Turn
from .events import ClientEvent, EventError, parse_client_event

__all__ = [
    "AudioSink",
    "Conversation",
    "ConversationFactory",
    "Turn",
    "ClientEvent",
    "EventError",
    "parse_client_event",
]
