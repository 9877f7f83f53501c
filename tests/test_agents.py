"""The agents against real local servers: a fake OpenAI-compatible server, small webhook backends,
and the real embedded SmolLM2 via llama-cpp-python. Nothing of openai or aiohttp is mocked."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from fake_openai import FakeOpenAI

from rtcvoice.engines.agents import create_agent, describe_agent, resolve_agent_kind
from rtcvoice.engines.agents.echo import EchoAgent
from rtcvoice.engines.agents.local_llama import LocalLlamaAgent, embedded_model_path
from rtcvoice.engines.agents.openai_chat import OpenAIChatAgent
from rtcvoice.engines.agents.webhook import WebhookAgent
from rtcvoice.engines.base import Agent, AgentContext, AgentError, ChatMessage
from rtcvoice.settings import Settings

CONTEXT = AgentContext(session_id="sess-1", thread_id="thread-9", user_id="user-7", language="en")
HISTORY: list[ChatMessage] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
]


async def collect(
    agent: Agent,
    messages: list[ChatMessage] = HISTORY,
    timeout: float = 10.0,
    context: AgentContext = CONTEXT,
) -> list[str]:
    async def run() -> list[str]:
        return [delta async for delta in agent.stream(messages, context)]

    return await asyncio.wait_for(run(), timeout)


async def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# -- OpenAI-compatible endpoint -----------------------------------------------------------------------


def openai_settings(fake: FakeOpenAI, **changes: Any) -> Settings:
    return Settings(agent="openai", openai_base_url=fake.base_url, llm_model="fake-model", **changes)


async def test_openai_agent_streams_deltas_in_order_and_sends_system_and_history() -> None:
    async with FakeOpenAI("Six. Anything else?") as fake:
        agent = create_agent(openai_settings(fake, llm_max_tokens=42, llm_temperature=0.3))
        try:
            assert isinstance(agent, OpenAIChatAgent)
            deltas = await collect(agent)
        finally:
            await agent.aclose()
    assert deltas == ["Six.", " Anything", " else?"]
    [request] = fake.requests
    assert request["messages"] == HISTORY
    assert request["model"] == "fake-model"
    assert request["stream"] is True
    assert request["max_tokens"] == 42
    assert request["temperature"] == 0.3


async def test_openai_agent_holds_its_requests_in_flight_to_the_pool_cap_and_queues_the_rest() -> None:
    async with FakeOpenAI("One two three four five.", token_delay=0.05) as fake:
        agent = create_agent(openai_settings(fake, pool_max_requests=2))
        try:
            replies = await asyncio.gather(*(collect(agent, timeout=20) for _ in range(5)))
        finally:
            await agent.aclose()
    assert all("".join(r) == "One two three four five." for r in replies)  # queued, none refused
    assert fake.max_in_flight == 2


async def test_openai_agent_takes_the_sessions_model_and_sampling_and_reports_the_usage() -> None:
    async with FakeOpenAI("Six. Anything else?") as fake:
        agent = create_agent(openai_settings(fake, llm_max_tokens=42, llm_temperature=0.3))
        context = AgentContext(session_id="s", model="mistral-7b", temperature=0.8, max_tokens=4096)
        try:
            await collect(agent, context=context)
        finally:
            await agent.aclose()
    [request] = fake.requests
    assert (request["model"], request["temperature"], request["max_tokens"]) == ("mistral-7b", 0.8, 4096)
    assert request["stream_options"] == {"include_usage": True}
    # What the endpoint's final usage chunk said the reply cost.
    prompt = sum(len(m["content"].split()) for m in HISTORY)
    assert context.usage.as_dict() == {"input_tokens": prompt, "output_tokens": 3, "total_tokens": prompt + 3}


async def test_openai_agent_asks_for_no_usage_where_the_server_would_refuse_stream_options() -> None:
    async with FakeOpenAI("Six.") as fake:
        agent = create_agent(openai_settings(fake, llm_stream_usage=False))
        context = AgentContext(session_id="s")
        try:
            await collect(agent, context=context)
        finally:
            await agent.aclose()
    assert "stream_options" not in fake.requests[0]
    assert context.usage.as_dict() is None, "no usage reported is null, not zeros"


async def test_openai_agent_reply_can_depend_on_the_conversation() -> None:
    def reply(messages: list[dict[str, Any]]) -> str:
        return f"You asked: {messages[-1]['content']}"

    async with FakeOpenAI(reply) as fake:
        agent = create_agent(openai_settings(fake))
        try:
            assert "".join(await collect(agent)) == "You asked: And three plus three?"
        finally:
            await agent.aclose()


async def test_openai_agent_http_500_raises_agent_error_with_status_and_url() -> None:
    async with FakeOpenAI(fault="500") as fake:
        agent = create_agent(openai_settings(fake))
        try:
            with pytest.raises(AgentError) as info:
                await collect(agent)
        finally:
            await agent.aclose()
    assert "500" in str(info.value)
    assert fake.base_url in str(info.value)
    assert len(fake.requests) == 1, "no silent retries while the caller waits"


async def test_openai_agent_garbage_stream_raises_agent_error_instead_of_crashing() -> None:
    async with FakeOpenAI(fault="garbage") as fake:
        agent = create_agent(openai_settings(fake))
        try:
            with pytest.raises(AgentError, match="not chat-completions JSON"):
                await collect(agent, timeout=5)
        finally:
            await agent.aclose()


@pytest.mark.parametrize("fault", ["hang", "slow_first_token"])
async def test_openai_agent_stalled_stream_times_out_as_agent_error(fault: str) -> None:
    async with FakeOpenAI(fault=fault) as fake:
        agent = create_agent(openai_settings(fake, llm_timeout_s=0.5))
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(AgentError, match="0.5 s"):
                await collect(agent, timeout=5)
            assert loop.time() - started < 3
        finally:
            await agent.aclose()


async def test_cancelling_openai_consumer_returns_promptly_and_closes_the_http_stream() -> None:
    words = " ".join(f"word{i}" for i in range(200))
    async with FakeOpenAI(words, token_delay=0.02) as fake:
        agent = create_agent(openai_settings(fake))
        try:
            received: list[str] = []
            three = asyncio.Event()

            async def consume() -> None:
                async for delta in agent.stream(HISTORY, CONTEXT):
                    received.append(delta)
                    if len(received) == 3:
                        three.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(three.wait(), 5)
            loop = asyncio.get_running_loop()
            started = loop.time()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert loop.time() - started < 0.3
            assert await wait_until(lambda: fake.disconnects == 1), "the server never saw the stream closed"
            assert fake.completed == 0
            assert len(received) < 20

            # The agent still works for the next turn.
            fake.reply, fake.token_delay = "Still here.", 0.0
            assert "".join(await collect(agent)) == "Still here."
        finally:
            await agent.aclose()


# -- webhook --------------------------------------------------------------------------------------------

REPLY = "Hi there, friend."
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def stream_lines(request: web.Request, content_type: str, lines: list[str]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": content_type})
    await resp.prepare(request)
    for line in lines:
        await resp.write(line.encode())
        await asyncio.sleep(0.01)
    await resp.write_eof()
    return resp


def chunk(content: str) -> str:
    obj = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}
    return f"data: {json.dumps(obj)}\n\n"


async def sse_keys(request: web.Request) -> web.StreamResponse:
    # One payload per supported key, an unrelated event, a keep-alive comment, then [DONE] and junk.
    lines = [
        ": keep-alive\n\n",
        f"data: {json.dumps({'delta': 'Hi'})}\n\n",
        f"event: meta\ndata: {json.dumps({'tool': 'lookup'})}\n\n",
        f"data: {json.dumps({'text': ' there,'})}\n\n",
        f"data: {json.dumps({'content': ' friend.'})}\n\n",
        "data: [DONE]\n\n",
        f"data: {json.dumps({'delta': ' (after done)'})}\n\n",
    ]
    return await stream_lines(request, "text/event-stream", lines)


async def sse_openai_chunks(request: web.Request) -> web.StreamResponse:
    role = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    usage = {"object": "chat.completion.chunk", "choices": [], "usage": {"total_tokens": 3}}
    lines = [f"data: {json.dumps(role)}\n\n", chunk("Hi"), chunk(" there,"), chunk(" friend.")]
    lines += [f"data: {json.dumps(usage)}\n\n", "data: [DONE]\n\n"]
    return await stream_lines(request, "text/event-stream; charset=utf-8", lines)


async def sse_plain_text(request: web.Request) -> web.StreamResponse:
    return await stream_lines(
        request, "text/event-stream", ["data: Hi\n\n", "data:  there,\r\n\r\n", "data:  friend.\n\n"]
    )


async def ndjson(request: web.Request) -> web.StreamResponse:
    lines = [json.dumps({"delta": "Hi"}) + "\n", "\n", json.dumps({"text": " there,"}) + "\n"]
    lines.append(json.dumps({"content": " friend.", "done": True}) + "\n")
    return await stream_lines(request, "application/x-ndjson", lines)


async def whole_json(request: web.Request) -> web.StreamResponse:
    return web.json_response({"reply": REPLY, "thread_id": "thread-9"})


async def text_plain(request: web.Request) -> web.StreamResponse:
    encoded = REPLY.encode()
    return await stream_lines_bytes(request, [encoded[:3], encoded[3:10], encoded[10:]])


async def stream_lines_bytes(request: web.Request, parts: list[bytes]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    for part in parts:
        await resp.write(part)
        await asyncio.sleep(0.02)
    await resp.write_eof()
    return resp


async def text_plain_utf8_split(request: web.Request) -> web.StreamResponse:
    encoded = "Café au lait.".encode()
    cut = encoded.index("é".encode()) + 1  # inside the two-byte "é"
    return await stream_lines_bytes(request, [encoded[:cut], encoded[cut:]])


class Backend:
    """A developer's backend, as far as the webhook agent can tell."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[dict[str, Any], dict[str, str]]] = []
        self.url = ""
        self.disconnects = 0  # replies the agent hung up on
        self._runner: web.AppRunner | None = None

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((await request.json(), dict(request.headers)))
        try:
            return await self.handler(request)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise

    async def __aenter__(self) -> Backend:
        app = web.Application()
        app.router.add_post("/voice/turn", self._serve)
        # handler_cancellation: a client hanging up cancels the handler, so tests can see it.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/voice/turn"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.mark.parametrize(
    "handler",
    [sse_keys, sse_openai_chunks, sse_plain_text, ndjson, whole_json, text_plain],
    ids=lambda h: h.__name__,
)
async def test_webhook_agent_reads_each_reply_format(handler: Handler) -> None:
    async with Backend(handler) as backend:
        agent = create_agent(Settings(agent="webhook", webhook_url=backend.url))
        try:
            assert isinstance(agent, WebhookAgent)
            parts = await collect(agent, timeout=5)
        finally:
            await agent.aclose()
    assert "".join(parts) == REPLY
    if handler is not whole_json:
        assert len(parts) > 1, "a streamed reply must reach the caller in pieces, as it arrives"


