"""Tools of MCP servers (the ``mcp`` package, an optional extra): a command run over stdio, or a
streamable-HTTP URL. Each server's session is held open by a task of its own for the server's
life, because the SDK's transports are anyio contexts that must be entered and left in one task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
from typing import Any

from .base import Tool, ToolError, ToolInvocation

log = logging.getLogger(__name__)

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


def _field(obj: Any, *names: str) -> Any:
    """A field under its mcp 2 name or its mcp 1 name (isError → is_error...)."""
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


class McpServer:
    def __init__(self, spec: str) -> None:
        self.spec = spec.strip()
        self.is_http = self.spec.startswith(("http://", "https://"))
        self._session: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def _transport(self) -> Any:
        try:
            from mcp import StdioServerParameters
            from mcp.client.stdio import stdio_client
        except ImportError as exc:
            raise ValueError(
                f"mcp_servers {self.spec!r} needs the mcp package: pip install 'rtcvoice[mcp]'"
            ) from exc
        if self.is_http:
            from mcp.client import streamable_http

            # mcp 2 names it streamable_http_client, mcp 1 streamablehttp_client.
            names = vars(streamable_http)
            connect = names.get("streamable_http_client") or names["streamablehttp_client"]
            return connect(self.spec)
        command = shlex.split(self.spec)
        if not command:
            raise ValueError("mcp_servers: an empty command")
        return stdio_client(StdioServerParameters(command=command[0], args=command[1:]))

    async def start(self) -> list[Tool]:
        """Connect and list the server's tools; ValueError saying why it cannot."""
        transport = self._transport()
        ready: asyncio.Future[list[Tool]] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._hold(transport, ready), name=f"mcp {self.spec[:40]}")
        try:
            return await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT_S)
        except TimeoutError:
            await self.aclose()
            raise ValueError(f"mcp server {self.spec!r} did not start within {START_TIMEOUT_S:g} s") from None
        except Exception as exc:
            await self.aclose()
            raise ValueError(f"mcp server {self.spec!r} cannot be used: {exc or type(exc).__name__}") from exc

    async def _hold(self, transport: Any, ready: asyncio.Future[list[Tool]]) -> None:
        from mcp import ClientSession

        try:
            async with contextlib.AsyncExitStack() as stack:
                streams = await stack.enter_async_context(transport)
                # mcp 1 yields (read, write, session id) over HTTP, mcp 2 (read, write).
                session = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
                await session.initialize()
                listed = await session.list_tools()
                self._session = session
                ready.set_result([self._tool(t) for t in listed.tools])
                await self._stop.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # anyio wraps failures in exception groups
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            else:
                log.warning("mcp server %s ended: %r", self.spec, exc)
        finally:
            self._session = None

    def _tool(self, listed: Any) -> Tool:
        schema = _field(listed, "input_schema", "inputSchema") or {"type": "object", "properties": {}}
        return Tool(
            name=listed.name,
            description=listed.description or listed.name,
            parameters=dict(schema),
            run=self._caller(listed.name),
            source="mcp",
        )

    def _caller(self, name: str) -> Any:
        async def run(arguments: dict[str, Any], call: ToolInvocation) -> Any:
            session = self._session
            if session is None:
                raise ToolError("the tool's MCP server is not running")
            result = await session.call_tool(name, arguments)
            texts = [c.text for c in result.content if getattr(c, "type", "") == "text"]
            if _field(result, "is_error", "isError"):
                raise ToolError(" ".join(texts) or "the MCP tool failed")
            if texts:  # what MCP servers write for models to read
                return texts[0] if len(texts) == 1 else json.dumps(texts)
            return _field(result, "structured_content", "structuredContent") or ""

        return run

    async def aclose(self) -> None:
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
