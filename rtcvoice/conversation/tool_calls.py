"""Running the tools the model asks for during one reply (README "Tools").

A reply's calls run only once its turn is committed: a speculative reply (started while the
caller might still go on) must not act. They run at once where the model asks for several, each
with a timeout, its arguments checked against the tool's schema first; whatever goes wrong comes
back to the model as an error to tell the caller about, never as the end of the call. A tool
still running after ``tool_filler_ms`` while nothing has been said yet makes the AI say a short
filler. Barge-in cancels the turn, and with it every tool still running.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import jsonschema

from ..engines.base import ChatMessage, ToolCall
from ..settings import Settings
from ..tools import Tool, ToolError, ToolInvocation

log = logging.getLogger(__name__)

SUMMARY_CHARS = 200  # of a result, in the tool_result event


class ReplyTools:
    """The ToolCaller of one reply (engines.base.ToolCaller)."""

    def __init__(
        self,
        tools: dict[str, Tool],
        settings: Settings,
        *,
        invocation: Callable[[str], ToolInvocation],
        committed: asyncio.Event,
        emit: Callable[..., None],
        say_filler: Callable[[str], bool],
        record: list[ChatMessage],
    ) -> None:
        """``record`` gets the calls and their results, in order, for the call's history."""
        self.tools = tools
        self.settings = settings
        self.max_steps = settings.max_tool_steps
        self.record = record
        self.calls = 0
        self._invocation = invocation
        self._committed = committed
        self._emit = emit
        self._say_filler = say_filler
        self._filler_said = False

    def specs(self) -> list[dict[str, Any]]:
        return [tool.spec() for tool in self.tools.values()]

    async def run(self, calls: list[ToolCall]) -> list[ChatMessage]:
        await self._committed.wait()
        self.record.append({"role": "assistant", "content": "", "tool_calls": [c.as_openai() for c in calls]})
        room = max(0, self.settings.max_tool_calls_per_turn - self.calls)
        self.calls += len(calls)
        tasks = [
            asyncio.create_task(
                self._one(call) if i < room else self._refuse(call, "too many tool calls in one reply"),
                name=f"tool-{call.name}",
            )
            for i, call in enumerate(calls)
        ]
        filler = asyncio.get_running_loop().call_later(self.settings.tool_filler_ms / 1000, self._filler)
        try:
            results = await asyncio.gather(*tasks)
        finally:
            filler.cancel()
            for task in tasks:
                task.cancel()
        answers: list[ChatMessage] = [
            {"role": "tool", "content": content, "tool_call_id": call.id}
            for call, content in zip(calls, results, strict=True)
        ]
        self.record += answers
        return answers

    def _filler(self) -> None:
        if self.settings.tool_filler_ms > 0 and not self._filler_said and self.settings.tool_filler:
            self._filler_said = self._say_filler(self.settings.tool_filler)

    async def _refuse(self, call: ToolCall, why: str) -> str:
        self._emit("tool_call", id=call.id, name=call.name, arguments=_parsed(call.arguments), client=False)
        return self._answer(call, None, why)

    async def _one(self, call: ToolCall) -> str:
        arguments = _parsed(call.arguments)
        tool = self.tools.get(call.name)
        error = _refusal(tool, call, arguments)
        # ``client``: the page runs it, and answers with a tool_result event of its own.
        runs_on_client = tool is not None and tool.source == "browser" and error is None
        self._emit("tool_call", id=call.id, name=call.name, arguments=arguments, client=runs_on_client)
        if error is not None or tool is None:
            return self._answer(call, None, error or "no such tool")
        return await self._run(tool, call, arguments)

    async def _run(self, tool: Tool, call: ToolCall, arguments: dict[str, Any]) -> str:
        timeout_s = tool.timeout_s or self.settings.tool_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                result = await tool.run(arguments, self._invocation(call.id))
        except TimeoutError:
            log.warning("tool %s timed out after %g s", tool.name, timeout_s)
            return self._answer(call, None, f"the tool did not answer within {timeout_s:g} s")
        except ToolError as exc:
            return self._answer(call, None, str(exc) or "the tool failed")
        except asyncio.CancelledError:
            self._emit("tool_result", id=call.id, name=call.name, ok=False, summary="cancelled")
            raise
        except Exception as exc:  # the tool's bug: logged in full, the model only learns it failed
            log.exception("tool %s failed", tool.name)
            return self._answer(call, None, f"the tool failed ({type(exc).__name__})")
        try:
            content = result if isinstance(result, str) else json.dumps(result, default=str)
        except (TypeError, ValueError) as exc:
            return self._answer(call, None, f"the tool returned something that is not JSON ({exc})")
        return self._answer(call, content, None)

    def _answer(self, call: ToolCall, content: str | None, error: str | None) -> str:
        if error is not None:
            log.info("tool call %s (%s) failed: %s", call.id, call.name, error)
            content = json.dumps({"error": error})
        assert content is not None
        limit = self.settings.max_tool_result_chars
        if len(content) > limit:
            content = content[:limit] + " [cut: the result was longer]"
        self._emit(
            "tool_result",
            id=call.id,
            name=call.name,
            ok=error is None,
            summary=(error if error is not None else content)[:SUMMARY_CHARS],
        )
        return content


def _refusal(tool: Tool | None, call: ToolCall, arguments: Any) -> str | None:
    """Why the call cannot run (None: it can)."""
    if tool is None:
        return f"there is no tool named {call.name!r}"
    if not isinstance(arguments, dict):
        return "the arguments were not a JSON object"
    try:
        jsonschema.validate(arguments, tool.parameters)
    except jsonschema.ValidationError as exc:
        return f"invalid arguments: {exc.message}"
    except jsonschema.SchemaError as exc:
        log.warning("tool %s has an invalid schema: %s", tool.name, exc.message)
        return "the tool is misconfigured"
    return None


def _parsed(arguments: str) -> Any:
    """The model's arguments as JSON, or the raw text where they are not JSON."""
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return arguments