async def test_webhook_agent_decodes_utf8_cut_across_chunks() -> None:
    async with Backend(text_plain_utf8_split) as backend:
        agent = WebhookAgent(Settings(webhook_url=backend.url))
        try:
            assert "".join(await collect(agent, timeout=5)) == "Café au lait."
        finally:
            await agent.aclose()


async def test_webhook_agent_sends_session_thread_transcript_history_and_bearer_token() -> None:
    async with Backend(whole_json) as backend:
        agent = WebhookAgent(Settings(webhook_url=backend.url, webhook_token="s3cret"))
        try:
            await collect(agent, timeout=5)
        finally:
            await agent.aclose()
    [(body, headers)] = backend.requests
    assert body == {
        "session_id": "sess-1",
        "thread_id": "thread-9",
        "user_id": "user-7",
        "language": "en",
        # The session made no choice of its own: the backend's defaults apply.
        "model": None,
        "temperature": None,
        "max_tokens": None,
        "transcript": "And three plus three?",
        "messages": HISTORY,
    }
    assert headers["Authorization"] == "Bearer s3cret"


async def test_webhook_agent_non_2xx_raises_agent_error_with_status_and_body() -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=502, text="upstream exploded")

    async with Backend(failing) as backend:
        agent = WebhookAgent(Settings(webhook_url=backend.url))
        try:
            with pytest.raises(AgentError, match=r"502.*upstream exploded"):
                await collect(agent, timeout=5)
        finally:
            await agent.aclose()


