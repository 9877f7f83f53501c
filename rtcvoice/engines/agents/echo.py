"""An agent that repeats the user: a diagnostic that needs no model, and an instant reply for
transport benchmarks (its latency is zero, so what is measured is everything else)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from rtcvoice.engines.base import AgentContext, ChatMessage


def last_user_message(messages: list[ChatMessage]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            content: str = message["content"]
            return content.strip()
    return ""


class EchoAgent:
    name = "echo"
    languages = None  # it repeats whatever it is told

    def __init__(self) -> None:
        self.description = "echo (repeats the user's words)"

    async def stream(self, messages: list[ChatMessage], context: AgentContext) -> AsyncIterator[str]:
        transcript = last_user_message(messages)
        if not transcript:
            reply = "You said nothing."
        elif transcript[-1] in ".!?":
            reply = f"You said: {transcript}"
        else:
            reply = f"You said: {transcript}."
        for i, word in enumerate(reply.split()):
            yield word if i == 0 else " " + word
            # Give the consumer (and a barge-in) a chance between words, like a real stream would.
            await asyncio.sleep(0)

    async def warm_up(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
