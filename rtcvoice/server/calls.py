"""What every kind of call needs before it starts: its user, its thread, its history and recorder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..conversation import AudioSink, Conversation, ConversationFactory
from ..settings import Settings
from ..telemetry.logs import session_id_var
from ..transports.limits import CallLimits
from . import ops
from .keys import ENGINES, SETTINGS, STORE, TOOLS
from .options import CallOptions
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
    thread_id: str | None,
    options: CallOptions | None = None,
) -> tuple[ConversationFactory, ThreadRecorder]:
    """A factory for the call's Conversation (the transport supplies sink and send), and its recorder.

    The thread's earlier messages, typed or spoken, become the agent's context. ``thread_id``
    None: the thread is made when the call first has something to store.
    """
    store = app[STORE]
    history = await load_history(store, thread_id) if thread_id is not None else []
    recorder = ThreadRecorder(
        store,
        user_id=user_id,
        thread_id=thread_id,
        session_id=session_id,
        create_unknown=app[SETTINGS].create_unknown_threads,
    )
    chosen = options or CallOptions()

    def make(sink: AudioSink | None, send: Callable[[dict[str, Any]], None]) -> Conversation:
        settings, engines = app[SETTINGS], app[ENGINES]
        # Set in the transport's task before the Conversation exists: every task the call starts
        # from here on (turns, replies, speech) copies this context, so its log lines name the call.
        session_id_var.set(session_id)
        conversation = Conversation(
            session_id=session_id,
            settings=settings,
            engines=engines,
            vad=engines.vad.stream(),
            sink=sink,
            send=ops.observed(app, send, thread_id=thread_id),
            executor=engines.audio_executor,
            thread_id=thread_id,
            user_id=user_id,
            history=history,
            recorder=recorder,
            tools=app.get(TOOLS),
        )
        chosen.apply(conversation)
        recorder.on_thread = conversation.thread_created
        return conversation

    return make, recorder