async def test_webhook_agent_json_without_reply_text_raises_agent_error() -> None:
    async def no_text(request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async with Backend(no_text) as backend:
        agent = WebhookAgent(Settings(webhook_url=backend.url))
        try:
            with pytest.raises(AgentError, match="no text"):
                await collect(agent, timeout=5)
        finally:
            await agent.aclose()


async def test_webhook_agent_unreachable_raises_agent_error() -> None:
    async with Backend(whole_json) as backend:
        url = backend.url
    agent = WebhookAgent(Settings(webhook_url=url))  # the backend is gone now
    try:
        with pytest.raises(AgentError, match="failed"):
            await collect(agent, timeout=5)
    finally:
        await agent.aclose()


async def test_webhook_agent_stalled_backend_times_out_as_agent_error() -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(f"data: {json.dumps({'delta': 'Hmm'})}\n\n".encode())
        await asyncio.sleep(30)
        return resp

    async with Backend(stall) as backend:
        agent = WebhookAgent(Settings(webhook_url=backend.url, llm_timeout_s=0.3))
        try:
            parts: list[str] = []
            with pytest.raises(AgentError, match="0.3 s"):
                async with asyncio.timeout(5):
                    async for part in agent.stream(HISTORY, CONTEXT):
                        parts.append(part)
            assert parts == ["Hmm"]
        finally:
            await agent.aclose()


async def test_cancelling_webhook_consumer_closes_the_connection_to_the_backend() -> None:
    async def slow_sse(request: web.Request) -> web.StreamResponse:
        lines = [f"data: {json.dumps({'delta': f' w{i}'})}\n\n" for i in range(100)]
        return await stream_lines(request, "text/event-stream", lines)

    async with Backend(slow_sse) as backend:
        agent = WebhookAgent(Settings(webhook_url=backend.url))
        try:
            first = asyncio.Event()

            async def consume() -> None:
                async for _ in agent.stream(HISTORY, CONTEXT):
                    first.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(first.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 0.3)
            assert await wait_until(lambda: backend.disconnects == 1), "the backend kept streaming to nobody"
        finally:
            await agent.aclose()


# -- fake OpenAI server ----------------------------------------------------------------------------------


async def test_fake_openai_speaks_what_the_official_client_parses() -> None:
    import openai

    async with FakeOpenAI("One two.") as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
        try:
            whole = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=False
            )
            assert whole.choices[0].message.content == "One two."
            chunks = [
                c
                async for c in await client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            ]
        finally:
            await client.close()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:3]] == ["One", " two."]
    assert chunks[3].choices[0].finish_reason == "stop"
    assert chunks[4].choices == [] and chunks[4].usage is not None
    assert len(fake.requests) == 2 and fake.completed == 1


