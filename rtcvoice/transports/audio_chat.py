"""The audio-chat WebSocket dialect: ``action`` messages in, ``status`` and ``transcript`` out.

For an app whose page opens one authenticated socket and drives the call with actions (README
"If you run the system of seed 003"):

in:  ``{action: 'start', model, language}``, ``{action: 'set_thread', threadId}``,
     ``{action: 'stop'}``; binary PCM16 16 kHz mono, as ``/static/audio-processor.js`` posts it.
     The session WebSocket's own ``{type: ...}`` events are understood too.
out: every session-WebSocket event, with ``final_transcript`` also carrying ``transcript``;
     ``{type: 'status', message}`` as the call starts, listens, thinks, speaks, changes thread
     and is saved; and the AI's voice as binary frames, each a whole WAV file (PCM16 mono),
     so a page can hand each Blob to ``decodeAudioData`` or an ``<audio>`` element as it is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .websocket import WebSocketPeer

log = logging.getLogger(__name__)

STATUS = {
    "listening": "Listening...",
    "thinking": "Thinking...",
    "speaking": "Speaking...",
}


class AudioChatPeer(WebSocketPeer):
    """A session WebSocket that also speaks the action dialect. ``stop`` ends the call via ``on_stop``."""

    def __init__(self, *, on_stop: Callable[[], Awaitable[None]], stt_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_stop = on_stop
        self._stt_name = stt_name

    def _send_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "final_transcript":
            event = {**event, "transcript": event.get("text", "")}
        super()._send_event(event)
        message = self._status(event)
        if message:
            super()._send_event({"type": "status", "session_id": self.session_id, "message": message})

    def _status(self, event: dict[str, Any]) -> str | None:
        kind = event.get("type")
        if kind == "state":
            return STATUS.get(str(event.get("state")))
        if kind == "thread.updated":
            return f"Conversation thread {event.get('thread_id')}"
        if kind == "session.ended":
            return f"Conversation saved ({event.get('reason', 'ended')})"
        return None

    async def on_text(self, raw: str) -> None:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        action = data.get("action") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(action, str):
            await super().on_text(raw)  # a {type: ...} event, or a mistake it will explain
        elif action == "start":
            await self._start(data)
        elif action == "set_thread":
            thread_id = data.get("threadId", data.get("thread_id"))
            if isinstance(thread_id, int) and not isinstance(thread_id, bool):
                # An app whose threads have integer keys (Sequelize's default) sends its id as a
                # number; the store takes every id as text and converts it to the column's type.
                thread_id = str(thread_id)
            await super().on_text(json.dumps({"type": "set_thread", "thread_id": thread_id}))
        elif action == "stop":
            await self._on_stop()
        else:
            self._send_event(
                {
                    "type": "error",
                    "session_id": self.session_id,
                    "code": "unknown_action",
                    "message": f"Unknown action {action[:64]!r}; expected start, set_thread or stop.",
                }
            )

    async def _start(self, data: dict[str, Any]) -> None:
        """``start``: the call already listens; this applies its language and says what serves it."""
        language = data.get("language")
        if isinstance(language, str):
            self.conversation.update_session({"language": language})
        model = data.get("model")
        note = ""
        if isinstance(model, str) and model:
            # The app names a speech-recognition model of its previous provider (e.g. nova-3);
            # this server transcribes with its own, and says so rather than pretending.
            note = f" (speech recognition: {self._stt_name}; '{model[:40]}' is not available here)"
        self._send_event(
            {
                "type": "status",
                "session_id": self.session_id,
                "message": f"Voice chat started in {self.conversation.config.language}{note}",
            }
        )
