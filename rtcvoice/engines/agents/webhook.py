"""Forward each turn to the developer's own backend over HTTP, so the voice call uses the same AI
(tools, memory, auth) as their text chat.

Request: ``POST webhook_url`` with JSON ``{"session_id", "thread_id", "user_id", "language",
"model", "temperature", "max_tokens", "transcript", "messages"}`` (the three session choices are
null where the session made none). The reply may be streamed or whole, chosen by its Content-Type:

- ``text/event-stream``: SSE ``data:`` payloads, each JSON with ``delta``, ``text`` or ``content``, an
  OpenAI ``chat.completion.chunk``, or plain text; ``data: [DONE]`` ends the reply.
- ``application/x-ndjson`` (or ``application/jsonl``): one JSON object a line, same keys.
- ``application/json``: the whole reply under ``text``, ``reply``, ``response``, ``content`` or ``message``.
- ``text/plain`` (and anything else): the body itself, streamed as it arrives.

Tools (README "Tools"): when the server has tools, the request also carries ``"tools"`` (the OpenAI
tools format). The backend asks for calls with an object holding ``"tool_calls"``: a JSON reply,
an SSE event or an NDJSON line, each call ``{"id", "name", "arguments"}`` (or OpenAI's
``{"id", "function": {"name", "arguments"}}``). rtcvoice runs them and POSTs again with the calls
and their results appended to ``messages`` (an assistant message with ``tool_calls``, then one
``{"role": "tool", "tool_call_id", "content"}`` each); the reply to that goes on speaking.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp

from rtcvoice.engines.agents.echo import last_user_message
from rtcvoice.engines.base import AgentContext, AgentError, ChatMessage, ToolCall, unique_call_ids
from rtcvoice.settings import Settings

log = logging.getLogger(__name__)

DELTA_KEYS = ("delta", "text", "content")
WHOLE_REPLY_KEYS = ("text", "reply", "response", "content", "message")
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines")


class WebhookAgent:
    name = "webhook"
    languages = None  # the backend's to decide
    chooses_model = True  # a session's model is forwarded for the backend to honour

    def __init__(self, settings: Settings) -> None:
        if not settings.webhook_url:
            raise AgentError(
                "agent=webhook needs the URL of your backend: set RTCVOICE_WEBHOOK_URL (or --webhook-url)."
            )
        self.url = settings.webhook_url
        self.token = settings.webhook_token
        self.timeout_s = settings.llm_timeout_s
        self.description = f"webhook ({self.url})"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop that will use it.
        if self._session is None or self._session.closed:
            headers = {"Accept": "text/event-stream, application/x-ndjson, application/json, text/plain"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            self._session = aiohttp.ClientSession(
                headers=headers,
                # Bound the time without progress (connecting, then each read), not the whole reply,
                # which may stream for longer.
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s
                ),
            )
        return self._session

    supports_tools = True

    async def stream(self, messages: list[ChatMessage], context: AgentContext) -> AsyncIterator[str]:
        tools = context.tools
        specs = tools.specs() if tools is not None else []
        history: list[dict[str, Any]] = [_wire(m) for m in messages]
        steps = 0
        spoken = ""
        while True:
            body: dict[str, Any] = {
                "session_id": context.session_id,
                "thread_id": context.thread_id,
                "user_id": context.user_id,
                "language": context.language,
                "model": context.model,
                "temperature": context.temperature,
                "max_tokens": context.max_tokens,
                "transcript": last_user_message(messages),
                "messages": history,
            }
            if specs:
                body["tools"] = specs
            calls: list[ToolCall] = []
            said = ""
            async for part in self._post(body):
                if isinstance(part, list):
                    calls += part
                    continue
                if not said and spoken and not spoken[-1].isspace() and not part[0].isspace():
                    part = " " + part  # a reply after tool calls: apart from the words before them
                said += part
                spoken += part
                yield part
            if not calls or tools is None or steps >= tools.max_steps:
                return
            steps += 1
            answers = await tools.run(calls)
            history += [
                {"role": "assistant", "content": said, "tool_calls": [c.as_openai() for c in calls]},
                *(_wire(m) for m in answers),
            ]

    async def _post(self, body: dict[str, Any]) -> AsyncIterator[str | list[ToolCall]]:
        try:
            async with self._client().post(self.url, json=body) as resp:
                if resp.status >= 300:
                    text = (await resp.read()).decode("utf-8", errors="replace")
                    raise AgentError(
                        f"webhook {self.url} returned HTTP {resp.status}: {_snippet(text) or '(empty body)'}"
                    )
                content_type = resp.content_type.lower()
                parts: AsyncGenerator[str | list[ToolCall], None]
                if content_type == "text/event-stream":
                    parts = _read_sse(resp)
                elif content_type in NDJSON_TYPES:
                    parts = _read_ndjson(resp)
                elif content_type == "application/json" or content_type.endswith("+json"):
                    parts = _read_json(resp)
                else:
                    parts = _read_text(resp)
                async with contextlib.aclosing(parts):
                    async for part in parts:
                        if part:
                            yield part
                # Leaving the `async with` early (error, or the consumer cancelled on barge-in)
                # closes the connection instead of reading the rest, so the backend sees it.
        except TimeoutError as exc:
            raise AgentError(f"webhook {self.url} sent nothing for {self.timeout_s:g} s") from exc
        except aiohttp.ClientError as exc:
            raise AgentError(f"webhook {self.url} failed: {exc!r}") from exc

    async def warm_up(self) -> None:
        # Creating the session is all there is to prepare; calling the backend could have effects.
        self._client()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    decoder = _decoder(resp)
    async for raw in resp.content:
        yield decoder.decode(raw).rstrip("\r\n")
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


async def _read_sse(resp: aiohttp.ClientResponse) -> AsyncGenerator[str | list[ToolCall], None]:
    event = ""
    data: list[str] = []
    async for line in _lines(resp):
        if line:
            if line.startswith(":"):  # comment / keep-alive
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "event":
                event = value
            continue
        # A blank line dispatches the event (as browsers' EventSource do).
        if data:
            payload = "\n".join(data)
            if payload.strip() == "[DONE]":
                return
            if event == "error":
                raise AgentError(f"webhook {resp.url} sent an error event: {_snippet(payload)}")
            yield _delta_from_payload(payload, resp)
        event, data = "", []
    # A body that ends without the final blank line still delivers its last event.
    if data:
        payload = "\n".join(data)
        if payload.strip() != "[DONE]":
            yield _delta_from_payload(payload, resp)


def _delta_from_payload(payload: str, resp: aiohttp.ClientResponse) -> str | list[ToolCall]:
    try:
        value = json.loads(payload)
    except json.JSONDecodeError:
        return payload  # plain-text SSE
    if isinstance(value, dict):
        return _delta_from_object(value, resp)
    if isinstance(value, str):
        return value
    return payload  # a bare number or the like: the text as sent


async def _read_ndjson(resp: aiohttp.ClientResponse) -> AsyncGenerator[str | list[ToolCall], None]:
    async for line in _lines(resp):
        line = line.strip()
        if not line:
            continue
        if line == "[DONE]":
            return
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AgentError(
                f"webhook {resp.url} sent an NDJSON line that is not JSON: {_snippet(line)}"
            ) from exc
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            yield _delta_from_object(value, resp)
        else:
            raise AgentError(
                f"webhook {resp.url} sent an NDJSON line that is not an object: {_snippet(line)}"
            )


def _delta_from_object(obj: dict[str, Any], resp: aiohttp.ClientResponse) -> str | list[ToolCall]:
    if obj.get("error"):
        raise AgentError(f"webhook {resp.url} reported an error: {_snippet(json.dumps(obj['error']))}")
    if "tool_calls" in obj:
        return _tool_calls(obj["tool_calls"], resp)
    choices = obj.get("choices")
    if isinstance(choices, list):  # an OpenAI chat.completion.chunk
        if not choices or not isinstance(choices[0], dict):
            return ""  # e.g. the final usage chunk
        delta = choices[0].get("delta") or choices[0].get("message") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        return content if isinstance(content, str) else ""
    for key in DELTA_KEYS:
        value = obj.get(key)
        if isinstance(value, str):
            return value
    # Other events (metadata, tool progress...) carry no text to speak.
    log.debug("webhook event without text ignored: %s", _snippet(json.dumps(obj)))
    return ""


async def _read_json(resp: aiohttp.ClientResponse) -> AsyncGenerator[str | list[ToolCall], None]:
    raw = await resp.read()
    try:
        value = json.loads(raw.decode("utf-8", errors="replace"))  # JSON is UTF-8 (RFC 8259)
    except json.JSONDecodeError as exc:
        raise AgentError(
            f"webhook {resp.url} sent invalid JSON: {_snippet(raw.decode(errors='replace'))}"
        ) from exc
    if isinstance(value, dict) and value.get("error"):
        raise AgentError(f"webhook {resp.url} reported an error: {_snippet(json.dumps(value['error']))}")
    if isinstance(value, dict) and "tool_calls" in value:
        text = _whole_reply(value)
        if text:
            yield text
        yield _tool_calls(value["tool_calls"], resp)
        return
    text = _whole_reply(value)
    if text is None:
        raise AgentError(
            f"webhook {resp.url} JSON reply has no text: expected one of {', '.join(WHOLE_REPLY_KEYS)} "
            f"(got {_snippet(json.dumps(value))})"
        )
    yield text


def _tool_calls(value: Any, resp: aiohttp.ClientResponse) -> list[ToolCall]:
    """The calls a backend asks for: ``{"id", "name", "arguments"}`` or OpenAI's shape each."""
    if not isinstance(value, list):
        raise AgentError(
            f"webhook {resp.url} sent tool_calls that are not a list: {_snippet(json.dumps(value))}"
        )
    calls = []
    for item in value:
        fn = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise AgentError(
                f"webhook {resp.url} sent a tool call without a name: {_snippet(json.dumps(item))}"
            )
        arguments = fn.get("arguments", {})
        calls.append(
            ToolCall(
                id=str(item.get("id") or ""),
                name=fn["name"],
                arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
            )
        )
    return unique_call_ids(calls)