# -- echo ---------------------------------------------------------------------------------------------


async def test_echo_agent_repeats_the_last_user_message_word_by_word() -> None:
    agent = create_agent(Settings(agent="echo"))
    assert isinstance(agent, EchoAgent) and agent.name == "echo"
    parts = await collect(agent, [{"role": "user", "content": "  hello world "}])
    assert parts == ["You", " said:", " hello", " world."]
    assert "".join(await collect(agent)) == "You said: And three plus three?"


# -- factory --------------------------------------------------------------------------------------------


async def test_factory_auto_picks_openai_when_a_base_url_is_set(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="rtcvoice.engines.agents"):
        agent = create_agent(Settings(agent="auto", openai_base_url="http://127.0.0.1:9/v1"))
    try:
        assert isinstance(agent, OpenAIChatAgent)
        assert describe_agent(agent) == "openai (model gpt-4o-mini at http://127.0.0.1:9/v1)"
        assert "agent: openai (model gpt-4o-mini at http://127.0.0.1:9/v1)" in caplog.text
    finally:
        await agent.aclose()


async def test_factory_auto_picks_openai_when_only_an_api_key_is_set() -> None:
    agent = create_agent(Settings(agent="auto", openai_api_key="sk-test"))
    try:
        assert isinstance(agent, OpenAIChatAgent)
        assert agent.base_url == "https://api.openai.com/v1"
    finally:
        await agent.aclose()


