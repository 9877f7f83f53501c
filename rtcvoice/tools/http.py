"""The app's own tools, served by its backend at one URL.

``GET tools_url`` answers ``{"tools": [...]}``, each entry in the OpenAI tools format
(``{"type": "function", "function": {"name", "description", "parameters"}}``). A call is
``POST tools_url`` with ``{"name", "arguments", "call_id", "session_id", "thread_id", "user_id"}``
and the ``tools_token`` as a bearer token; the answer is ``{"result": <any JSON>}``, or
``{"error": "what went wrong"}`` (any HTTP status) for the model to tell the caller.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from .base import Tool, ToolError, ToolInvocation

LIST_TIMEOUT_S = 10.0


class HttpTools:
    def __init__(self, url: str, token: str = "") -> None:
        self.url = url
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    async def load(self) -> list[Tool]:
        """The endpoint's tools; ValueError saying why when it cannot be read."""
        try:
            async with self._client().get(
                self.url, timeout=aiohttp.ClientTimeout(total=LIST_TIMEOUT_S)
            ) as resp:
                if resp.status != 200:
                    raise ValueError(f"tools_url {self.url}: GET answered HTTP {resp.status}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"tools_url {self.url}: cannot list its tools: {exc or type(exc).__name__}"
            ) from exc
        entries = body.get("tools") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f'tools_url {self.url}: GET must answer {{"tools": [...]}}')
        tools = []
        for entry in entries:
            fn = entry.get("function", entry) if isinstance(entry, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f"tools_url {self.url}: a tool without a name: {str(entry)[:200]}")
            tools.append(
                Tool(
                    name=fn["name"],
                    description=str(fn.get("description", "")),
                    parameters=fn.get("parameters") or {"type": "object", "properties": {}},
                    run=self._caller(fn["name"]),
                    source="http",
                )
            )
        return tools

    def _caller(self, name: str) -> Any:
        async def run(arguments: dict[str, Any], call: ToolInvocation) -> Any:
            payload = {
                "name": name,
                "arguments": arguments,
                "call_id": call.call_id,
                "session_id": call.session_id,
                "thread_id": call.thread_id,
                "user_id": call.user_id,
            }
            try:
                async with self._client().post(self.url, json=payload) as resp:
                    text = await resp.text()
            except aiohttp.ClientError as exc:
                raise ToolError(f"the tool server could not be reached: {exc}") from exc
            try:
                body = json.loads(text)
            except json.JSONDecodeError:
                raise ToolError(f"the tool server answered HTTP {resp.status} with no JSON") from None
            if isinstance(body, dict) and body.get("error"):
                raise ToolError(str(body["error"]))
            if resp.status >= 400 or not isinstance(body, dict) or "result" not in body:
                raise ToolError(f"the tool server answered HTTP {resp.status} without a result")
            return body["result"]

        return run

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
