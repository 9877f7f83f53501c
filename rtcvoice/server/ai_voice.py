"""``/api/v1/ai/voice/*``: the REST endpoints of a React/Redux app's RTK Query voice slice.

Shapes as that slice reads them (``transformResponse: r => r.data``): every body is
``{"data": ...}`` and fields are camelCase. Errors stay ``{"error": {code, message}}`` with the
HTTP status, which RTK Query reports as the query's ``error``. README "If you run the system of
seed 000".
"""

from __future__ import annotations

from aiohttp import web

from .bodies import json_body
from .fallback import answer_transcript
from .keys import ENGINES

AI_VOICE = "/api/v1/ai/voice"


async def voice_status(request: web.Request) -> web.Response:
    engines = request.app[ENGINES]
    # What this server offers the app's voice feature: a WebRTC peer, and speech both ways
    # (the app may still use the browser's own speech APIs instead).
    return web.json_response(
        {
            "data": {
                "webrtc": True,
                "speechRecognition": engines.stt is not None,
                "speechSynthesis": bool(engines.tts.voices()),
            }
        }
    )


async def available_voices(request: web.Request) -> web.Response:
    voices = request.app[ENGINES].tts.voices()
    return web.json_response(
        {"data": [{"id": v.id, "name": v.name, "gender": v.gender, "lang": v.language} for v in voices]}
    )


async def process_transcript(request: web.Request) -> web.Response:
    answer = await answer_transcript(request, await json_body(request))
    return web.json_response(
        {
            "data": {
                "messageId": answer.message_id,
                "text": answer.text,
                "chatId": answer.thread_id,
                "userMessageId": answer.user_message_id,
                "modelName": answer.model,
            }
        }
    )


def routes() -> list[web.RouteDef]:
    return [
        web.get(f"{AI_VOICE}/status", voice_status),
        web.get(f"{AI_VOICE}/available-voices", available_voices),
        web.post(f"{AI_VOICE}/process-transcript", process_transcript),
    ]