def test_factory_auto_without_endpoint_picks_local() -> None:
    assert resolve_agent_kind(Settings(agent="auto")) == "local"


def test_factory_webhook_without_url_says_to_set_rtcvoice_webhook_url() -> None:
    with pytest.raises(AgentError, match="RTCVOICE_WEBHOOK_URL"):
        create_agent(Settings(agent="webhook"))


def test_factory_openai_without_url_or_key_says_to_set_openai_base_url() -> None:
    with pytest.raises(AgentError, match="OPENAI_BASE_URL"):
        create_agent(Settings(agent="openai"))


def test_factory_local_with_missing_gguf_names_the_path() -> None:
    with pytest.raises(AgentError, match="/nonexistent/model.gguf"):
        create_agent(Settings(agent="local", llm_model="/nonexistent/model.gguf"))


def test_factory_unknown_agent_lists_the_choices() -> None:
    with pytest.raises(AgentError, match="webhook"):
        create_agent(Settings(agent="gpt"))


# -- local SmolLM2 ---------------------------------------------------------------------------------------

needs_local = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or embedded_model_path() is None,
    reason="the local extra is not installed: pip install 'rtcvoice[local]'",
)


@needs_local
async def test_factory_auto_without_endpoint_builds_the_embedded_local_agent() -> None:
    agent = create_agent(Settings(agent="auto"))
    try:
        assert isinstance(agent, LocalLlamaAgent)
        assert agent.model_path == embedded_model_path()
    finally:
        await agent.aclose()


@needs_local
async def test_factory_local_runs_the_gguf_named_by_llm_model() -> None:
    path = embedded_model_path()
    assert path is not None
    agent = create_agent(Settings(agent="local", llm_model=str(path), llm_threads=3))
    try:
        assert isinstance(agent, LocalLlamaAgent)
        assert agent.model_path == path and agent.n_threads == 3
        assert path.name in describe_agent(agent)
    finally:
        await agent.aclose()


@pytest.fixture(scope="module")
async def local_agent() -> AsyncIterator[LocalLlamaAgent]:
    settings = Settings(agent="local", llm_max_tokens=16, llm_temperature=0.0, llm_threads=1)
    agent = create_agent(settings)
    assert isinstance(agent, LocalLlamaAgent)
    yield agent
    await agent.aclose()


@needs_local
async def test_local_agent_streams_text_while_the_event_loop_keeps_ticking(
    local_agent: LocalLlamaAgent,
) -> None:
    loop = asyncio.get_running_loop()
    gaps: list[float] = []

    async def ticker() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    try:
        started = loop.time()
        await local_agent.warm_up()  # loads the model: also off the loop
        parts = await collect(local_agent, [{"role": "user", "content": "Say hello."}], timeout=30)
        busy = loop.time() - started
    finally:
        ticking.cancel()
    text = "".join(parts)
    assert text.strip(), "the local model said nothing"
    assert text == text.lstrip(), "the first token's leading whitespace is spoken as a pause"
    assert len(parts) > 1
    # Were generation on the loop, the ticker would stall for the whole load + generation.
    assert len(gaps) > busy / 0.05
    assert max(gaps) < 0.2, f"event loop blocked for {max(gaps) * 1000:.0f} ms"


