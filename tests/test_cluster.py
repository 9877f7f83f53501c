"""Many nodes as real processes (README "Many nodes"): three ``rtcvoice serve`` nodes registered in
Redis, sharing PostgreSQL and one model pool, behind HAProxy; and ``serve --workers 2`` on one port.

Real parts only: redis-server, haproxy and PostgreSQL binaries, nodes started with
``python -m rtcvoice serve``, and real aiortc callers (rtcvoice.client.VoiceCallClient) whose
signaling goes through HAProxy or straight to a node, while their media flows to the node that
holds the call (over this machine's non-loopback address: aioice skips loopback). Every node's
engines are the shared model pool of tests/cluster_support.py, so nodes start in about a second,
and the pool's request log shows which calls it served.

Non-destructive tests share one cluster; a test that kills, drains or restarts a part leaves it
for ``Cluster.heal`` (at the start of every test) to bring back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from cluster_support import (
    API,
    SPOKEN_TRANSCRIPT,
    Cluster,
    ModelPool,
    get_json,
    new_http,
    post_json,
    spawn,
    tail,
    wait_exit,
    wait_until,
)
from pg import PostgresCluster
from speech import speak

from rtcvoice.client import VoiceCallClient
from rtcvoice.cluster.workers import free_ports
from rtcvoice.engines import load_engines
from rtcvoice.server import create_app
from rtcvoice.server.keys import SESSIONS
from rtcvoice.settings import Settings

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not (shutil.which("redis-server") and shutil.which("haproxy")),
        reason="needs the redis-server and haproxy binaries (scripts/test installs them)",
    ),
]

TURN_S = 45.0  # one turn on a loaded 2-core machine takes well under a second; this is a hang


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> Iterator[ModelPool]:
    model_pool = ModelPool().start()
    yield model_pool
    model_pool.close()


@pytest.fixture(scope="module")
async def cluster(
    pg_cluster: PostgresCluster, pool: ModelPool, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Cluster]:
    database_url = await asyncio.to_thread(pg_cluster.create_database)
    nodes = Cluster(tmp_path_factory.mktemp("cluster"), database_url, pool)
    try:
        await nodes.start()
        yield nodes
    finally:
        await nodes.close()


@pytest.fixture
async def healed(cluster: Cluster) -> Cluster:
    """The shared cluster with every part up, whatever the test before it destroyed."""
    await cluster.heal()
    return cluster


# -- calls ------------------------------------------------------------------------------------------


def token(label: str) -> str:
    """A word no other turn says: the pool's reply and the stored messages repeat it."""
    return f"{label}-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def calling() -> AsyncIterator[list[VoiceCallClient]]:
    """Callers added to the list are hung up (session/end through their server) at the end."""
    clients: list[VoiceCallClient] = []
    try:
        yield clients
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def dial(clients: list[VoiceCallClient], url: str, **session: Any) -> VoiceCallClient:
    """A real WebRTC call: session/start and the offer to ``url``, media to the node holding it."""
    client = VoiceCallClient(url)
    clients.append(client)
    await client.connect(session=session, timeout=30)
    return client


async def text_turn(client: VoiceCallClient, content: str) -> dict[str, Any]:
    """Send a typed turn on the data channel; the end_of_response that answers it."""
    after = len(client.events)
    client.send({"type": "text_message", "content": content})
    return await client.wait_for(
        lambda e: e.get("type") == "end_of_response" and content in str(e.get("text", "")),
        TURN_S,
        after=after,
    )


async def thread_messages(http: aiohttp.ClientSession, url: str, thread_id: str) -> list[dict[str, Any]]:
    code, data = await get_json(http, f"{url}/api/v1/chat/threads/{thread_id}/messages")
    assert code == 200, data
    return list(data["messages"])


async def stored(
    http: aiohttp.ClientSession, url: str, thread_id: str, *texts: str, count: int = 0
) -> list[dict[str, Any]]:
    """The thread's messages (read through ``url``) once every one of ``texts`` is in them."""

    async def complete() -> list[dict[str, Any]] | None:
        messages = await thread_messages(http, url, thread_id)
        contents = " | ".join(str(m["content"]) for m in messages)
        return messages if all(t in contents for t in texts) and len(messages) >= count else None

    return await wait_until(complete, 20, f"thread {thread_id} holds {texts}")


