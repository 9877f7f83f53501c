"""Tools the AI may call during a call (README "Tools"): Python functions, the app's HTTP
endpoint, and the built-ins. The server loads them once (:class:`Toolbox`); each call's
conversation runs them (conversation/tool_calls.py)."""

from __future__ import annotations

import logging

from ..settings import Settings
from .base import Tool, ToolError, ToolInvocation
from .builtin import builtin_tools
from .http import HttpTools
from .mcp_tools import McpServer
from .python import load_python_tools, tool_from_function

__all__ = ["Tool", "ToolConfigError", "ToolError", "ToolInvocation", "Toolbox", "tool_from_function"]

log = logging.getLogger(__name__)


class ToolConfigError(ValueError):
    """The tool settings cannot be served; the message says which and why."""


class Toolbox:
    """Every tool this server offers, by name."""

    def __init__(
        self,
        tools: list[Tool] | None = None,
        *,
        http: HttpTools | None = None,
        mcp: list[McpServer] | None = None,
    ) -> None:
        self.tools: dict[str, Tool] = {}
        for tool in tools or []:
            if tool.name in self.tools:
                raise ToolConfigError(f"two tools are named {tool.name!r}")
            self.tools[tool.name] = tool
        self._http = http
        self._mcp = mcp or []

    def __len__(self) -> int:
        return len(self.tools)

    @classmethod
    async def load(cls, settings: Settings) -> Toolbox:
        tools: list[Tool] = []
        http: HttpTools | None = None
        servers: list[McpServer] = []
        try:
            for spec in _names(settings.tools):
                tools += load_python_tools(spec)
            tools += builtin_tools(_names(settings.builtin_tools))
            if settings.tools_url:
                http = HttpTools(settings.tools_url, settings.tools_token or settings.webhook_token)
                tools += await http.load()
            for spec in [s for s in settings.mcp_servers.split(";") if s.strip()]:
                server = McpServer(spec)
                tools += await server.start()
                servers.append(server)
            box = cls(tools, http=http, mcp=servers)
        except ValueError as exc:
            if http is not None:
                await http.aclose()
            for server in servers:
                await server.aclose()
            raise ToolConfigError(str(exc)) from exc
        if box.tools:
            log.info("tools: %s", ", ".join(f"{t.name} ({t.source})" for t in box.tools.values()))
        return box

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        for server in self._mcp:
            await server.aclose()


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]
