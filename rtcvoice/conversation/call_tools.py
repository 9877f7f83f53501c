"""The tools one call offers its agent: the server's (a Toolbox) and those the page runs itself.

The page declares its own tools (browser tools) in ``session.update`` "tools" or when it starts
the call; a call of one reaches the page as a ``tool_call`` event (``client: true``) and waits for
the page's ``tool_result``. Each reply gets a :class:`~.tool_calls.ReplyTools` over both sets, or
none where the agent cannot call tools (the embedded model cannot: see serve's log).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from ..engines.base import Agent, supports_tools
from ..settings import Settings
from ..tools import Tool, Toolbox, ToolError, ToolInvocation
from .tool_calls import ReplyTools
from .turns import Turn


class CallTools:
    def __init__(
        self, toolbox: Toolbox | None, settings: Settings, agent: Agent, emit: Callable[..., None]
    ) -> None:
        self.toolbox = toolbox
        self.client: dict[str, Tool] = {}  # the page's
        self._settings = settings
        self._agent = agent
        self._emit = emit  # the call's events (no turn)
        self._waiting: dict[str, asyncio.Future[Any]] = {}  # browser tool calls awaiting the page

    def declare(self, specs: list[dict[str, Any]]) -> None:
        """The tools the page runs itself; replaces those it declared before."""
        taken = [s["name"] for s in specs if self.toolbox is not None and s["name"] in self.toolbox.tools]
        if taken:
            self._emit(
                "error",
                code="invalid_tools",
                message=f"The server has tools named {', '.join(taken)}; the page's tools need other names.",
            )
            return
        self.client = {
            s["name"]: Tool(
                s["name"], s["description"], s["parameters"], run=self._run_on_client, source="browser"
            )
            for s in specs
        }
        if specs and not supports_tools(self._agent):
            self._emit(
                "error",
                code="tools_unsupported",
                message=f"This server's agent ({self._agent.name}) cannot call tools.",
            )

    def answer(self, data: dict[str, Any]) -> None:
        """The page's ``tool_result`` for a browser tool call of this call (no other call's ids are here)."""
        waiting = self._waiting.get(data["id"])
        if waiting is None or waiting.done():
            self._emit(
                "error", code="unknown_tool_call", message=f"No tool call {data['id'][:64]!r} is waiting."
            )
            return
        if isinstance(data.get("error"), str):
            waiting.set_exception(ToolError(data["error"][:1000]))
        else:
            waiting.set_result(data.get("result"))

    async def _run_on_client(self, arguments: dict[str, Any], call: ToolInvocation) -> Any:
        """A browser tool: the page got the tool_call event (client: true) and answers it."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call.call_id] = answer
        try:
            return await answer
        finally:
            self._waiting.pop(call.call_id, None)

    def for_reply(
        self,
        turn: Turn,
        sentences: asyncio.Queue[str | None],
        caller: ToolInvocation,
        emit: Callable[..., None],
    ) -> ReplyTools | None:
        """The tools of one reply: ``caller`` is who calls (its ``call_id`` is set per call),
        ``emit`` sends the turn's events, ``sentences`` is what the reply says."""
        tools = {**(self.toolbox.tools if self.toolbox is not None else {}), **self.client}
        if not tools or not supports_tools(self._agent):
            return None

        def say_filler(text: str) -> bool:
            # Only before the reply has said anything: after, the caller is hearing it already.
            if turn.ai_text:
                return False
            turn.ai_text += text + " "
            emit("ai_text", text=text + " ", filler=True)
            sentences.put_nowait(text)
            return True

        return ReplyTools(
            tools,
            self._settings,
            invocation=lambda call_id: dataclasses.replace(caller, call_id=call_id),
            committed=turn.committed,
            emit=emit,
            say_filler=say_filler,
            record=turn.tool_messages,
        )