async def ended_in_redis(cluster: Cluster, session_id: str, reason: str) -> None:
    async def ended() -> bool:
        return (await cluster.session_value(session_id) or {}).get("ended") == reason

    await wait_until(ended, 10, f"Redis records session {session_id} as ended ({reason})")


async def ws_turn(ws: aiohttp.ClientWebSocketResponse, content: str) -> list[str]:
    """A typed turn on a session WebSocket; the types of the events up to its end_of_response."""
    await ws.send_json({"type": "text_message", "content": content})
    seen: list[str] = []
    async with asyncio.timeout(TURN_S):
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue  # the AI's voice, as binary PCM
            event = msg.json()
            seen.append(event["type"])
            if event["type"] == "end_of_response":
                assert content in event["text"], event
                return seen
    raise AssertionError(f"the socket closed before the answer; events: {seen}")


async def ws_event(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(TURN_S):
        async for msg in ws:
            if msg.type == WSMsgType.TEXT and msg.json().get("type") == kind:
                return dict(msg.json())
    raise AssertionError(f"the socket closed before {kind}")


# -- one cluster, many nodes --------------------------------------------------------------------------


async def test_calls_through_the_balancer_spread_over_every_node_and_share_one_model_pool(
    healed: Cluster,
) -> None:
    cluster, http, lb = healed, healed.http, healed.lb.url
    for node in cluster.nodes:  # what operators ask each node
        code, data = await get_json(http, f"{node.url}/livez")
        assert (code, data["node"]) == (200, node.id), data
        async with http.get(f"{node.url}/metrics") as resp:
            metrics = await resp.text()
        assert f'node="{node.id}"' in metrics and "rtcvoice_registry_ok 1.0" in metrics, metrics
    before = await cluster.sessions()
    started: list[dict[str, Any]] = []
    owners: dict[str, str] = {}
    # Six sessions, a new connection each so HAProxy places each one; a few more should a node
    # have left the rotation for a moment (a slow health check on a loaded machine).
    while len(started) < 6 or (len(set(owners.values())) < len(cluster.nodes) and len(started) < 15):
        code, body = await post_json(http, f"{lb}{API}/session/start", {})
        assert code == 200, body
        started.append(body)
        owners[body["session_id"]] = await cluster.owner(body["session_id"])
    after = await cluster.sessions()
    per_node = Counter(owners.values())
    assert set(per_node) == {n.id for n in cluster.nodes}, per_node
    # What each node holds (its own /status) is what Redis says it holds.
    assert {i: after[i] - before[i] for i in after} == dict(per_node), (before, after, owners)
    # Whichever node answered, the URLs in the answer are the balancer's, not a node's.
    assert all(s["ws_url"].startswith(f"ws://127.0.0.1:{cluster.lb.port}/") for s in started), started
    for s in started:  # each end reaches the session's owner, wherever HAProxy sends it
        code, body = await post_json(http, f"{lb}{API}/session/end", {"session_id": s["session_id"]})
        assert (code, body.get("reason")) == (200, "client_hangup"), body
    for sid in owners:
        await ended_in_redis(cluster, sid, "client_hangup")
    assert await cluster.sessions() == before

    async with calling() as clients:
        clients.extend(VoiceCallClient(lb) for _ in range(3))
        await asyncio.gather(*(c.connect(timeout=30) for c in clients))
        tokens = {c.session_id: token("typed") for c in clients}
        await asyncio.gather(*(text_turn(c, tokens[c.session_id]) for c in clients))
        call_owner = {c.session_id: await cluster.owner(c.session_id) for c in clients}
        while len(set(call_owner.values())) < 2 and len(clients) < 8:
            # HAProxy may put every call on one node (it balances requests, not calls): call again.
            extra = await dial(clients, lb)
            tokens[extra.session_id] = token("typed")
            await text_turn(extra, tokens[extra.session_id])
            call_owner[extra.session_id] = await cluster.owner(extra.session_id)
        assert len(set(call_owner.values())) >= 2, call_owner
        # One model pool served the calls of every node: each turn's words reached it.
        assert all(cluster.pool.asked(t) for t in tokens.values()), tokens

        # A spoken turn: the node's VAD hears it, the pool transcribes and voices the answer.
        speaker = clients[0]
        transcriptions, syntheses = cluster.pool.transcriptions, cluster.pool.syntheses
        after = len(speaker.events)
        speaker.play(*speak("What is the capital of France?"))
        final = await speaker.wait_for(lambda e: e.get("type") == "final_transcript", TURN_S, after=after)
        assert SPOKEN_TRANSCRIPT in final["text"].lower(), final
        said = await speaker.wait_for(
            lambda e: e.get("type") == "end_of_response" and SPOKEN_TRANSCRIPT in e["text"].lower(),
            TURN_S,
            after=after,
        )
        assert said["interrupted"] is False, said
        assert cluster.pool.transcriptions > transcriptions and cluster.pool.syntheses > syntheses
        heard_from = speaker.event_time(final)

        async def heard() -> bool:
            return speaker.received.first_sound_after(heard_from) is not None

        await wait_until(heard, 15, "the spoken answer reached the caller's audio track")

        # Every turn is in PostgreSQL, read through a node that did not hold the call.
        for client in clients:
            assert client.started is not None
            reader = cluster.others(call_owner[client.session_id])[0]
            texts = [tokens[client.session_id], f"You said {tokens[client.session_id]}."]
            if client is speaker:
                texts.append(SPOKEN_TRANSCRIPT)
            messages = await stored(http, reader.url, client.started["thread_id"], *texts)
            assert {m["session_id"] for m in messages} == {client.session_id}, messages
            assert [m["role"] for m in messages[:2]] == ["user", "assistant"], messages


async def test_a_calls_requests_sent_to_a_node_that_does_not_hold_it_reach_its_owner(healed: Cluster) -> None:
    cluster, http = healed, healed.http
    owner, other = cluster.nodes[0], cluster.nodes[1]

    # WebRTC: session/start on the owner; the offer, the turn's signaling and the end on the other.
    async with calling() as clients:
        client = VoiceCallClient(owner.url)
        clients.append(client)
        await client.start_session()
        sid = client.session_id
        assert sid is not None and await cluster.owner(sid) == owner.id
        client.server = other.url
        await client.connect(timeout=30)  # the offer is answered by the owner, through the other
        await text_turn(client, token("relayed"))
        assert (await owner.status(http))["sessions"] >= 1
        code, body = await post_json(http, f"{other.url}{API}/session/end", {"session_id": sid})
        assert (code, body.get("reason")) == (200, "client_hangup"), body
        ended = await client.wait_for(lambda e: e.get("type") == "session.ended", 10)
        assert ended["reason"] == "client_hangup", ended
        await ended_in_redis(cluster, sid, "client_hangup")
        # Ending it again through a third node: answered from Redis, as done.
        code, body = await post_json(http, f"{cluster.nodes[2].url}{API}/session/end", {"session_id": sid})
        assert (code, body.get("reason")) == (200, "client_hangup"), body

    # The session WebSocket, opened on the other node, runs the call on the owner.
    code, started = await post_json(http, f"{owner.url}{API}/session/start", {"session_type": "text"})
    assert code == 200, started
    sid = started["session_id"]
    assert await cluster.owner(sid) == owner.id
    async with http.ws_connect(f"{other.url}{API}/session/{sid}/ws") as ws:
        words = token("socket")
        seen = await ws_turn(ws, words)
        assert "session.started" in seen, seen
        assert cluster.pool.asked(words)
    await ended_in_redis(cluster, sid, "websocket_closed")

    # The AI-service contract: a backend's own session id, its socket and its end, all relayed.
    backend_sid = token("backend")
    code, body = await post_json(http, f"{owner.url}/internal/ai/session/start", {"session_id": backend_sid})
    assert code == 200, body
    assert await cluster.owner(backend_sid) == owner.id
    async with http.ws_connect(f"{other.url}/session/{backend_sid}/ws") as ws:
        await ws_turn(ws, token("backend-turn"))
        code, body = await post_json(
            http, f"{other.url}/internal/ai/session/end", {"session_id": backend_sid}
        )
        assert code == 200, body
        assert (await ws_event(ws, "session.ended"))["reason"] == "backend_hangup"
    await ended_in_redis(cluster, backend_sid, "backend_hangup")


async def test_ending_a_call_that_just_ended_on_its_node_is_done_not_session_lost(
    pool: ModelPool, tmp_path: Path
) -> None:
    """web/rtcvoice.js closes its peer, then posts session/end: the node has ended the call (peer
    closed) but the registry still names it as the owner until the end is written. In-process, with
    the slower folder registry, so that moment is always there."""
    port = free_ports()
    settings = Settings.from_env(
        {},
        **pool.settings(),
        db_path=str(tmp_path / "threads.db"),
        cluster_url=f"file://{tmp_path / 'registry'}",
        node_id="solo",
        node_url=f"http://127.0.0.1:{port}",
    )
    engines = await load_engines(settings)
    app = create_app(settings, engines=engines)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        async with new_http() as http:
            for _ in range(3):
                code, body = await post_json(http, f"http://127.0.0.1:{port}{API}/session/start", {})
                assert code == 200, body
                await app[SESSIONS].end(body["session_id"], "peer_closed")  # its peer went away
                code, body = await post_json(
                    http, f"http://127.0.0.1:{port}{API}/session/end", {"session_id": body["session_id"]}
                )
                assert (code, body.get("reason")) == (200, "peer_closed"), body
    finally:
        await runner.cleanup()
        await engines.aclose()


async def test_a_killed_node_loses_only_its_calls_and_the_caller_continues_the_thread_on_another(
    healed: Cluster,
) -> None:
    cluster, http, lb = healed, healed.http, healed.lb.url
    async with calling() as clients:
        first = await dial(clients, lb)
        assert first.started is not None and first.session_id is not None
        thread_id, old_sid = first.started["thread_id"], first.session_id
        victim = cluster.node(await cluster.owner(old_sid))
        survivor = cluster.others(victim.id)[0]
        before = token("before-kill")
        await text_turn(first, before)
        await stored(http, survivor.url, thread_id, before, f"You said {before}.")

        victim.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert await victim.wait_exit(10) == -signal.SIGKILL
        # The call is gone with its node: nothing answers on its data channel any more.
        after = len(first.events)
        first.send({"type": "ping", "id": 1})
        with pytest.raises(TimeoutError):
            await first.wait_for(lambda e: e.get("type") == "pong", 2.0, after=after)

        # Its requests, through a live node: 410 session_lost, naming the node (record still there
        # or expired: either way the owner cannot be reached).
        code, body = await post_json(
            http, f"{survivor.url}{API}/session/{old_sid}/offer", {"sdp": "v=0", "type": "offer"}
        )
        assert code == 410 and body["error"]["code"] == "session_lost", body
        assert victim.id in body["error"]["message"]
        await cluster.wait_out_of_rotation(victim.id, timeout=10)

        # The caller starts again on the same thread (as web/rtcvoice.js does), on another node.
        second = await dial(clients, lb, thread_id=thread_id)
        assert second.session_id is not None
        assert await cluster.owner(second.session_id) != victim.id
        again = token("after-kill")
        await text_turn(second, again)
        # The new node read the thread from PostgreSQL: the model saw the first turn as history.
        last = next(m for m in reversed(cluster.pool.chat_requests()) if again in str(m[-1]["content"]))
        assert any(before in str(m["content"]) for m in last[:-1]), last
        messages = await stored(
            http, survivor.url, thread_id, before, f"You said {before}.", again, f"You said {again}."
        )
        assert [m["session_id"] for m in messages] == [old_sid, old_sid, second.session_id, second.session_id]

        # Its registry record expires by itself (3 heartbeats of 2 s), and the answer stays 410.
        async def record_gone() -> bool:
            return await cluster.node_record(victim.id) is None

        await wait_until(record_gone, 12, f"{victim.id}'s record leaves Redis")
        assert time.monotonic() - killed_at <= 9.0, "a dead node's record outlived its 6 s expiry"
        code, body = await post_json(http, f"{survivor.url}{API}/session/end", {"session_id": old_sid})
        assert code == 410 and body["error"]["code"] == "session_lost", body
        await first.close(end_session=False)


async def test_sigterm_drains_a_node_new_calls_go_elsewhere_and_it_exits_0_when_its_calls_end(
    healed: Cluster,
) -> None:
    cluster, http, lb = healed, healed.http, healed.lb.url
    async with calling() as clients, contextlib.AsyncExitStack() as sockets:
        client = await dial(clients, lb)
        assert client.session_id is not None
        leaving = cluster.node(await cluster.owner(client.session_id))
        await text_turn(client, token("before-drain"))
        # A call held by another node whose socket runs through this one (HAProxy put it here).
        host = cluster.others(leaving.id)[0]
        code, started = await post_json(http, f"{host.url}{API}/session/start", {"session_type": "text"})
        assert code == 200, started
        through = await sockets.enter_async_context(
            http.ws_connect(f"{leaving.url}{API}/session/{started['session_id']}/ws")
        )
        await ws_turn(through, token("relayed-before-drain"))

        leaving.signal(signal.SIGTERM)

        async def draining() -> bool:
            code, data = await get_json(http, f"{leaving.url}/readyz")
            return code == 503 and data["status"] == "draining"

        await wait_until(draining, 10, f"{leaving.id}'s /readyz says draining")

        async def published() -> bool:
            return ((await cluster.node_record(leaving.id)) or {}).get("state") == "draining"

        await wait_until(published, 10, f"{leaving.id} is draining in Redis")
        await cluster.wait_out_of_rotation(leaving.id, timeout=10)

        # New calls land elsewhere: through HAProxy, and even when sent to the draining node itself.
        new_sids = []
        for url in (lb, lb, leaving.url):
            code, body = await post_json(http, f"{url}{API}/session/start", {})
            assert code == 200, body
            new_sids.append(body["session_id"])
            assert await cluster.owner(body["session_id"]) != leaving.id
        for sid in new_sids:
            code, body = await post_json(http, f"{lb}{API}/session/end", {"session_id": sid})
            assert code == 200, body

        # A realtime socket opened on the draining node is relayed whole to a node with room.
        async with http.ws_connect(f"{leaving.url}/api/v1/streaming/realtime?dialect=flat") as ws:
            assert (await ws.receive_json(timeout=TURN_S))["type"] == "session.update"
            await ws.send_json({"type": "ping", "id": 7})
            assert await ws.receive_json(timeout=TURN_S) == {"type": "pong", "id": 7}
            connections = {}
            for node in cluster.nodes:
                code, data = await get_json(http, f"{node.url}/api/v1/streaming/realtime/status")
                connections[node.id] = data["connections"]
            assert connections[leaving.id] == 0 and sum(connections.values()) == 1, connections

        # The running call goes on: another turn, then the caller hangs up (through HAProxy,
        # which no longer sends to the node: the end is relayed to it).
        await text_turn(client, token("during-drain"))
        assert leaving.running
        code, body = await post_json(http, f"{lb}{API}/session/end", {"session_id": client.session_id})
        assert (code, body.get("reason")) == (200, "client_hangup"), body

        # Its own calls are over, but the other node's call still runs through it: it keeps
        # draining (the drain looks every 0.5 s; give it two looks) and keeps relaying.
        await asyncio.sleep(1.0)
        code, data = await get_json(http, f"{leaving.url}/readyz")
        assert (code, data["status"], data["calls"]) == (503, "draining", 0), data
        await ws_turn(through, token("relayed-during-drain"))
        await through.close()
        closed = time.monotonic()
        assert await leaving.wait_exit(30) == 0, tail(leaving.log)
        assert time.monotonic() - closed < 15, "the drained node lingered after its last relayed socket"
        await ended_in_redis(cluster, started["session_id"], "websocket_closed")

    async def left() -> bool:
        return await cluster.node_record(leaving.id) is None

    await wait_until(left, 5, f"{leaving.id} left the registry")


async def test_a_drain_timeout_ends_running_calls_with_reason_drain_and_closes_relayed_sockets(
    healed: Cluster,
) -> None:
    cluster, http = healed, healed.http
    node, host = cluster.nodes[2], cluster.nodes[0]
    await node.stop()
    node.start(extra=["--drain-timeout-s", "2"])
    await node.wait_ready(http)
    async with calling() as clients, contextlib.AsyncExitStack() as sockets:
        client = await dial(clients, node.url)
        await text_turn(client, token("before-timeout"))
        code, started = await post_json(http, f"{host.url}{API}/session/start", {"session_type": "text"})
        assert code == 200, started
        through = await sockets.enter_async_context(
            http.ws_connect(f"{node.url}{API}/session/{started['session_id']}/ws")
        )
        await ws_turn(through, token("relayed"))

        node.signal(signal.SIGTERM)
        signalled = time.monotonic()
        ended = await client.wait_for(lambda e: e.get("type") == "session.ended", 30)
        waited = time.monotonic() - signalled
        assert ended["reason"] == "drain", ended
        assert waited >= 1.5, f"the call was ended {waited:.1f} s into a 2 s drain"
        # The socket it relayed for the other node's call is closed too ("going away": reconnect),
        # and the node exits at once instead of waiting on it.
        async with asyncio.timeout(15):
            while (await through.receive()).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED):
                pass
        assert through.close_code == aiohttp.WSCloseCode.GOING_AWAY, through.close_code
        assert await node.wait_exit(15) == 0, tail(node.log)
        await ended_in_redis(cluster, started["session_id"], "websocket_closed")


