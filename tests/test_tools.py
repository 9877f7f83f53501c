"""Tools during a call: the model's streamed tool calls are run, answered and continued in the
same reply; failures are spoken about, never the end of the call; barge-in cancels a running
tool; the AI can hang up. Real servers throughout: rtcvoice, the local OpenAI-protocol server
(tests/fake_openai.py, streaming tool_calls deltas as OpenAI does), an HTTP tool server, and a
real WebRTC call for end_call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import tool_pack
from aiohttp import web
from conftest import BASE_SETTINGS, ServerFactory, echo_agent, openai_agent
from fake_openai import FakeOpenAI, ToolCalls

from rtcvoice.client import VoiceCallClient
from rtcvoice.engines.agents.webhook import WebhookAgent
from rtcvoice.tools.python import load_python_tools

API = "/api/v1/voice"
TURN_S = 30


@contextlib.asynccontextmanager
async def text_call(url: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}{API}/session/start", json={"session_type": "text"}) as resp:
            assert resp.status == 200, await resp.text()
            started = await resp.json()
        async with http.ws_connect(started["ws_url"]) as ws:
            await ws.receive_json(timeout=10)  # session.started
            yield ws


async def events_until(ws: aiohttp.ClientWebSocketResponse, kind: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(TURN_S):
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                seen.append(msg.json())
                if seen[-1]["type"] == kind:
                    return seen
    raise AssertionError(f"the socket closed before {kind}: {seen}")


async def turn(ws: aiohttp.ClientWebSocketResponse, content: str) -> list[dict[str, Any]]:
    await ws.send_json({"type": "text_message", "content": content})
    return await events_until(ws, "end_of_response")


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def last(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return messages[-1]


@pytest.fixture(autouse=True)
def clean_tool_pack() -> None:
    tool_pack.SEEN.clear()
    tool_pack.RUNS.clear()
    tool_pack.CANCELLED.clear()


async def test_a_python_tool_is_called_and_its_result_continues_the_same_reply(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        if last(messages)["role"] == "tool":
            return f"In Paris it is {json.loads(last(messages)['content'])['temperature']} degrees."
        if "Paris" not in last(messages)["content"]:
            return "The same, I think."
        return ToolCalls([("get_weather", {"city": "Paris", "days": 2})], text="Let me look.")

    fake_openai.reply = model
    url = await start_server(agent=openai_agent(fake_openai), tools="tool_pack:TOOLS")
    async with text_call(url) as ws:
        events = await turn(ws, "What's the weather in Paris?")
        # The next turn still knows what the tool did: the call and its result are history.
        await turn(ws, "And tomorrow?")
    offered = {t["function"]["name"]: t["function"] for t in fake_openai.requests[0]["tools"]}
    assert set(offered) == {"get_weather", "slow_lookup", "broken", "whoami"}
    weather = offered["get_weather"]
    assert weather["description"] == "The weather in a city."
    assert weather["parameters"]["required"] == ["city"]
    assert weather["parameters"]["properties"]["unit"]["enum"] == ["c", "f"]
    assert (
        "context" not in offered["whoami"]["parameters"]["properties"]
    )  # the caller's identity is not the model's
    assert tool_pack.SEEN == [("get_weather", ("Paris", "c", 2))]
    [call] = of(events, "tool_call")
    assert call["name"] == "get_weather" and call["arguments"] == {"city": "Paris", "days": 2}
    [result] = of(events, "tool_result")
    assert result["id"] == call["id"] and result["ok"] is True and '"temperature": 12' in result["summary"]
    done = of(events, "end_of_response")[0]
    assert done["text"] == "Let me look. In Paris it is 12 degrees."
    # The model got its own call back, then the result, in OpenAI's shape.
    asked, answered = fake_openai.requests[1]["messages"][-2:]
    assert asked["role"] == "assistant" and asked["tool_calls"][0]["function"]["name"] == "get_weather"
    assert answered == {"role": "tool", "tool_call_id": call["id"], "content": result["summary"]}
    later = [m["role"] for m in fake_openai.requests[2]["messages"]]
    assert later[-5:] == ["user", "assistant", "tool", "assistant", "user"]


async def test_parallel_calls_run_at_once_and_steps_chain_until_the_model_answers(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        tool_results = [m for m in messages if m["role"] == "tool"]
        if not tool_results:  # step 1: two lookups at once
            return ToolCalls([("slow_lookup", {"topic": "trains"}), ("slow_lookup", {"topic": "hotels"})])
        if len(tool_results) == 2:  # step 2: one that needs step 1's results
            return ToolCalls([("get_weather", {"city": "Lyon"})])
        return "Trains and hotels are found, and Lyon is mild."

    fake_openai.reply = model
    url = await start_server(agent=openai_agent(fake_openai), tools="tool_pack:TOOLS")
    async with text_call(url) as ws:
        events = await turn(ws, "Plan my trip.")
    assert [e["name"] for e in of(events, "tool_call")] == ["slow_lookup", "slow_lookup", "get_weather"]
    assert all(e["ok"] for e in of(events, "tool_result"))
    (t_start, t_end), (h_start, h_end) = tool_pack.RUNS["trains"][0], tool_pack.RUNS["hotels"][0]
    assert t_start < h_end and h_start < t_end, "the two calls of one step ran one after the other"
    assert of(events, "end_of_response")[0]["text"] == "Trains and hotels are found, and Lyon is mild."
    assert len(fake_openai.requests) == 3


async def test_a_model_that_keeps_calling_tools_must_answer_after_the_step_limit(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        return ToolCalls([("get_weather", {"city": "Oslo"})], text="Checking.")

    fake_openai.reply = model
    url = await start_server(agent=openai_agent(fake_openai), tools="tool_pack:TOOLS", max_tool_steps=2)
    async with text_call(url) as ws:
        events = await turn(ws, "Weather?")
    assert len(of(events, "tool_call")) == 2
    assert [r.get("tool_choice") for r in fake_openai.requests] == ["auto", "auto", "none"]
    assert of(events, "end_of_response")[0]["interrupted"] is False


async def test_tools_that_fail_hang_or_get_junk_are_answered_as_errors_and_the_call_goes_on(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        if last(messages)["role"] == "tool":
            return "Sorry, I could not do that."
        if "again" in last(messages)["content"]:
            return "Still here."
        return ToolCalls(
            [
                ("broken", {"reason": "oops"}),
                ("slow_lookup", {"topic": "forever", "seconds": 60}),
                ("get_weather", '{"city": "Rome", '),  # cut-off JSON
                ("get_weather", {"city": 7}),  # against the schema
                ("no_such_tool", {}),
            ]
        )

    fake_openai.reply = model
    url = await start_server(agent=openai_agent(fake_openai), tools="tool_pack:TOOLS", tool_timeout_s=0.5)
    async with text_call(url) as ws:
        events = await turn(ws, "Do everything.")
        after = await turn(ws, "Are you there again?")
    results = of(events, "tool_result")
    assert [r["ok"] for r in results] == [False] * 5
    summaries = {r["id"]: r["summary"] for r in results}
    calls = of(events, "tool_call")
    assert [summaries[c["id"]] for c in calls] == [
        "the tool failed (RuntimeError)",
        "the tool did not answer within 0.5 s",
        "the arguments were not a JSON object",
        "invalid arguments: 7 is not of type 'string'",
        "there is no tool named 'no_such_tool'",
    ]
    assert not of(events, "error"), "a tool's failure is the model's to tell, not a call error"
    assert of(events, "end_of_response")[0]["text"] == "Sorry, I could not do that."
    errors = [json.loads(m["content"]) for m in fake_openai.requests[1]["messages"] if m["role"] == "tool"]
    assert all("error" in e for e in errors)
    assert of(after, "end_of_response")[0]["text"] == "Still here."
    assert tool_pack.SEEN == []  # neither bad call reached the tool


async def test_a_slow_tool_brings_a_filler_and_barge_in_cancels_it(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda messages: ToolCalls([("slow_lookup", {"topic": "deep", "seconds": 30})])
    url = await start_server(agent=openai_agent(fake_openai), tools="tool_pack:TOOLS", tool_filler_ms=200)
    async with text_call(url) as ws:
        await ws.send_json({"type": "text_message", "content": "Find it."})
        before = await events_until(ws, "ai_text")
        filler = of(before, "ai_text")[0]
        assert filler["text"].strip() == "One moment." and filler["filler"] is True
        assert of(before, "tool_call")[0]["name"] == "slow_lookup"
        await ws.send_json({"type": "interrupt"})
        after = await events_until(ws, "end_of_response")
    assert after[-1]["interrupted"] is True
    assert tool_pack.CANCELLED == ["deep"]
    assert of(after, "tool_result")[0]["summary"] == "cancelled"


async def test_an_http_tool_gets_the_callers_identity_and_the_token(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    posted: list[tuple[str | None, dict[str, Any]]] = []

    async def listing(request: web.Request) -> web.Response:
        assert request.headers.get("Authorization") == "Bearer tool-secret"
        spec = {
            "name": "book_table",
            "description": "Book a table.",
            "parameters": {
                "type": "object",
                "properties": {"people": {"type": "integer", "minimum": 1}},
                "required": ["people"],
            },
        }
        return web.json_response({"tools": [{"type": "function", "function": spec}]})

    async def run(request: web.Request) -> web.Response:
        posted.append((request.headers.get("Authorization"), await request.json()))
        if posted[-1][1]["arguments"]["people"] > 8:
            return web.json_response({"error": "no table that large"}, status=422)
        return web.json_response({"result": {"booked": True, "table": 4}})

    app = web.Application()
    app.router.add_get("/tools", listing)
    app.router.add_post("/tools", run)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:

        def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
            if last(messages)["role"] == "tool":
                return "Done." if "booked" in last(messages)["content"] else "That did not work."
            return ToolCalls([("book_table", {"people": 2 if "two" in last(messages)["content"] else 20})])

        fake_openai.reply = model
        url = await start_server(
            agent=openai_agent(fake_openai),
            tools_url=f"http://127.0.0.1:{port}/tools",
            tools_token="tool-secret",
        )
        async with text_call(url) as ws:
            ok = await turn(ws, "A table for two.")
            refused = await turn(ws, "A table for twenty.")
    finally:
        await runner.cleanup()
    assert of(ok, "end_of_response")[0]["text"] == "Done."
    assert of(refused, "tool_result")[0] == {
        **of(refused, "tool_result")[0],
        "ok": False,
        "summary": "no table that large",
    }
    assert of(refused, "end_of_response")[0]["text"] == "That did not work."
    token, body = posted[0]
    assert token == "Bearer tool-secret"
    assert body["name"] == "book_table" and body["arguments"] == {"people": 2}
    assert body["session_id"] == ok[0]["session_id"] and body["call_id"] == of(ok, "tool_call")[0]["id"]


async def test_end_call_hangs_up_a_webrtc_call_after_the_goodbye_is_heard(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        if last(messages)["role"] == "tool":
            return "Goodbye, and thanks for calling."
        return ToolCalls([("end_call", {})])

    fake_openai.reply = model
    url = await start_server(agent=openai_agent(fake_openai), builtin_tools="end_call,current_time")
    client = VoiceCallClient(url)
    await client.connect()
    try:
        client.send({"type": "text_message", "content": "That's all, bye!"})
        ended = await client.wait_for(lambda e: e.get("type") == "session.ended", 30)
        assert ended["reason"] == "agent_hangup"
        done = client.of_type("end_of_response")[0]
        assert done["text"] == "Goodbye, and thanks for calling." and done["interrupted"] is False
        # The goodbye was played before the call ended: its audio reached the caller.
        assert client.received.first_sound_after(0) is not None
        assert [e["name"] for e in client.of_type("tool_call")] == ["end_call"]
    finally:
        await client.close()
    offered = [t["function"]["name"] for t in fake_openai.requests[0]["tools"]]
    assert offered == ["end_call", "current_time"]


async def test_current_time_answers_in_the_callers_time_zone(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        if last(messages)["role"] == "tool":
            return "It is " + json.loads(last(messages)["content"])["timezone"] + " time."
        return ToolCalls([("current_time", {})])

    fake_openai.reply = model
    url = await start_server(
        agent=openai_agent(fake_openai), builtin_tools="current_time", timezone="Asia/Tokyo"
    )
    async with text_call(url) as ws:
        first = await turn(ws, "What time is it?")
        await ws.send_json({"type": "session.update", "timezone": "Mars/Olympus"})
        refused = await events_until(ws, "session.updated")
        await ws.send_json({"type": "session.update", "timezone": "Europe/Paris"})
        await events_until(ws, "session.updated")
        second = await turn(ws, "And now?")
    assert of(first, "end_of_response")[0]["text"] == "It is Asia/Tokyo time."
    assert of(refused, "error")[0]["code"] == "invalid_timezone"
    assert of(second, "end_of_response")[0]["text"] == "It is Europe/Paris time."
    assert json.loads(
        [m for m in fake_openai.requests[-1]["messages"] if m["role"] == "tool"][-1]["content"]
    )["iso"].endswith(("+01:00", "+02:00"))


async def test_an_mcp_servers_tools_are_offered_and_called_over_stdio(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        if last(messages)["role"] == "tool":
            return last(messages)["content"]
        order = "A17" if "A17" in last(messages)["content"] else "missing"
        return ToolCalls([("find_order", {"order_id": order})])

    fake_openai.reply = model
    server = Path(__file__).with_name("mcp_tool_server.py")
    url = await start_server(agent=openai_agent(fake_openai), mcp_servers=f"{sys.executable} {server}")
    async with text_call(url) as ws:
        found = await turn(ws, "Where is order A17?")
        missing = await turn(ws, "Where is my other order?")
    spec = fake_openai.requests[0]["tools"][0]["function"]
    assert spec["name"] == "find_order" and spec["parameters"]["required"] == ["order_id"]
    assert of(found, "end_of_response")[0]["text"] == "Order A17 ships on Tuesday."
    [result] = of(missing, "tool_result")
    assert result["ok"] is False and "no order missing" in result["summary"]


async def test_a_page_declares_a_tool_runs_it_and_answers_and_no_other_call_can_answer_it(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        if last(messages)["role"] == "tool":
            return "Opened: " + last(messages)["content"]
        return ToolCalls([("open_thread", {"title": "Trip"})])

    fake_openai.reply = model
    url = await start_server(agent=openai_agent(fake_openai), tools="tool_pack:TOOLS")
    declared = {
        "type": "function",
        "function": {
            "name": "open_thread",
            "description": "Open a thread in the app.",
            "parameters": {
                "type": "object",
                "properties": {"title": {"type": "string"}},
                "required": ["title"],
            },
        },
    }
    async with text_call(url) as ws, text_call(url) as other:
        await ws.send_json({"type": "session.update", "tools": [declared]})
        await events_until(ws, "session.updated")
        await other.send_json({"type": "session.update", "tools": [{"name": "whoami"}]})
        clash = await events_until(other, "session.updated")
        await ws.send_json({"type": "text_message", "content": "Open my trip thread."})
        asked = await events_until(ws, "tool_call")
        call = asked[-1]
        assert (
            call["client"] is True
            and call["name"] == "open_thread"
            and call["arguments"] == {"title": "Trip"}
        )
        # Another call cannot answer this one's tool call.
        await other.send_json({"type": "tool_result", "id": call["id"], "result": "forged"})
        refused = await events_until(other, "error")
        await ws.send_json({"type": "tool_result", "id": call["id"], "result": {"thread_id": "t-42"}})
        events = await events_until(ws, "end_of_response")
    assert of(clash, "error")[0]["code"] == "invalid_tools"  # a server tool's name is taken
    assert refused[-1]["code"] == "unknown_tool_call"
    assert of(events, "tool_result")[0]["ok"] is True
    assert events[-1]["text"] == 'Opened: {"thread_id": "t-42"}'
    offered = {t["function"]["name"] for t in fake_openai.requests[0]["tools"]}
    assert "open_thread" in offered and "get_weather" in offered


async def test_the_webhook_agent_asks_for_tool_calls_and_gets_their_results_in_a_second_request(
    start_server: ServerFactory,
) -> None:
    bodies: list[dict[str, Any]] = []

    async def backend(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        if body["messages"][-1]["role"] == "tool":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            result = json.loads(body["messages"][-1]["content"])
            await resp.write(f'data: {{"delta": "It is {result["temperature"]} degrees."}}\n\n'.encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        call = {"id": "c1", "name": "get_weather", "arguments": {"city": "Paris"}}
        return web.json_response({"text": "Checking.", "tool_calls": [call]})

    app = web.Application()
    app.router.add_post("/turn", backend)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        settings = BASE_SETTINGS.replace(agent="webhook", webhook_url=f"http://127.0.0.1:{port}/turn")
        url = await start_server(agent=WebhookAgent(settings), tools="tool_pack:TOOLS")
        async with text_call(url) as ws:
            events = await turn(ws, "Weather in Paris?")
    finally:
        await runner.cleanup()
    assert of(events, "end_of_response")[0]["text"] == "Checking. It is 12 degrees."
    assert {t["function"]["name"] for t in bodies[0]["tools"]} >= {"get_weather"}
    asked, answered = bodies[1]["messages"][-2:]
    assert asked["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert answered["role"] == "tool" and answered["tool_call_id"] == "c1"


async def test_an_agent_that_cannot_call_tools_is_not_offered_them_and_the_log_says_so(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="rtcvoice.server.app"):
        url = await start_server(agent=echo_agent(), tools="tool_pack:TOOLS")
    assert "agent=echo cannot call tools reliably" in caplog.text
    async with text_call(url) as ws:
        await ws.send_json({"type": "session.update", "tools": [{"name": "open_thread"}]})
        updated = await events_until(ws, "session.updated")
        events = await turn(ws, "What's the weather in Paris?")
    assert of(updated, "error")[0]["code"] == "tools_unsupported"
    assert not of(events, "tool_call") and events[-1]["text"] == "You said: What's the weather in Paris?"


async def test_tool_calls_are_kept_in_the_thread_and_a_later_call_on_it_knows_what_was_done(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        if last(messages)["role"] == "tool":
            return "It is 12 degrees in Paris."
        if "Paris" in last(messages)["content"]:
            return ToolCalls([("get_weather", {"city": "Paris"})])
        return "As I looked up before, 12 degrees."

    fake_openai.reply = model
    url = await start_server(agent=openai_agent(fake_openai), tools="tool_pack:TOOLS")
    async with aiohttp.ClientSession() as http:
        calls = []
        thread_id = None
        for question in ("Weather in Paris?", "What did you find?"):
            body = {"session_type": "text", "thread_id": thread_id}
            async with http.post(f"{url}{API}/session/start", json=body) as resp:
                started = await resp.json()
            async with http.ws_connect(started["ws_url"]) as ws:
                hello = await ws.receive_json(timeout=10)
                thread_id = thread_id or hello["thread_id"]
                calls.append(await turn(ws, question))
        async with http.get(f"{url}/api/v1/chat/threads/{thread_id}/messages") as resp:
            stored = await resp.json()
    first = calls[0]
    # The model, in the later call, sees the earlier call and its result where they happened.
    roles = [(m["role"], m.get("tool_call_id")) for m in fake_openai.requests[-1]["messages"]]
    call_id = of(first, "tool_call")[0]["id"]
    assert roles[1:] == [
        ("user", None),
        ("assistant", None),
        ("tool", call_id),
        ("assistant", None),
        ("user", None),
    ]
    # The thread's messages (what the app shows) are the words only.
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "user", "assistant"]


async def test_a_realtime_client_sees_function_calls_in_openais_words_and_answers_its_own(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        if last(messages)["role"] == "tool":
            return "Your cart has " + json.loads(last(messages)["content"])["items"] + " items."
        return ToolCalls([("read_cart", {})])

    fake_openai.reply = model
    url = await start_server(agent=openai_agent(fake_openai))
    realtime = "ws://" + url.removeprefix("http://") + "/api/v1/streaming/realtime/test_user"
    cart = {"type": "function", "name": "read_cart", "description": "The user's cart.", "parameters": {}}
    async with aiohttp.ClientSession() as http, http.ws_connect(realtime) as ws:
        await ws.receive_json(timeout=30)
        await ws.send_json({"type": "session.update", "session_update": {"tools": [cart]}})
        await ws.send_json(
            {
                "type": "conversation.item.input",
                "conversation_item_input": {"type": "input_text", "text": "Cart?"},
            }
        )
        called = (await events_until(ws, "response.function_call_arguments.done"))[-1]["response"]
        assert (called["name"], called["arguments"], called["client"]) == ("read_cart", "{}", True)
        output = {"type": "function_call_output", "call_id": called["call_id"], "output": '{"items": "3"}'}
        await ws.send_json({"type": "conversation.item.create", "item": output})
        done = await events_until(ws, "response.done")
    assert done[-1]["response"]["text"] == "Your cart has 3 items."
    assert [e for e in done if e["type"] == "tool_result"][0]["ok"] is True


def test_an_installed_tool_pack_is_found_by_its_entry_point_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = tmp_path / "voice_pack-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: voice-pack\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[rtcvoice.tools]\nweather = tool_pack:TOOLS\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tools = load_python_tools("weather")
    assert [t.name for t in tools] == ["get_weather", "slow_lookup", "broken", "whoami"]


async def test_calls_past_the_per_reply_limit_are_refused_and_long_results_are_cut(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        if last(messages)["role"] == "tool":
            return "Done."
        return ToolCalls([("get_weather", {"city": c}) for c in ("Oslo", "Rome", "Lima")])

    fake_openai.reply = model
    url = await start_server(
        agent=openai_agent(fake_openai),
        tools="tool_pack:TOOLS",
        max_tool_calls_per_turn=2,
        max_tool_result_chars=20,
    )
    async with text_call(url) as ws:
        events = await turn(ws, "Three cities.")
    outcome = {r["id"]: (r["ok"], r["summary"]) for r in of(events, "tool_result")}
    ordered = [outcome[c["id"]] for c in of(events, "tool_call")]
    assert [ok for ok, _ in ordered] == [True, True, False]
    assert ordered[2][1] == "too many tool calls in one reply"
    assert [city for _, (city, _, _) in tool_pack.SEEN] == ["Oslo", "Rome"]
    results = [m["content"] for m in fake_openai.requests[1]["messages"] if m["role"] == "tool"]
    assert results[0] == '{"city": "Oslo", "te [cut: the result was longer]'


async def test_tools_act_for_the_caller_named_by_the_jwt(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        if last(messages)["role"] == "tool":
            return "You are " + json.loads(last(messages)["content"])["user_id"] + "."
        return ToolCalls([("whoami", {})])

    fake_openai.reply = model
    secret = "a-long-test-secret-for-hs256-signing!"
    url = await start_server(agent=openai_agent(fake_openai), tools="tool_pack:TOOLS", auth_jwt_secret=secret)
    signed = jwt.encode({"sub": "alice", "exp": int(time.time()) + 300}, secret, algorithm="HS256")
    headers = {"Authorization": f"Bearer {signed}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{url}{API}/session/start", json={"session_type": "text"}, headers=headers
        ) as resp:
            started = await resp.json()
        async with http.ws_connect(f"{started['ws_url']}?token={signed}") as ws:
            await ws.receive_json(timeout=10)
            events = await turn(ws, "Who am I?")
    assert events[-1]["text"] == "You are alice."


async def test_an_mcp_server_over_streamable_http_is_used_the_same_way(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda messages: (
        last(messages)["content"]
        if last(messages)["role"] == "tool"
        else ToolCalls([("find_order", {"order_id": "B2"})])
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(__file__).with_name("mcp_tool_server.py")
    server = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "--http", str(port), stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(30):  # until it listens
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
        url = await start_server(agent=openai_agent(fake_openai), mcp_servers=f"http://127.0.0.1:{port}/mcp")
        async with text_call(url) as ws:
            events = await turn(ws, "Where is order B2?")
    finally:
        server.terminate()
        await server.wait()
    assert events[-1]["text"] == "Order B2 ships on Tuesday."


async def test_calls_a_server_gives_the_same_id_or_none_are_told_apart(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        if last(messages)["role"] == "tool":
            return "Done."
        cities = [("get_weather", {"city": c}) for c in ("Oslo", "Rome", "Lima")]
        return ToolCalls(cities, ids=["call_0", "call_0", ""])  # as some local servers number them

    fake_openai.reply = model
    url = await start_server(agent=openai_agent(fake_openai), tools="tool_pack:TOOLS")
    async with text_call(url) as ws:
        events = await turn(ws, "Three cities.")
    ids = [c["id"] for c in of(events, "tool_call")]
    assert len(set(ids)) == 3 and sorted(r["id"] for r in of(events, "tool_result")) == sorted(ids)
    asked = [m for m in fake_openai.requests[1]["messages"] if m.get("tool_calls")][0]
    answered = [m["tool_call_id"] for m in fake_openai.requests[1]["messages"] if m["role"] == "tool"]
    assert [c["id"] for c in asked["tool_calls"]] == answered == ids
    assert [
        json.loads(m["content"])["city"] for m in fake_openai.requests[1]["messages"] if m["role"] == "tool"
    ] == [
        "Oslo",
        "Rome",
        "Lima",
    ]
