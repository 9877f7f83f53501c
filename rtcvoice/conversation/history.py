"""Which earlier messages the agent sees: a window that moves in steps, not one message a turn.

Local and self-hosted LLMs (llama.cpp, vLLM, Ollama) reuse the work done on a prompt's unchanged
beginning. A window that slid by one exchange every turn would change the beginning every turn
and force the whole history to be read again; moving it by half its size at a time keeps the
beginning stable for several turns in a row.
"""

from __future__ import annotations

from ..engines.base import ChatMessage


def context_window(history: list[ChatMessage], max_messages: int) -> list[ChatMessage]:
    if max_messages <= 0:
        return []
    if len(history) <= max_messages:
        return list(history)
    step = max(1, max_messages // 2)
    start = ((len(history) - max_messages) // step + 1) * step
    # Start on a user message, so the window never opens with an answer to nothing.
    while start < len(history) - 1 and history[start]["role"] != "user":
        start += 1
    return history[start:]
