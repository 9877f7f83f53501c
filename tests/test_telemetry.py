"""Operating a fleet: /metrics, /readyz, /livez, JSON logs with the call's ids, spans per turn."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import BASE_SETTINGS
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from speech import at_16k, speak

from rtcvoice.engines import Engines
from rtcvoice.engines.base import AgentContext, AgentError, ChatMessage
from rtcvoice.server import create_app, ops
from rtcvoice.server.keys import METRICS, NODE
from rtcvoice.telemetry import JsonFormatter, Metrics, Tracer, log_context, setup_logging, tracing
from rtcvoice.telemetry.logs import NOISY_LOGGERS, ContextFilter
from rtcvoice.telemetry.tracing import turn_layout

API = "/api/v1/voice"
NODE_ID = "test-node"
Client = TestClient[web.Request, web.Application]
Serve = Callable[..., Awaitable[tuple[Client, web.Application]]]


@pytest.fixture
async def serve(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]], shared_engines: Engines, tmp_path: Path
) -> Serve:
    """An app on the shared engines (``agent`` replaces theirs), behind aiohttp's test client."""

    async def start(agent: Any = None, **overrides: Any) -> tuple[Client, web.Application]:
        settings = BASE_SETTINGS.replace(db_path=str(tmp_path / "t.db"), node_id=NODE_ID, **overrides)
        engines = dataclasses.replace(shared_engines, agent=agent) if agent is not None else shared_engines
        app = create_app(settings, engines=engines)
        return await aiohttp_client(app), app

    return start


