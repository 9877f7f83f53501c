"""Reading an agent's streamed reply: deltas with a deadline between them, cut into speakable pieces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..engines.base import EngineError
from .chunker import SentenceChunker

APOLOGY = "Sorry, I ran into a problem answering that."


async def aclose_stream(stream: Any) -> None:
    """Close an agent's reply stream, so a cancelled generation stops at once."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


async def read_reply(
    stream: AsyncIterator[str],
    *,
    timeout_s: float,
    on_delta: Callable[[str], None],
    pieces: asyncio.Queue[str | None],
) -> None:
    """Hand each delta to ``on_delta`` and each finished piece (sentence, early clause) to ``pieces``.

    EngineError ``agent_timeout`` when the agent sends nothing for ``timeout_s``. The stream is
    closed however this ends (a barge-in cancels it mid-generation).
    """
    chunker = SentenceChunker()
    try:
        while True:
            try:
                async with asyncio.timeout(timeout_s):
                    delta = await anext(stream)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise EngineError(
                    f"The agent sent nothing for {timeout_s:.0f} s.", code="agent_timeout"
                ) from None
            if not delta:
                continue
            on_delta(delta)
            for piece in chunker.push(delta):
                pieces.put_nowait(piece)
    finally:
        await aclose_stream(stream)
    for piece in chunker.flush():
        pieces.put_nowait(piece)
