"""Any OpenAI-compatible chat endpoint: OpenAI, Ollama, vLLM, llama.cpp server, LM Studio..."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import openai
from openai.types import CompletionUsage
from openai.types.chat import (
    ChatCompletionMessageParam,
    ChatCompletionToolChoiceOptionParam,
    ChatCompletionToolParam,
)

from rtcvoice.engines.base import AgentContext, AgentError, ChatMessage, ToolCall, unique_call_ids
from rtcvoice.engines.pool import pooled_http_client
from rtcvoice.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4o-mini"
OPENAI_API_URL = "https://api.openai.com/v1"


def _to_openai(message: ChatMessage) -> ChatCompletionMessageParam:
    # One branch per role so that the message type checks against openai's per-role TypedDicts.
    role, content = message["role"], message["content"]
    if role == "system":
        return {"role": "system", "content": content}
    if role == "assistant":
        if message.get("tool_calls"):
            return {"role": "assistant", "content": content or None, "tool_calls": message["tool_calls"]}  # type: ignore[typeddict-item]
        return {"role": "assistant", "content": content}
    if role == "tool":
        return {"role": "tool", "content": content, "tool_call_id": message.get("tool_call_id", "")}
    return {"role": "user", "content": content}


class _ToolCallDeltas:
    """The tool calls of one streamed reply, put together from their deltas: the first delta of
    each (by ``index``) names it and gives its id, the rest append pieces of its JSON arguments."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: list[Any]) -> None:
        for delta in deltas:
            call = self._calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            if delta.id:
                call["id"] = delta.id
            if delta.function is not None:
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""

    def calls(self) -> list[ToolCall]:
        return unique_call_ids(
            [
                ToolCall(id=c["id"], name=c["name"], arguments=c["arguments"] or "{}")
                for _, c in sorted(self._calls.items())
            ]
        )


class OpenAIChatAgent:
    name = "openai"
    languages = None  # the model's to know; chat models answer in the language they are spoken to

    def __init__(self, settings: Settings) -> None:
        if not settings.openai_base_url and not settings.openai_api_key:
            raise AgentError(
                "agent=openai needs an endpoint: set OPENAI_BASE_URL (e.g. http://localhost:11434/v1 for "
                "Ollama) and/or OPENAI_API_KEY (for api.openai.com)."
            )
        self.model = settings.llm_model or DEFAULT_MODEL
        self.base_url = (settings.openai_base_url or OPENAI_API_URL).rstrip("/")
        self.max_tokens = settings.llm_max_tokens
        self.temperature = settings.llm_temperature
        self.stream_usage = settings.llm_stream_usage
        self.timeout_s = settings.llm_timeout_s
        self.description = f"openai (model {self.model} at {self.base_url})"
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url,
            # Local servers (Ollama, vLLM, llama.cpp) need no key, but the client insists on one.
            api_key=settings.openai_api_key or "not-needed",
            # httpx applies this to connect and to each read, so it bounds time *without progress*,
            # not the length of the whole reply.
            timeout=settings.llm_timeout_s,
            # Someone is waiting on the line: a fast, explained error beats seconds of silent
            # retries with back-off, and the user can simply speak again.
            max_retries=0,
            http_client=pooled_http_client(settings.pool_max_requests),
        )

    # Any model the endpoint serves may be asked for per session.
    chooses_model = True

    # Tools in the OpenAI format go to the model; the calls it streams back are run and answered.
    supports_tools = True

    async def stream(self, messages: list[ChatMessage], context: AgentContext) -> AsyncIterator[str]:
        url = f"{self.base_url}/chat/completions"
        model = context.model or self.model
        usage: CompletionUsage | None = None
        tools = context.tools
        specs = cast("list[ChatCompletionToolParam]", tools.specs() if tools is not None else [])
        request = [_to_openai(m) for m in messages]
        steps = 0
        spoken = ""  # the whole reply so far, over every step
        try:
            while True:
                # Past the step limit the model must answer with what it has (tool_choice none).
                can_call = bool(specs) and tools is not None and steps < tools.max_steps
                choice: ChatCompletionToolChoiceOptionParam = "auto" if can_call else "none"
                stream = await self._client.chat.completions.create(
                    model=model,
                    messages=request,
                    stream=True,
                    max_tokens=context.max_tokens or self.max_tokens,
                    temperature=self.temperature if context.temperature is None else context.temperature,
                    stream_options={"include_usage": True} if self.stream_usage else openai.omit,
                    tools=specs if specs else openai.omit,
                    tool_choice=choice if specs else openai.omit,
                )
                deltas = _ToolCallDeltas()
                said = ""
                # `async with` closes the HTTP response however we leave: done, error, or the
                # consumer cancelled (barge-in), so the server stops generating for nobody.
                async with stream:
                    async for chunk in stream:
                        # The last chunk carries the usage (some servers send a running total in each).
                        usage = chunk.usage or usage
                        if not chunk.choices:
                            continue
                        delta = chunk.choices[0].delta
                        if delta.tool_calls:
                            deltas.add(delta.tool_calls)
                        if delta.content:
                            text = delta.content
                            if not said and spoken and not spoken[-1].isspace() and not text[0].isspace():
                                # A step after tool calls starts afresh: keep its words apart from
                                # what the caller heard before them.
                                text = " " + text
                            said += text
                            spoken += text
                            yield text
                calls = deltas.calls()
                if not calls or tools is None or not can_call:
                    break
                if usage is not None:
                    context.usage.add(usage.prompt_tokens, usage.completion_tokens)
                    usage = None
                steps += 1
                # The same reply goes on: what the model said, its calls, their results.
                asked: ChatMessage = {
                    "role": "assistant",
                    "content": said,
                    "tool_calls": [c.as_openai() for c in calls],
                }
                answers = await tools.run(calls)
                request += [_to_openai(asked), *(_to_openai(m) for m in answers)]
            if usage is not None:
                context.usage.add(usage.prompt_tokens, usage.completion_tokens)
        except openai.APIStatusError as exc:
            hint = ""
            if exc.status_code == 404:
                hint = " (check the model name, and that OPENAI_BASE_URL ends with /v1 where the server needs it)"
            elif exc.status_code in (401, 403):
                hint = " (check OPENAI_API_KEY)"
            raise AgentError(
                f"chat endpoint {url} returned HTTP {exc.status_code} for model {model!r}: "
                f"{_snippet(exc.message)}{hint}"
            ) from exc
        except openai.APITimeoutError as exc:
            raise AgentError(f"chat endpoint {url} did not answer within {self.timeout_s:g} s") from exc
        except openai.APIConnectionError as exc:
            raise AgentError(f"cannot reach chat endpoint {url}: {exc.__cause__ or exc}") from exc
        except openai.APIError as exc:  # an error event inside the stream
            raise AgentError(f"chat endpoint {url} failed mid-reply: {_snippet(exc.message)}") from exc
        # openai decodes each SSE payload with json.loads and lets its error through unwrapped.
        except json.JSONDecodeError as exc:
            raise AgentError(
                f"chat endpoint {url} sent a stream that is not chat-completions JSON: {exc}"
            ) from exc

    async def warm_up(self) -> None:
        # Nothing to load; a test request would cost the user tokens on a paid API.
        return None

    async def aclose(self) -> None:
        await self._client.close()


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
