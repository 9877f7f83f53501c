"""``/api/v1/chat/audio?token=JWT``: a one-step voice chat socket on the app's own threads.

The call starts when the socket opens (no session/start): the token names the user, ``action``
messages drive it (transports/audio_chat.py), and its messages go to the thread the page names
with ``set_thread`` (the app's own id, adopted on first use) or to a new thread made with the
first message. With ``db_threads_table``/``db_messages_table`` pointing at the app's tables,
the app's text chat shows the voice turns. README "If you run the system of seed 003".
"""

from __future__ import annotations

from aiohttp import web

from ..transports.audio_chat import AudioChatPeer
from ..transports.websocket import AudioOut
from .auth import request_user
from .callers import check_capacity
from .calls import call_limits, prepare_call
from .errors import ApiError
from .fallback import HEARTBEAT_S, serve_socket
from .keys import ENGINES, SESSIONS, SETTINGS, STORE
from .threads import owned_thread

AUDIO_CHAT = "/api/v1/chat/audio"
# The AI's voice in pieces of this length, each a whole WAV: short enough that a barge-in is
# heard at once (what was sent cannot be recalled), long enough that a page playing Blobs one
# after another does not stutter.
WAV_CHUNK_S = 0.25
WAV_LEAD_S = 0.3


async def audio_chat_ws(request: web.Request) -> web.StreamResponse:
    app = request.app
    registry, settings, engines = app[SESSIONS], app[SETTINGS], app[ENGINES]
    user = request_user(request)
    if user is None:
        user = request.query.get("user_id") or None  # unauthenticated mode: the app may name its user
    check_capacity(app, user)
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=256 * 1024)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "websocket_required", "Connect with a WebSocket (Upgrade: websocket).")
    thread_id = request.query.get("threadId") or request.query.get("thread_id")
    if thread_id:
        thread_id = (
            await owned_thread(app[STORE], thread_id, user, create=settings.create_unknown_threads)
        ).id
    session = registry.create(user_id=user, thread_id=thread_id)
    make, recorder = await prepare_call(app, session_id=session.id, user_id=user, thread_id=thread_id)
    await ws.prepare(request)

    async def stop() -> None:
        await registry.end(session.id, "client_stop")

    peer = AudioChatPeer(
        session_id=session.id,
        ws=ws,
        make_conversation=make,
        executor=engines.audio_executor,
        limits=call_limits(settings),
        output=AudioOut(
            sample_rate=engines.tts.sample_rate, chunk_s=WAV_CHUNK_S, lead_s=WAV_LEAD_S, container="wav"
        ),
        on_stop=stop,
        stt_name=engines.stt.name,
    )
    await serve_socket(registry, session, peer, recorder)
    return ws


def routes() -> list[web.RouteDef]:
    return [web.get(AUDIO_CHAT, audio_chat_ws)]
