"""Reading request bodies: every mistake is a 400 with a JSON error, never a 500."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .errors import ApiError


async def json_body(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    return body


def optional_str(body: dict[str, Any], name: str, max_len: int = 4000) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise ApiError(400, "invalid_field", f"'{name}' must be a string of at most {max_len} characters.")
    return value