@needs_local
async def test_local_agent_cancel_mid_generation_then_answers_again(local_agent: LocalLlamaAgent) -> None:
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in local_agent.stream([{"role": "user", "content": "Tell me a story."}], CONTEXT):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    loop = asyncio.get_running_loop()
    started = loop.time()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert loop.time() - started < 0.2
    parts = await collect(local_agent, [{"role": "user", "content": "Say hi."}], timeout=30)
    assert "".join(parts).strip()


# A short history the prepared-prompt tests read ahead of a question.
ADA_HISTORY: list[ChatMessage] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "My name is Ada."},
    {"role": "assistant", "content": "Hello Ada."},
]


@needs_local
async def test_a_prepared_local_agent_holds_the_history_and_answers_as_an_unprepared_one(
    local_agent: LocalLlamaAgent,
) -> None:
    history = list(ADA_HISTORY)
    question: ChatMessage = {"role": "user", "content": "What is my name?"}
    unprepared = "".join(await collect(local_agent, [*history, question], timeout=30))
    await local_agent.prepare([{"role": "system", "content": "Something else entirely."}])  # evicts it
    await local_agent.prepare(history)
    llm = local_agent._llm
    assert llm is not None
    # The model's context now starts with the whole history (plus the empty user turn it was
    # read with), so the next request only reads the question.
    prompt = llm.tokenize(b"<|im_start|>user\nMy name is Ada.<|im_end|>", add_bos=False, special=True)
    held = list(llm._input_ids[: llm.n_tokens])
    assert any(held[i : i + len(prompt)] == prompt for i in range(len(held))), "history not evaluated"
    prepared = "".join(await collect(local_agent, [*history, question], timeout=30))
    assert prepared == unprepared  # temperature 0: the cache changes the speed, not the answer


@needs_local
async def test_a_local_agent_reads_the_callers_words_so_far_before_the_turn_ends(
    local_agent: LocalLlamaAgent,
) -> None:
    history = list(ADA_HISTORY)
    question: ChatMessage = {"role": "user", "content": "What is the capital city of France?"}
    unprepared = "".join(await collect(local_agent, [*history, question], timeout=30))
    await local_agent.prepare(history)
    await collect(local_agent, [*history, question], timeout=30)
    assert local_agent.last_turn is not None
    after_history = local_agent.last_turn.evaluated  # the question and the markup that closes it

    await local_agent.prepare(history)
    await local_agent.prepare(history, said="What is the capital")  # a partial transcript
    assert local_agent.last_prefill is not None and 0 < local_agent.last_prefill.evaluated <= 6
    answer = "".join(await collect(local_agent, [*history, question], timeout=30))
    assert local_agent.last_turn is not None
    # The turn read only the words after the partial ones (and the markup), not the whole question.
    assert local_agent.last_turn.evaluated <= after_history - 4, (local_agent.last_turn, after_history)
    assert answer == unprepared  # temperature 0: the cache changes the speed, not the answer

    # Words on top of a cache that holds another prompt (another call's) are not read: a guess
    # must not evict a prompt that was read for sure.
    await local_agent.prepare([{"role": "system", "content": "Something else entirely."}])
    other = local_agent.last_prefill
    await local_agent.prepare(history, said="What is the capital")
    assert local_agent.last_prefill is other


@needs_local
async def test_local_agent_reports_the_tokens_its_streamed_reply_cost(local_agent: LocalLlamaAgent) -> None:
    question: list[ChatMessage] = [{"role": "user", "content": "Tell me about the history of France."}]
    for max_tokens in (5, 200):  # cut at the limit, and (most likely) ended by the model
        context = AgentContext(session_id="s", max_tokens=max_tokens)
        await collect(local_agent, question, timeout=60, context=context)
        llm = local_agent._llm
        assert llm is not None
        # llama.cpp's own count for the same request, not streamed (temperature 0: the same reply).
        whole = llm.create_chat_completion(messages=question, max_tokens=max_tokens, temperature=0.0)
        usage = whole["usage"]
        assert context.usage.as_dict() == {
            "input_tokens": usage["prompt_tokens"],
            "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
        }
