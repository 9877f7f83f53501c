"""The AI-service routes a backend calls on behalf of its users (README "If you run the system of seed 001").

A backend (Go, Node, ...) keeps its own session ids and relays its front end's audio:

- ``POST /internal/ai/session/start`` {session_id, language, model, session_type?, user_id?,
  thread_id?} opens a session under the backend's own id and answers {session_id, ws_url};
- ``GET /session/{id}/ws`` is that session's WebSocket: the same messages as
  ``/api/v1/voice/session/{id}/ws`` (binary PCM16 16 kHz in, ``end_of_input``, ``text_message``;
  ``partial_transcript``, ``final_transcript``, ``ai_text``, binary audio, ``end_of_response`` out);
- ``POST /internal/ai/session/end`` {session_id} ends it.

They take ``internal_token`` as a bearer secret when it is set, else the API's JWT auth.
"""

from __future__ import annotations

import re

from aiohttp import web

from .bodies import json_body, optional_str
from .callers import body_user, check_capacity
from .errors import ApiError
from .fallback import session_ws
from .keys import ENGINES, SESSIONS, SETTINGS, STORE
from .options import call_options
from .threads import owned_thread
from .urls import websocket_url

INTERNAL = "/internal/ai"
# A backend's session id goes into URLs and logs: letters, digits and -_.: only.
SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


async def internal_session_start(request: web.Request) -> web.Response:
    app = request.app
    body = await json_body(request)
    session_id = optional_str(body, "session_id", 128)
    if session_id is None or not SESSION_ID.match(session_id):
        raise ApiError(
            400, "invalid_field", "'session_id' must be 1-128 letters, digits or -_.: (your backend's id)."
        )
    registry, settings = app[SESSIONS], app[SETTINGS]
    if registry.get(session_id) is not None:
        raise ApiError(409, "session_exists", f"Session {session_id!r} is already open; end it first.")
    user = body_user(request, body)
    check_capacity(app, user)
    options = call_options(app[ENGINES], body)
    thread_id = optional_str(body, "thread_id", 200)
    thread = (
        await owned_thread(app[STORE], thread_id, user, create=settings.create_unknown_threads)
        if thread_id
        else None  # made with the call's first message
    )
    try:
        registry.create(
            user_id=user, thread_id=thread.id if thread else None, options=options, session_id=session_id
        )
    except KeyError:  # opened by a concurrent request since the check above
        raise ApiError(409, "session_exists", f"Session {session_id!r} is already open.") from None
    return web.json_response(
        {
            "session_id": session_id,
            "ws_url": websocket_url(request, f"/session/{session_id}/ws"),
            "language": options.language or settings.language,
            "session_type": options.session_type,
            "expires_in": settings.session_start_timeout_s,
        }
    )


async def internal_session_end(request: web.Request) -> web.Response:
    body = await json_body(request)
    session_id = body.get("session_id")
    if not isinstance(session_id, str):
        raise ApiError(400, "invalid_field", "Send {'session_id': <id>}.")
    ended = await request.app[SESSIONS].end(session_id, "backend_hangup")
    if not ended:
        raise ApiError(404, "session_not_found", f"No live session {session_id[:64]!r}.")
    return web.json_response({"session_id": session_id, "message": "Session ended successfully"})


def routes() -> list[web.RouteDef]:
    return [
        web.post(f"{INTERNAL}/session/start", internal_session_start),
        web.post(f"{INTERNAL}/session/end", internal_session_end),
        web.get("/session/{session_id}/ws", session_ws),
    ]
