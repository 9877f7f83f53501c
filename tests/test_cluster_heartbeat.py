"""The node's registry heartbeat stops when the node does, whatever its registry client does."""

from __future__ import annotations

import asyncio

from rtcvoice.cluster.node import ClusterNode
from rtcvoice.cluster.records import NodeRecord


class CancelSwallowingBackend:
    """A registry whose writes can hang and then, cancelled, return as if they had succeeded:
    what a client library that catches CancelledError mid-command does."""

    name = "swallowing"

    def __init__(self) -> None:
        self.hang = False
        self.hanging = asyncio.Event()
        self.swallowed = 0

    async def ping(self) -> None:
        pass

    async def put_node(self, record: NodeRecord, ttl_s: float) -> None:
        if not self.hang:
            return
        self.hanging.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.swallowed += 1

    async def delete_node(self, node_id: str) -> None:
        pass

    async def nodes(self) -> list[NodeRecord]:
        return []

    async def put_sessions(self, values: dict[str, str], ttl_s: float) -> None:
        pass

    async def get_session(self, session_id: str) -> str | None:
        return None

    async def close(self) -> None:
        pass


async def test_stopping_a_node_ends_its_heartbeat_even_when_the_registry_client_swallows_the_cancel() -> None:
    backend = CancelSwallowingBackend()
    node = ClusterNode(
        node_id="n1",
        url="http://127.0.0.1:1",
        backend=backend,
        max_calls=4,
        load_threshold=0.9,
        count_calls=lambda: 0,
        cpus=1.0,
        heartbeat_s=0.2,
    )
    await node.start()
    backend.hang = True
    node.changed()
    async with asyncio.timeout(5):
        await backend.hanging.wait()
    # Before: the heartbeat went on after its cancel was swallowed, and stop() (and with it the
    # server's exit after a SIGTERM) waited for it forever.
    stopping = asyncio.create_task(node.stop())
    done, _ = await asyncio.wait({stopping}, timeout=5)
    backend.hang = False  # lets a heartbeat that outlived the test end with it
    assert done, "stop() did not return: the heartbeat outlived its cancel"
    assert backend.swallowed == 1
    await node.stop()  # idempotent