async def test_calls_survive_a_redis_restart_and_every_node_registers_again(healed: Cluster) -> None:
    cluster, http, lb = healed, healed.http, healed.lb.url
    async with calling() as clients:
        client = await dial(clients, lb)
        assert client.session_id is not None
        await text_turn(client, token("before-outage"))

        cluster.redis.kill()

        async def all_cut_off() -> bool:
            return not any([(await n.status(http))["node"]["registry_ok"] for n in cluster.nodes])

        await wait_until(all_cut_off, 15, "every node notices Redis is gone")
        # The running call goes on.
        await text_turn(client, token("during-outage"))
        # New calls are still taken, each by the node it reaches (nobody can be asked where to go),
        # and their offers and ends find that node through any other: the session id names it.
        code, body = await post_json(http, f"{lb}{API}/session/start", {})
        assert code == 200, body
        outage_sid = body["session_id"]
        direct = await dial(clients, lb)
        assert direct.session_id is not None
        local = next(n for n in cluster.nodes if direct.session_id.startswith(n.id + "."))
        await text_turn(direct, token("new-during-outage"))
        for node in cluster.nodes:  # the same session, asked of every node while Redis is down
            code, body = await post_json(
                http, f"{node.url}{API}/session/{direct.session_id}/offer", {"sdp": "v=0"}
            )
            assert (code, body["error"]["code"]) == (409, "already_offered"), body

        await cluster.redis.start()  # the same port, empty: nothing survived in Redis
        restarted = time.monotonic()

        async def registered_again() -> bool:
            records = [await cluster.node_record(n.id) for n in cluster.nodes]
            statuses = [(await n.status(http))["node"]["registry_ok"] for n in cluster.nodes]
            return all(records) and all(statuses)

        await wait_until(registered_again, 15, "every node back in Redis with registry_ok")
        assert time.monotonic() - restarted <= 10.0
        # The sessions they hold are registered again too, so any node finds their owner.
        assert await cluster.owner(direct.session_id) == local.id
        assert await cluster.owner(client.session_id) in {n.id for n in cluster.nodes}
        assert await cluster.owner(outage_sid) in {n.id for n in cluster.nodes}
        await text_turn(client, token("after-outage"))
        for sid in (outage_sid, direct.session_id):
            code, body = await post_json(http, f"{lb}{API}/session/end", {"session_id": sid})
            assert (code, body.get("reason")) == (200, "client_hangup"), body


