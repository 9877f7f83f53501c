"""A real, local OpenAI-compatible chat server for tests: an aiohttp app on 127.0.0.1 that speaks
the chat-completions wire format (SSE chunks, then ``data: [DONE]``), plus fault modes for
engine-fault tests. Nothing is mocked: clients talk HTTP to it like to OpenAI, Ollama or vLLM.

    async with FakeOpenAI("Hi there.", token_delay=0.01) as fake:
        settings = Settings(agent="openai", openai_base_url=fake.base_url)
        ...
        assert fake.requests[-1]["messages"][-1]["content"] == "hello"
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web


@dataclass
class ToolCalls:
    """A reply that asks for tools: ``calls`` are (name, arguments) pairs, streamed as OpenAI
    streams them (each call's id and name first, then its JSON arguments in small pieces), after
    ``text`` if any; ``finish_reason`` is ``tool_calls``. ``raw`` gives arguments as written."""

    calls: list[tuple[str, dict[str, Any] | str]]
    text: str = ""
    ids: list[str] | None = None  # the calls' ids as sent ("" sends none); default: unique ones


Reply = str | Callable[[list[dict[str, Any]]], "str | ToolCalls"]

FAULTS = ("500", "garbage", "hang", "slow_first_token")
SLOW_FIRST_TOKEN_S = 10.0


def split_tokens(text: str) -> list[str]:
    """Words with their leading whitespace, as LLM tokens usually arrive."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


class FakeOpenAI:
    def __init__(
        self,
        reply: Reply = "Hello there. How can I help?",
        *,
        token_delay: float = 0.0,
        fault: str | None = None,
    ) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        self.reply = reply
        self.token_delay = token_delay
        self.fault = fault
        self.requests: list[dict[str, Any]] = []
        # Streams the client cut off (e.g. a cancelled consumer) and streams sent to the end.
        self.disconnects = 0
        self.completed = 0
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._counter = 0
        # Requests being answered at once, and the most there ever were (a client's cap shows here).
        self.in_flight = 0
        self.max_in_flight = 0

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> FakeOpenAI:
        self._closing = asyncio.Event()
        app = web.Application()
        for prefix in ("/v1", ""):
            app.router.add_post(prefix + "/chat/completions", self._chat)
            app.router.add_get(prefix + "/models", self._models)
        # handler_cancellation: a client that hangs up cancels its handler, as in a real server
        # that stops generating, which is how tests observe disconnects.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}/v1"
        return self

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- handlers -------------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer_chat(request)
        finally:
            self.in_flight -= 1

    async def _answer_chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self._counter += 1
        ident = f"chatcmpl-fake{self._counter}"
        model = str(body.get("model", "fake-model"))
        messages = list(body.get("messages", []))

        if self.fault == "500":
            return web.json_response(
                {"error": {"message": "The fake server had an error", "type": "server_error", "code": None}},
                status=500,
            )
        text = self.reply(messages) if callable(self.reply) else self.reply
        if not body.get("stream"):
            if self.fault in ("hang", "slow_first_token"):
                await self._pause(None if self.fault == "hang" else SLOW_FIRST_TOKEN_S)
            return web.json_response(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": _usage(messages, text),
                }
            )

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            if self.fault == "garbage":
                for line in ("this is not json", "{broken", "<html>oops</html>"):
                    await resp.write(f"data: {line}\n\n".encode())
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            if self.fault == "hang":
                await self._pause(None)
                return resp

            def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
                obj = {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": None,
                    "choices": [
                        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                    ],
                }
                return f"data: {json.dumps(obj)}\n\n".encode()

            await resp.write(chunk({"role": "assistant", "content": ""}))
            if self.fault == "slow_first_token":
                await self._pause(SLOW_FIRST_TOKEN_S)
            calls = text if isinstance(text, ToolCalls) else None
            for i, token in enumerate(split_tokens(calls.text if calls is not None else text)):
                if i and self.token_delay:
                    await asyncio.sleep(self.token_delay)
                await resp.write(chunk({"content": token}))
            for index, (name, arguments) in enumerate(calls.calls if calls is not None else []):
                self._counter += 1
                ident = calls.ids[index] if calls.ids is not None else f"call_{self._counter}"
                head = {"index": index, "id": ident or None, "type": "function"}
                await resp.write(
                    chunk({"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]})
                )
                written = arguments if isinstance(arguments, str) else json.dumps(arguments)
                for start in range(0, len(written), 7):
                    piece = {"index": index, "function": {"arguments": written[start : start + 7]}}
                    await resp.write(chunk({"tool_calls": [piece]}))
            await resp.write(chunk({}, "tool_calls" if calls is not None and calls.calls else "stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [],
                    "usage": _usage(messages, text),
                }
                await resp.write(f"data: {json.dumps(usage)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.completed += 1
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            # The client hung up mid-stream.
            self.disconnects += 1
            raise

    async def _pause(self, seconds: float | None) -> None:
        """Sleep (forever if None), but end early when the server closes, so close() is prompt."""
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({closing}, timeout=seconds)
        finally:
            closing.cancel()


def _usage(messages: list[dict[str, Any]], text: str | ToolCalls) -> dict[str, int]:
    if isinstance(text, ToolCalls):
        text = text.text + json.dumps(text.calls)
    prompt = sum(len(str(m.get("content", "")).split()) for m in messages)
    completion = len(split_tokens(text))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
