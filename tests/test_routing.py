"""Any node answers any request: two nodes in one process share a registry folder (file://).

Route-level tests with pytest-aiohttp's ``aiohttp_client``; the cluster of real processes behind
HAProxy, with Redis and PostgreSQL, is tests/test_cluster.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from conftest import BASE_SETTINGS

from rtcvoice.cluster.proxy import HOP_HEADER
from rtcvoice.cluster.workers import free_ports
from rtcvoice.engines import Engines
from rtcvoice.engines.agents.echo import EchoAgent
from rtcvoice.server import create_app
from rtcvoice.server.keys import NODE, SESSIONS
from rtcvoice.server.nodes import node_identity

API = "/api/v1/voice"
Node = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def start_node(
    aiohttp_client: Any, shared_engines: Engines, tmp_path: Path
) -> Callable[..., Awaitable[TestClient[web.Request, web.Application]]]:
    """``await start_node("a", **settings)``: a node on its own port, in the shared registry folder."""
    engines = dataclasses.replace(shared_engines, agent=EchoAgent())

    async def start(name: str, **overrides: Any) -> TestClient[web.Request, web.Application]:
        port = free_ports()
        settings = BASE_SETTINGS.replace(
            **{
                "db_path": str(tmp_path / "threads.db"),  # one SQLite file: nodes on one machine
                "cluster_url": f"file://{tmp_path / 'registry'}",
                "node_id": name,
                "node_url": f"http://127.0.0.1:{port}",
                **overrides,
            }
        )
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            create_app(settings, engines=engines), server_kwargs={"port": port}
        )
        return client

    return start


async def start_session(client: TestClient[web.Request, web.Application]) -> dict[str, Any]:
    async with client.post(f"{API}/session/start", json={}) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


def holder(session_id: str, *nodes: TestClient[web.Request, web.Application]) -> str:
    held = [n.app[NODE].id for n in nodes if n.app[SESSIONS].get(session_id) is not None]
    assert len(held) == 1, held
    return held[0]


async def test_a_full_node_sends_new_calls_to_a_node_with_room(start_node: Node) -> None:
    full = await start_node("full", max_sessions=1)
    roomy = await start_node("roomy")
    first = await start_session(full)
    assert holder(first["session_id"], full, roomy) == "full"
    second = await start_session(full)  # reached the full node: taken by the other
    assert holder(second["session_id"], full, roomy) == "roomy"
    # The reply is the owner's, with the URL the client used (not the owner's node address).
    assert second["ws_url"] == f"ws://127.0.0.1:{full.port}{API}/session/{second['session_id']}/ws"


async def test_calls_entering_through_one_node_spread_evenly_over_all(start_node: Node) -> None:
    nodes = [await start_node(name) for name in ("a", "b", "c")]
    entry = nodes[0]
    await entry.app[NODE].peers(fresh=True)  # as its next heartbeat would
    sessions = [await start_session(entry) for _ in range(6)]
    held = [holder(s["session_id"], *nodes) for s in sessions]
    assert sorted(held) == ["a", "a", "b", "b", "c", "c"]  # two each, not all on the entry node


async def test_a_calls_requests_reaching_another_node_are_passed_to_its_owner(start_node: Node) -> None:
    owner = await start_node("owner")
    other = await start_node("other")
    session = await start_session(owner)
    sid = session["session_id"]
    # The offer, through the wrong node: the owner's own answer (an SDP error for a bad SDP).
    async with other.post(
        f"{API}/session/{sid}/offer", json={"sdp": "v=0\r\nnonsense", "type": "offer"}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_sdp"
    # That bad offer ended the session on its owner; the end, through the wrong node, says so.
    async with other.post(f"{API}/session/end", json={"session_id": sid}) as resp:
        assert resp.status == 200
        assert (await resp.json())["reason"] == "bad_offer"


async def test_the_session_websocket_through_another_node_carries_the_call(start_node: Node) -> None:
    owner = await start_node("owner")
    other = await start_node("other")
    sid = (await start_session(owner))["session_id"]
    async with other.ws_connect(f"{API}/session/{sid}/ws") as ws:
        await ws.send_json({"type": "text_message", "content": "hello there"})
        seen: list[str] = []
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                event = msg.json()
                seen.append(event["type"])
                if event["type"] == "end_of_response":
                    assert "hello there" in event["text"]
                    break
        assert "session.started" in seen
        assert owner.app[SESSIONS].get(sid) is not None  # the call runs on its owner
        assert other.app[SESSIONS].get(sid) is None
    async with other.post(f"{API}/session/end", json={"session_id": sid}) as resp:
        assert resp.status == 200


async def test_a_realtime_socket_opened_on_a_draining_node_runs_on_another(start_node: Node) -> None:
    leaving = await start_node("leaving")
    staying = await start_node("staying")
    await leaving.app[NODE].drain()
    async with leaving.ws_connect("/api/v1/streaming/realtime?dialect=flat") as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "session.update"  # the socket's greeting
        await ws.send_json({"type": "ping", "id": 7})
        assert await ws.receive_json(timeout=10) == {"type": "pong", "id": 7}
        assert (staying.app[NODE].calls(), leaving.app[NODE].calls()) == (1, 0)


async def test_a_session_whose_node_is_gone_answers_410(start_node: Node, tmp_path: Path) -> None:
    doomed = await start_node("doomed")
    survivor = await start_node("survivor")
    sid = (await start_session(doomed))["session_id"]
    # The node dies without ending its calls (as kill -9 would): its record stops being renewed.
    node = doomed.app[NODE]
    assert node._task is not None and node.backend is not None
    node._task.cancel()
    await asyncio.gather(node._task, return_exceptions=True)
    await node.backend.delete_node("doomed")  # its record expires, as a dead node's does
    node.backend = None  # nothing more from it reaches the registry
    async with survivor.post(f"{API}/session/{sid}/offer", json={"sdp": "v=0", "type": "offer"}) as resp:
        assert resp.status == 410
        error = (await resp.json())["error"]
        assert error["code"] == "session_lost" and "doomed" in error["message"]


async def test_a_relayed_request_is_answered_where_it_lands_never_relayed_again(start_node: Node) -> None:
    owner = await start_node("owner")
    other = await start_node("other")
    sid = (await start_session(owner))["session_id"]
    async with other.post(
        f"{API}/session/{sid}/offer", json={"sdp": "v=0", "type": "offer"}, headers={HOP_HEADER: "owner"}
    ) as resp:
        assert resp.status == 404  # the other node answered itself: no live session there


async def test_a_draining_node_refuses_calls_when_no_other_node_can_take_them(start_node: Node) -> None:
    alone = await start_node("alone")
    await alone.app[NODE].drain()
    async with alone.post(f"{API}/session/start", json={}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "draining"


def test_bad_cluster_settings_stop_the_server_with_the_fix() -> None:
    with pytest.raises(ValueError, match="database_url"):
        node_identity(BASE_SETTINGS.replace(cluster_url="redis://127.0.0.1:6379/0"))
    with pytest.raises(ValueError, match="redis://"):
        node_identity(BASE_SETTINGS.replace(cluster_url="http://registry"))
    with pytest.raises(ValueError, match="node_id"):
        node_identity(BASE_SETTINGS.replace(node_id="has space"))
    with pytest.raises(ValueError, match="node_url"):
        node_identity(BASE_SETTINGS.replace(node_url="10.0.0.5:8080"))
