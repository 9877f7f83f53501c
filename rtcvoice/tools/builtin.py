"""Tools rtcvoice itself offers, each off unless named in ``builtin_tools``."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .base import Tool, ToolError, ToolInvocation

BUILTIN_NAMES = ("end_call", "current_time")


async def _end_call(arguments: dict[str, Any], call: ToolInvocation) -> Any:
    call.end_call()
    return {"ok": True, "note": "The call ends once your goodbye has been heard. Say goodbye now, briefly."}


async def _current_time(arguments: dict[str, Any], call: ToolInvocation) -> Any:
    name = call.timezone
    try:
        zone = ZoneInfo(name) if name else None
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ToolError(f"unknown time zone {name!r}") from exc
    now = dt.datetime.now(zone).astimezone(zone)  # astimezone(None): the server's own zone
    return {
        "iso": now.isoformat(timespec="seconds"),
        "weekday": now.strftime("%A"),
        "timezone": name or (now.tzname() or "server local time"),
    }


END_CALL = Tool(
    name="end_call",
    description=(
        "End the phone call. Use it when the caller says goodbye or asks to hang up, "
        "and say a short goodbye in the same reply."
    ),
    parameters={"type": "object", "properties": {}},
    run=_end_call,
    source="builtin",
)

CURRENT_TIME = Tool(
    name="current_time",
    description="The current date, time and weekday where the caller is.",
    parameters={"type": "object", "properties": {}},
    run=_current_time,
    source="builtin",
)


def builtin_tools(names: list[str]) -> list[Tool]:
    """The built-ins named; ValueError for a name that is none of them."""
    known = {t.name: t for t in (END_CALL, CURRENT_TIME)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown built-in tools {unknown}: use any of {', '.join(BUILTIN_NAMES)}")
    return [known[n] for n in names]