# -- one machine, many workers ----------------------------------------------------------------------


def worker_pids(parent: int) -> list[int]:
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return []
    return [int(pid) for pid in children]


def test_worker_ports_are_taken_below_the_range_outgoing_connections_use() -> None:
    # A port from a bind to port 0 can go to an outgoing connection (here, a readiness check's)
    # before the worker that is to listen on it binds it: a clean-clone run of the suite failed so.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    first = free_ports(2)
    assert 10_000 <= first and first + 1 < low, (first, low)
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", first))
        b.bind(("127.0.0.1", first + 1))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


async def test_workers_share_one_port_hold_calls_each_and_stop_on_sigterm(
    pool: ModelPool, tmp_path: Path
) -> None:
    port, node_port = free_ports(), free_ports(2)
    log = tmp_path / "workers.log"
    argv = [sys.executable, "-m", "rtcvoice", "serve", "--workers", "2", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--node-port", str(node_port), "--node-id", "box"]
    argv += ["--db-path", str(tmp_path / "threads.db"), *pool.node_args(), "--log-level", "INFO"]
    parent = spawn(argv, log)
    public = f"http://127.0.0.1:{port}"
    workers = {f"box-w{k}": f"http://127.0.0.1:{node_port + k}" for k in range(2)}
    try:
        async with new_http() as http, calling() as clients:

            async def both_ready() -> bool:
                if parent.poll() is not None:
                    raise AssertionError(f"the parent exited ({parent.returncode}):\n{tail(log)}")
                for node_id, url in workers.items():
                    code, data = await get_json(http, f"{url}/readyz")
                    assert data["node"] == node_id, data
                    if code != 200:
                        return False
                return True

            await wait_until(both_ready, 60, "both workers ready on their node ports")

            async def held() -> dict[str, int]:
                counts = {}
                for node_id, url in workers.items():
                    code, data = await get_json(http, f"{url}{API}/status")
                    assert code == 200 and data["node"]["id"] == node_id, data
                    counts[node_id] = data["sessions"]
                return counts

            # Real calls through the shared port: their offers reach whichever worker the kernel
            # picks, and are passed to the one holding the call.
            for _ in range(2):
                caller = await dial(clients, public)
                asked = time.monotonic()
                await text_turn(caller, token("worker-call"))

                async def heard(caller: VoiceCallClient = caller, after: float = asked) -> bool:
                    return caller.received.first_sound_after(after) is not None

                await wait_until(heard, 15, "the worker's spoken answer reached the caller")
            # More sessions through the shared port (a connection each) until both workers hold one.
            extra = []
            for _ in range(20):
                if all((await held()).values()):
                    break
                code, body = await post_json(http, f"{public}{API}/session/start", {})
                assert code == 200, body
                extra.append(body["session_id"])
            counts = await held()
            assert all(counts.values()) and sum(counts.values()) == 2 + len(extra), counts
            for sid in extra:
                code, body = await post_json(http, f"{public}{API}/session/end", {"session_id": sid})
                assert code == 200, body
            for client in clients:
                await client.close()
            assert sum((await held()).values()) == 0

        pids = worker_pids(parent.pid)
        assert len(pids) == 2, pids
        parent.send_signal(signal.SIGTERM)
        assert await wait_exit(parent, 30, "the workers' parent", log) == 0, tail(log)

        async def workers_gone() -> bool:
            return not any(alive(pid) for pid in pids)

        await wait_until(workers_gone, 5, "both workers exited")
    finally:
        if parent.poll() is None:
            parent.send_signal(signal.SIGINT)
            with contextlib.suppress(AssertionError):
                await wait_exit(parent, 20, "the workers' parent")
            parent.kill()


# -- settings that cannot work ----------------------------------------------------------------------


async def serve_fails(args: list[str]) -> tuple[int, str, float]:
    """(exit code, stderr, seconds) of ``rtcvoice serve`` with ``args``, which must exit by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTCVOICE_", "OPENAI_"))}
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rtcvoice",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_ports()),
        "--log-level",
        "WARNING",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"rtcvoice serve {' '.join(args)} did not exit") from None
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace"), time.monotonic() - started


async def test_cluster_settings_that_cannot_work_stop_the_node_at_startup_with_the_fix(
    cluster: Cluster, tmp_path: Path
) -> None:
    models = cluster.pool.node_args()
    dead_redis = f"redis://127.0.0.1:{free_ports()}/0"
    stray = f"http://127.0.0.1:{free_ports()}"
    probe_db = 7  # the misaddressed node registers here, away from the shared cluster's nodes
    (no_redis, no_database, bad_url) = await asyncio.gather(
        serve_fails(["--cluster-url", dead_redis, "--database-url", cluster.database_url, *models]),
        serve_fails(["--cluster-url", cluster.redis.url(), "--db-path", str(tmp_path / "t.db"), *models]),
        serve_fails(
            [
                *("--cluster-url", cluster.redis.url(probe_db), "--database-url", cluster.database_url),
                *("--node-id", "stray", "--node-url", stray, *models),
            ]
        ),
    )
    code, err, seconds = no_redis
    assert code == 2 and f"cannot start: Redis at {dead_redis}" in err, err
    assert seconds < 30, f"an unreachable Redis took {seconds:.1f} s to report"
    code, err, seconds = no_database
    assert code == 2 and "cannot start" in err and "database_url" in err, err
    code, err, seconds = bad_url
    assert code == 2 and f"cannot start: node_url {stray} does not reach this node" in err, err
    # It left the registry it had joined: no node with a dead address stays there.
    probe = cluster.redis.client(probe_db)
    try:
        assert await cluster.node_record("stray", probe) is None
    finally:
        await probe.aclose()
