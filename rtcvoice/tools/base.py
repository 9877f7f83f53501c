"""A tool the AI may call during a call: its name, what it does, its arguments' JSON schema, and
how to run it. Every source (Python functions, the app's HTTP endpoint, the built-ins) makes these.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

ToolSource = Literal["python", "http", "mcp", "builtin", "browser"]

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI accepts as a function name


class ToolError(Exception):
    """A tool could not do what it was asked; the message is what the model is told."""


@dataclass(frozen=True)
class ToolInvocation:
    """Who is calling: tools act for the caller (``user_id`` is the JWT's subject, when known)."""

    call_id: str
    session_id: str
    thread_id: str | None = None
    user_id: str | None = None
    timezone: str | None = None  # the caller's IANA time zone, where the client said it
    # Ends the call once the reply being spoken is heard (reason agent_hangup).
    end_call: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)


Runner = Callable[[dict[str, Any], ToolInvocation], Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    run: Runner = field(repr=False)
    source: ToolSource = "python"
    timeout_s: float | None = None  # None: the server's tool_timeout_s
    # Said to the caller when the call takes long (None: the server's filler).
    filler: str | None = None

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"tool name {self.name!r} must be 1-64 letters, digits, _ or -")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name}: its parameters must be a JSON schema of type object")

    def spec(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }
