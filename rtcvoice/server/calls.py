"""What every kind of call needs before it starts: its user, its thread, its history and recorder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..conversation import AudioSink, Conversation, ConversationFactory
from ..settings import Settings
from ..transports.limits import CallLimits
from .keys import ENGINES, SETTINGS, STORE
from .threads import ThreadRecorder, load_history


def call_limits(settings: Settings) -> CallLimits:
    return CallLimits(
        max_call_s=settings.max_call_s,
        idle_timeout_s=settings.idle_timeout_s,
        peer_timeout_s=settings.peer_timeout_s,
        event_rate_per_s=settings.event_rate_per_s,
        event_burst=max(1, int(settings.event_rate_per_s * 2)),
    )


async def prepare_call(
    app: web.Application,
    *,
    session_id: str,
    user_id: str | None,
    thread_id: str,
    voice: str | None = None,
    instructions: str | None = None,
) -> tuple[ConversationFactory, ThreadRecorder]:
    """A factory for the call's Conversation (the transport supplies sink and send), and its recorder.

    The thread's earlier messages, typed or spoken, become the agent's context.
    """
    store = app[STORE]
    history = await load_history(store, thread_id)
    recorder = ThreadRecorder(store, user_id=user_id, thread_id=thread_id, session_id=session_id)

    def make(sink: AudioSink, send: Callable[[dict[str, Any]], None]) -> Conversation:
        settings, engines = app[SETTINGS], app[ENGINES]
        conversation = Conversation(
            session_id=session_id,
            settings=settings,
            engines=engines,
            vad=engines.vad.stream(),
            sink=sink,
            send=send,
            executor=engines.audio_executor,
            thread_id=thread_id,
            user_id=user_id,
            history=history,
            recorder=recorder,
        )
        if voice:
            conversation.config.voice = voice
        if instructions:
            conversation.config.instructions = instructions
        return conversation

    return make, recorder
