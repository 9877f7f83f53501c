"""Threads shared with text chat: list a user's threads and read their messages."""

from __future__ import annotations

from aiohttp import web

from .auth import request_user
from .bodies import json_body, optional_str
from .errors import ApiError
from .keys import STORE
from .threads import owned_thread

CHAT = "/api/v1/chat"


def _user(request: web.Request) -> str | None:
    # Unauthenticated mode: a user id may be named, as the app's own backend would (trusted network).
    user = request_user(request)
    return user if user is not None else request.query.get("user_id") or None


def _limit(request: web.Request, default: int, most: int) -> int:
    raw = request.query.get("limit", str(default))
    if not raw.isdigit() or not 0 < int(raw) <= most:
        raise ApiError(400, "invalid_field", f"'limit' must be a whole number from 1 to {most}.")
    return int(raw)


async def list_threads(request: web.Request) -> web.Response:
    threads = await request.app[STORE].list_threads(_user(request), limit=_limit(request, 50, 500))
    return web.json_response({"threads": [t.as_dict() for t in threads]})


async def create_thread(request: web.Request) -> web.Response:
    body = await json_body(request, required=False)
    title = optional_str(body, "title", 200) or ""
    thread = await request.app[STORE].create_thread(_user(request), title)
    return web.json_response(thread.as_dict(), status=201)


async def list_messages(request: web.Request) -> web.Response:
    store = request.app[STORE]
    thread = await owned_thread(store, request.match_info["thread_id"], _user(request))
    messages = await store.list_messages(thread.id, limit=_limit(request, 500, 5000))
    return web.json_response({"thread": thread.as_dict(), "messages": [m.as_dict() for m in messages]})


def routes() -> list[web.RouteDef]:
    return [
        web.get(f"{CHAT}/threads", list_threads),
        web.post(f"{CHAT}/threads", create_thread),
        web.get(f"{CHAT}/threads/{{thread_id}}/messages", list_messages),
    ]
