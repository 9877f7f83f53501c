"""Who is calling and whether there is room: the user of a request, and the call limits."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .auth import request_user
from .bodies import optional_str
from .errors import ApiError
from .keys import NODE, SESSIONS, SETTINGS


def check_capacity(app: web.Application, user: str | None) -> None:
    """503 when the server is full or draining, 429 when this user already holds their share of calls."""
    registry, settings = app[SESSIONS], app[SETTINGS]
    if not app[NODE].serving:
        raise ApiError(
            503,
            "draining",
            "This server is shutting down and takes no new calls; try again (another node takes it).",
            {"Retry-After": "1"},
        )
    if len(registry) >= registry.max_sessions:
        raise ApiError(
            503,
            "too_many_sessions",
            "The server is at its call limit; try again shortly.",
            {"Retry-After": "5"},
        )
    limit = settings.max_sessions_per_user
    if user is not None and registry.count_for(user) >= limit:
        raise ApiError(
            429,
            "too_many_sessions_for_user",
            f"This user already has {limit} calls open; end one first.",
            {"Retry-After": "5"},
        )


def body_user(request: web.Request, body: dict[str, Any]) -> str | None:
    """The token's user; in unauthenticated mode the app may name its user (snake or camelCase)."""
    user = request_user(request)
    named = optional_str(body, "user_id", 200) or optional_str(body, "userId", 200)
    if user is None:
        return named
    if named is not None and named != user:
        raise ApiError(403, "forbidden", "The user in the body is not the user of the token.")
    return user