async def scrape(client: Client) -> dict[str, Any]:
    """/metrics parsed: family name → family (the parser drops counters' ``_total``)."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(await resp.text())}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    family_name = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    for s in families[family_name].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


async def open_call(client: Client, **body: Any) -> aiohttp.ClientWebSocketResponse:
    resp = await client.post(f"{API}/session/start", json=body)
    assert resp.status == 200, await resp.text()
    started = await resp.json()
    ws = await client.ws_connect(f"{API}/session/{started['session_id']}/ws")
    hello = await ws.receive_json(timeout=10)
    assert hello["type"] == "session.started"
    return ws


async def until_end_of_response(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        while not events or events[-1]["type"] != "end_of_response":
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                events.append(json.loads(msg.data))
            elif msg.type != aiohttp.WSMsgType.BINARY:
                raise AssertionError(f"the socket closed mid-turn: {msg}")
    return events


class FailingAgent:
    name = "failing"
    languages = None

    async def stream(self, messages: list[ChatMessage], context: AgentContext) -> AsyncIterator[str]:
        raise AgentError("the model server is down")
        yield ""  # an async generator, as agents are

    async def warm_up(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """What a server with otel_endpoint set exports, kept in memory instead of posted."""
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "_otlp_exporter", lambda endpoint: exporter)
    return exporter


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


# -- /metrics ---------------------------------------------------------------------------------------
async def test_metrics_need_no_token_and_name_the_node_its_calls_and_its_process(serve: Serve) -> None:
    client, _app = await serve(auth_jwt_secret="s" * 32)
    assert (await client.get(f"{API}/status")).status == 401, "auth is on"
    families = await scrape(client)
    for name in (
        "rtcvoice_turns",
        "rtcvoice_turn_stage_seconds",
        "rtcvoice_engine_errors",
        "rtcvoice_calls_started",
        "rtcvoice_calls_ended",
        "rtcvoice_active_calls",
        "rtcvoice_max_calls",
        "rtcvoice_node_serving",
        "rtcvoice_node_load",
        "rtcvoice_registry_ok",
        "rtcvoice_late_frames",
        "process_cpu_seconds",
        "process_resident_memory_bytes",
    ):
        assert name in families, name
    [info] = families["rtcvoice_node_info"].samples
    assert info.labels["node"] == NODE_ID
    assert sample(families, "rtcvoice_max_calls") == BASE_SETTINGS.max_sessions
    assert sample(families, "rtcvoice_node_serving") == 1.0
    assert sample(families, "rtcvoice_turns_total", interrupted="false") == 0.0
    assert sample(families, "process_resident_memory_bytes") > 10e6
    # A Prometheus that asks for OpenMetrics gets it.
    resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await resp.text()).rstrip().endswith("# EOF")


async def test_a_typed_turn_moves_the_turn_counter_and_the_stage_histograms(serve: Serve) -> None:
    client, _app = await serve()
    ws = await open_call(client, session_type="text")
    during = await scrape(client)
    await ws.send_json({"type": "text_message", "content": "Hello from the keyboard."})
    events = await until_end_of_response(ws)
    await ws.close()
    after = await scrape(client)
    measured = next(e for e in events if e["type"] == "metrics")

    assert sample(during, "rtcvoice_active_calls") == 1.0
    assert sample(after, "rtcvoice_turns_total", interrupted="false") == 1.0
    assert sample(after, "rtcvoice_turn_stage_seconds_count", stage="llm_first_token") == 1.0
    assert sample(after, "rtcvoice_turn_stage_seconds_sum", stage="llm_first_token") == pytest.approx(
        measured["llm_first_token"] / 1000.0
    )
    assert sample(after, "rtcvoice_turn_stage_seconds_count", stage="stt") == 0.0, "typed: nothing heard"


# -- /readyz, /livez ------------------------------------------------------------------------------
async def test_readyz_is_ready_until_the_node_drains_and_livez_names_the_node(serve: Serve) -> None:
    client, app = await serve()
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready", "node": NODE_ID, "calls": 0, "max_calls": 32}
    await app[NODE].drain()
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "draining"
    assert sample(await scrape(client), "rtcvoice_node_serving") == 0.0
    resp = await client.get("/livez")
    assert resp.status == 200, "a draining node is alive: its calls go on"
    live = await resp.json()
    assert live["status"] == "alive" and live["node"] == NODE_ID and live["version"]


# -- logs ---------------------------------------------------------------------------------------------
async def test_a_calls_log_lines_carry_its_session_id_and_its_engine_errors_are_counted(serve: Serve) -> None:
    client, app = await serve(agent=FailingAgent())
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter(NODE_ID))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        resp = await client.post(f"{API}/session/start", json={"session_type": "text"})
        session_id = (await resp.json())["session_id"]
        ws = await client.ws_connect(f"{API}/session/{session_id}/ws")
        await ws.receive_json(timeout=10)
        await ws.send_json({"type": "text_message", "content": "Are you there?"})
        events = await until_end_of_response(ws)
        await ws.close()
    finally:
        root.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    # Logged by the turn's own task, which the conversation started: the id came with its context.
    failed = [line for line in lines if "agent failed" in line["message"]]
    assert failed, out.getvalue()
    assert failed[0]["session_id"] == session_id
    assert failed[0]["node"] == NODE_ID and failed[0]["level"] == "WARNING"
    assert failed[0]["logger"] == "rtcvoice.conversation.conversation"
    assert failed[0]["ts"].endswith("Z")
    assert any(e["type"] == "error" and e["code"] == "agent_error" for e in events)
    assert sample(await scrape(client), "rtcvoice_engine_errors_total", code="agent_error") == 1.0
    assert METRICS in app


def test_json_lines_take_ids_from_the_context_or_the_call_and_keep_tracebacks() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("n1"))
    handler.addFilter(ContextFilter())
    log = logging.getLogger("rtcvoice.test_telemetry")
    log.addHandler(handler)
    log.propagate = False
    try:
        with log_context(session_id="s1", turn_id="t1"):
            log.warning("inside")
        log.warning("outside")
        log.warning("explicit", extra={"session_id": "s2"})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    inside, outside, explicit, failed = (json.loads(line) for line in out.getvalue().splitlines())
    assert (inside["session_id"], inside["turn_id"], inside["node"]) == ("s1", "t1", "n1")
    assert "session_id" not in outside and "turn_id" not in outside, "the block's ids end with it"
    assert explicit["session_id"] == "s2"
    assert "RuntimeError: boom" in failed["exc_info"] and failed["message"] == "failed"


def test_setup_logging_writes_json_or_the_text_format_and_refuses_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    try:
        setup_logging("info", "json", "n1")
        logging.getLogger("rtcvoice.x").info("hello %s", "there")
        logging.getLogger("aiortc").info("per-packet noise")
        err = capsys.readouterr().err
        line = json.loads(err.strip().splitlines()[-1])
        assert (line["message"], line["node"], line["level"]) == ("hello there", "n1", "INFO")
        assert "per-packet noise" not in err
        setup_logging("INFO", "text", None)
        logging.getLogger("rtcvoice.x").info("plain")
        assert capsys.readouterr().err.rstrip().endswith("INFO rtcvoice.x: plain")
        with pytest.raises(ValueError, match="text, json"):
            setup_logging("INFO", "xml", None)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in noisy.items():
            logging.getLogger(name).setLevel(level)


# -- tracing ------------------------------------------------------------------------------------------
async def test_a_spoken_turn_is_one_trace_across_stt_agent_and_tts(
    serve: Serve, spans: InMemorySpanExporter
) -> None:
    client, app = await serve(otel_endpoint="http://collector.invalid:4318")
    ws = await open_call(client)
    pcm = at_16k(speak("What time is it?")).astype("<i2").tobytes()
    for i in range(0, len(pcm), 640):
        await ws.send_bytes(pcm[i : i + 640])
        await asyncio.sleep(0.002)
    await ws.send_json({"type": "end_of_input"})
    events = await until_end_of_response(ws)
    await ws.close()
    tracer = ops.tracer_of(app)
    assert tracer is not None
    assert tracer.force_flush()
    measured = next(e for e in events if e["type"] == "metrics")

    finished = spans.get_finished_spans()
    [turn] = by_name(finished, "turn")
    assert turn.attributes is not None and turn.context is not None
    assert turn.attributes["turn_id"] == measured["turn_id"]
    assert turn.attributes["session_id"] == measured["session_id"]
    assert turn.attributes["voice_to_voice_ms"] == measured["voice_to_voice"]
    assert turn.resource.attributes["service.name"] == "rtcvoice"
    assert turn.resource.attributes["service.instance.id"] == NODE_ID
    stages = [by_name(finished, name)[0] for name in ("stt", "agent", "tts")]
    for stage, field in zip(stages, ("stt", "llm_first_sentence", "tts_first_audio"), strict=True):
        assert stage.parent is not None and stage.parent.span_id == turn.context.span_id
        assert stage.context is not None and stage.context.trace_id == turn.context.trace_id
        assert stage.start_time is not None and stage.end_time is not None
        assert (stage.end_time - stage.start_time) / 1e6 == pytest.approx(measured[field], abs=0.01)
        assert turn.start_time is not None and turn.end_time is not None
        assert turn.start_time <= stage.start_time <= stage.end_time <= turn.end_time
    stt, agent, tts = stages
    assert stt.end_time == agent.start_time and agent.end_time == tts.start_time, "one after the other"
    # The stages' metrics moved with the same turn.
    families = await scrape(client)
    assert sample(families, "rtcvoice_turn_stage_seconds_count", stage="stt") == 1.0
    assert sample(families, "rtcvoice_turn_stage_seconds_count", stage="voice_to_voice") == 1.0


async def test_a_typed_turn_is_traced_without_an_stt_span(serve: Serve, spans: InMemorySpanExporter) -> None:
    client, app = await serve(otel_endpoint="http://collector.invalid:4318")
    ws = await open_call(client, session_type="text")
    await ws.send_json({"type": "text_message", "content": "Hello there."})
    await until_end_of_response(ws)
    await ws.close()
    tracer = ops.tracer_of(app)
    assert tracer is not None and tracer.force_flush()
    names = sorted(s.name for s in spans.get_finished_spans())
    assert names == ["agent", "turn"], "no speech heard, none spoken"


def test_turn_layout_puts_the_first_audio_where_the_turn_says_it_was_ready() -> None:
    end = 10_000_000_000
    event = {
        "type": "metrics",
        "voice_to_voice": 900.0,
        "end_of_turn": 500.0,
        "compute_after_turn_end": 300.0,
        "stt": 150.0,
        "llm_first_sentence": 250.0,
        "tts_first_audio": 100.0,
    }
    turn, (stt, agent, tts) = turn_layout(event, end)
    ms = 1_000_000
    assert (turn.start_ns, turn.end_ns) == (end - 900 * ms, end)
    assert tts.end_ns == turn.start_ns + 800 * ms, "ready at end_of_turn + compute after it"
    assert (tts.start_ns, agent.start_ns, stt.start_ns) == (
        tts.end_ns - 100 * ms,
        tts.start_ns - 250 * ms,
        agent.start_ns - 150 * ms,
    )
    # Speculation ran STT before the silence ended the turn: the turn covers it.
    early, (first, *_rest) = turn_layout({**event, "end_of_turn": 100.0, "compute_after_turn_end": 0.0}, end)
    assert early.start_ns == first.start_ns < end - 900 * ms
    # A text-only turn (no speech, no audio): its stages end when its event came.
    text, children = turn_layout(
        {"type": "metrics", "llm_first_token": 40.0, "llm_first_sentence": 200.0}, end
    )
    assert [c.name for c in children] == ["agent"] and text.start_ns == end - 200 * ms


def test_tracing_is_off_without_an_endpoint_and_refused_with_the_fix_without_opentelemetry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Tracer.from_settings(BASE_SETTINGS, NODE_ID) is None
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    settings = BASE_SETTINGS.replace(otel_endpoint="http://collector:4318")
    with pytest.raises(ValueError, match=r"pip install 'rtcvoice\[otel\]'"):
        Tracer.from_settings(settings, NODE_ID)
    with pytest.raises(ValueError, match="otel_endpoint"):
        create_app(settings)
    assert tracing.traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert tracing.traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


def test_a_telemetry_fault_never_reaches_the_call(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops, "_reported", set())

    class Broken(Metrics):
        def observe_event(self, event: dict[str, Any]) -> None:
            raise KeyError("bug")

    app = web.Application()
    app[METRICS] = Broken(process=False)
    sent: list[dict[str, Any]] = []
    send = ops.observed(app, sent.append)
    with caplog.at_level(logging.ERROR, logger="rtcvoice.server.ops"):
        send({"type": "ai_text", "text": "a"})
        send({"type": "ai_text", "text": "b"})
    assert [e["text"] for e in sent] == ["a", "b"]
    assert len([r for r in caplog.records if "telemetry failed" in r.getMessage()]) == 1, (
        "once, not per event"
    )


def test_transport_labels_name_each_kind_of_call() -> None:
    from rtcvoice.transports.audio_chat import AudioChatPeer
    from rtcvoice.transports.realtime import RealtimePeer
    from rtcvoice.transports.socketio_voice import SocketIoPeer
    from rtcvoice.transports.webrtc import WebRtcPeer
    from rtcvoice.transports.websocket import WebSocketPeer

    peers = (WebRtcPeer, WebSocketPeer, RealtimePeer, SocketIoPeer, AudioChatPeer)
    labels = [ops.transport_name(object.__new__(kind)) for kind in peers]
    assert labels == ["webrtc", "websocket", "realtime", "socketio", "audiochat"]