def _wire(message: ChatMessage) -> dict[str, Any]:
    """A message as the backend gets it: role and content, and the tool fields where there are any."""
    return {k: v for k, v in message.items() if k in ("role", "content", "tool_calls", "tool_call_id")}


def _whole_reply(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        return None
    for key in WHOLE_REPLY_KEYS:
        item = value.get(key)
        if isinstance(item, str):
            return item
        if isinstance(item, dict) and isinstance(item.get("content"), str):  # {"message": {"content": ...}}
            return str(item["content"])
    choices = value.get("choices")  # a whole OpenAI chat.completion
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return _whole_reply(choices[0])
    return None


async def _read_text(resp: aiohttp.ClientResponse) -> AsyncGenerator[str, None]:
    # Incremental decoding: a chunk boundary may split a multi-byte character.
    decoder = _decoder(resp)
    async for chunk in resp.content.iter_any():
        text = decoder.decode(chunk)
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def _decoder(resp: aiohttp.ClientResponse) -> codecs.IncrementalDecoder:
    try:
        return codecs.getincrementaldecoder(resp.charset or "utf-8")(errors="replace")
    except LookupError:
        log.warning("webhook %s declared unknown charset %r; decoding as UTF-8", resp.url, resp.charset)
        return codecs.getincrementaldecoder("utf-8")(errors="replace")


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
