"""Client events: parsing and validation.

Every transport hands raw text from the client to :func:`parse_client_event`; whatever is wrong
with it comes back as an :class:`EventError` that the conversation turns into an ``error`` event,
so a bad message never reaches the state machine and never ends the call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_EVENT_BYTES = 16 * 1024
MAX_TEXT_CHARS = 4000
CLIENT_EVENT_TYPES = frozenset(
    {"text_message", "interrupt", "session.update", "ping", "end_of_input", "set_thread", "tool_result"}
)
MAX_CLIENT_TOOLS = 32
TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SESSION_UPDATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "voice": str,
    "instructions": str,
    "language": str,
    "speed": (int, float),
    "model": str,
    "temperature": (int, float),
    "max_tokens": int,
    "timezone": str,
}
MAX_TOKENS_LIMIT = 32_768


class EventError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ClientEvent:
    type: str
    data: dict[str, Any]


def parse_client_event(raw: str | bytes) -> ClientEvent:
    if isinstance(raw, bytes):
        if len(raw) > MAX_EVENT_BYTES:
            raise EventError("message_too_large", f"Events are limited to {MAX_EVENT_BYTES} bytes.")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise EventError("invalid_json", "Events must be UTF-8 JSON text.") from None
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_EVENT_BYTES:
        raise EventError("message_too_large", f"Events are limited to {MAX_EVENT_BYTES} bytes.")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise EventError("invalid_json", "Events must be JSON objects with a string 'type'.") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise EventError("invalid_event", "Events must be JSON objects with a string 'type'.")
    kind = data["type"]
    if kind not in CLIENT_EVENT_TYPES:
        raise EventError(
            "unknown_event",
            f"Unknown event type {kind[:64]!r}; expected one of {sorted(CLIENT_EVENT_TYPES)}.",
        )
    if kind == "text_message":
        content = data.get("content")
        if not isinstance(content, str) or not content.strip():
            raise EventError("invalid_event", "text_message needs a non-empty string 'content'.")
        if len(content) > MAX_TEXT_CHARS:
            raise EventError(
                "message_too_large", f"text_message content is limited to {MAX_TEXT_CHARS} characters."
            )
    elif kind == "tool_result":
        if not isinstance(data.get("id"), str) or not 0 < len(data["id"]) <= 200:
            raise EventError(
                "invalid_event", "tool_result needs the string 'id' of the tool_call it answers."
            )
        if "result" not in data and not isinstance(data.get("error"), str):
            raise EventError("invalid_event", "tool_result needs a 'result' (any JSON) or an 'error' string.")
    elif kind == "set_thread":
        thread_id = data.get("thread_id")
        if not isinstance(thread_id, str) or not 0 < len(thread_id) <= 200:
            raise EventError("invalid_event", "set_thread needs a string 'thread_id'.")
    elif kind == "session.update":
        session = data.get("session", data)
        if not isinstance(session, dict):
            raise EventError("invalid_event", "session.update needs an object of settings.")
        data = {"type": kind, **session_choices(session)}
    return ClientEvent(kind, data)


def session_choices(session: dict[str, Any]) -> dict[str, Any]:
    """The session settings in ``session`` (others are ignored), each of the right type and range.

    For ``session.update`` and for the options a call is started with alike; EventError if not.
    """
    clean: dict[str, Any] = {}
    for name, types in SESSION_UPDATE_FIELDS.items():
        if session.get(name) is not None:
            value = session[name]
            if isinstance(value, bool) or not isinstance(value, types):
                raise EventError("invalid_event", f"session field {name!r} has the wrong type.")
            clean[name] = value
    if isinstance(clean.get("instructions"), str) and len(clean["instructions"]) > MAX_TEXT_CHARS:
        raise EventError("message_too_large", f"instructions are limited to {MAX_TEXT_CHARS} characters.")
    if "speed" in clean and not 0.5 <= float(clean["speed"]) <= 2.0:
        raise EventError("invalid_event", "speed must be between 0.5 and 2.0.")
    if "temperature" in clean and not 0.0 <= float(clean["temperature"]) <= 2.0:
        raise EventError("invalid_event", "temperature must be between 0 and 2.")
    if "max_tokens" in clean and not 1 <= clean["max_tokens"] <= MAX_TOKENS_LIMIT:
        raise EventError("invalid_event", f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}.")
    if "tools" in session:
        clean["tools"] = client_tools(session["tools"])
    for name in ("voice", "model", "language", "timezone"):
        if name in clean and not 0 < len(clean[name]) <= 200:
            raise EventError("invalid_event", f"{name} must be a name of 1 to 200 characters.")
    return clean


def client_tools(value: Any) -> list[dict[str, Any]]:
    """The tools a page declares it runs itself, as ``{"name", "description", "parameters"}`` each
    (OpenAI's ``{"type": "function", "function": {...}}`` is taken too); EventError if malformed."""
    if not isinstance(value, list) or len(value) > MAX_CLIENT_TOOLS:
        raise EventError("invalid_event", f"tools must be a list of at most {MAX_CLIENT_TOOLS} tools.")
    tools = []
    for entry in value:
        spec = entry.get("function", entry) if isinstance(entry, dict) else None
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("name"), str)
            or not TOOL_NAME_RE.match(spec["name"])
        ):
            raise EventError("invalid_event", "each tool needs a 'name' of 1-64 letters, digits, _ or -.")
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            raise EventError(
                "invalid_event", f"tool {spec['name']!r}: 'parameters' must be a JSON schema of type object."
            )
        description = spec.get("description", "")
        if not isinstance(description, str) or len(description) > 1000:
            raise EventError(
                "invalid_event",
                f"tool {spec['name']!r}: 'description' must be a string of at most 1000 characters.",
            )
        tools.append({"name": spec["name"], "description": description, "parameters": parameters})
    return tools
