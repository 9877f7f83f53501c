"""Python tools for tests/test_tools.py, loaded by the server as ``tools="tool_pack:TOOLS"``."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from rtcvoice.tools import ToolInvocation

# What the tools saw: the tests read it (one server process: the tests' own).
SEEN: list[tuple[str, object]] = []
RUNS: dict[str, list[tuple[float, float]]] = {}  # tool name → (start, end) of each run
CANCELLED: list[str] = []


def get_weather(city: str, unit: Literal["c", "f"] = "c", days: int = 1) -> dict[str, object]:
    """The weather in a city.

    Longer notes that the model does not need.
    """
    SEEN.append(("get_weather", (city, unit, days)))
    return {"city": city, "temperature": 12 if unit == "c" else 54, "unit": unit, "days": days}


async def slow_lookup(topic: str, seconds: float = 0.3) -> str:
    """Look a topic up (takes a while)."""
    started = time.monotonic()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        CANCELLED.append(topic)
        raise
    RUNS.setdefault(topic, []).append((started, time.monotonic()))
    return f"{topic}: found"


def broken(reason: str) -> str:
    """A tool with a bug."""
    raise RuntimeError(f"bug: {reason}")


def whoami(context: ToolInvocation) -> dict[str, object]:
    """Who is calling."""
    return {"session_id": context.session_id, "user_id": context.user_id, "thread_id": context.thread_id}


TOOLS = [get_weather, slow_lookup, broken, whoami]
