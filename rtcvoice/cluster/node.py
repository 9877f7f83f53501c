"""This node in its cluster: what it publishes, which calls it holds, and where other calls live.

Follows LiveKit's Redis router (shared/research/scale.md §1.1): a node record with a short expiry
refreshed every ``heartbeat_s`` (a node that dies drops out within ``3 × heartbeat_s``), a
session → owner key per call, least-loaded placement among serving nodes, and a draining state.
A registry outage never ends a call: the node keeps serving what it holds, admits new calls
itself, and re-registers everything when the registry answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable

from .. import __version__
from .backends import Backend, RegistryError
from .load import LoadMeter
from .records import (
    Ended,
    Lookup,
    Lost,
    NodeRecord,
    NodeState,
    Owner,
    Unknown,
    parse_session_value,
    session_value,
)

log = logging.getLogger(__name__)

ENDED_TTL_S = 600.0  # how long another node can still answer "already ended" for a session
# A live session's owner, refreshed every few heartbeats: a dead node's calls answer 410 (owner
# gone) for up to this long, then nothing is known of them.
SESSION_TTL_S = 120.0
ENDED_REMEMBERED = 4096  # sessions this node ended, kept for ``lookup`` (see there)


class ClusterNode:
    def __init__(
        self,
        *,
        node_id: str,
        url: str,
        backend: Backend | None,
        max_calls: int,
        load_threshold: float,
        count_calls: Callable[[], int],
        cpus: float,
        heartbeat_s: float = 2.0,
    ) -> None:
        self.id = node_id
        self.url = url.rstrip("/")
        self.backend = backend
        self.max_calls = max_calls
        self.load_threshold = load_threshold
        self.heartbeat_s = heartbeat_s
        self.state: NodeState = "serving"
        self.meter = LoadMeter(cpus)
        self.registry_ok = backend is None
        self._count_calls = count_calls
        self._sessions: dict[str, str] = {}  # live sessions held here → registry value
        self._pending: dict[str, str] = {}  # writes not yet in the registry (ends included)
        self._ended: OrderedDict[str, str] = OrderedDict()  # sessions ended here → registry value
        self._peers: list[NodeRecord] = []
        self._peers_at = 0.0
        # When this node sent calls to each peer: those after the peer's last record are not in
        # its published count yet, so a burst spreads instead of piling onto one node.
        self._sent: dict[str, list[float]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- state -------------------------------------------------------------------------------------
    @property
    def clustered(self) -> bool:
        return self.backend is not None

    @property
    def serving(self) -> bool:
        return self.state == "serving"

    def calls(self) -> int:
        return self._count_calls()

    def load(self) -> float:
        return self.meter.sample()

    def has_room(self) -> bool:
        """Whether a new call should be taken here rather than sent to an emptier node.

        Here only if this node is serving, under its limits, and no serving peer with room holds
        fewer calls per CPU: taking every call the node has room for until its load crosses the
        threshold piled them all onto the node the balancer happened to pick (bench/README.md).
        """
        if not (self.serving and self.calls() < self.max_calls and self.load() < self.load_threshold):
            return False
        mine = self.calls() / self.meter.cpus
        return not any(self._calls_per_cpu(p) < mine for p in self._peers if self._takes_calls(p, roomy=True))

    def record(self) -> NodeRecord:
        return NodeRecord(
            id=self.id,
            url=self.url,
            state=self.state,
            calls=self.calls(),
            max_calls=self.max_calls,
            load=self.meter.sample(),
            cpus=self.meter.cpus,
            version=__version__,
            expires=time.time() + 3 * self.heartbeat_s,
        )

    def status(self) -> dict[str, object]:
        return {
            "id": self.id,
            "url": self.url,
            "state": self.state,
            "calls": self.calls(),
            "max_calls": self.max_calls,
            "load": self.load(),
            "cpus": self.meter.cpus,
            "registry": self.backend.name if self.backend is not None else None,
            "registry_ok": self.registry_ok,
        }

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Register; RegistryError (with the URL and the cause) when the registry cannot be reached."""
        if self.backend is None:
            return
        await self.backend.ping()
        await self._publish()
        self.registry_ok = True
        self._task = asyncio.create_task(self._heartbeat(), name=f"cluster-heartbeat-{self.id}")

    async def drain(self) -> None:
        """Stop taking calls; the calls held go on. Published at once, so no new call is sent here."""
        self.state = "draining"
        self.changed()
        log.info("node %s draining: no new calls; %d running", self.id, self.calls())

    async def stop(self) -> None:
        """Leave the registry (ended sessions written first); idempotent."""
        task, self._task = self._task, None
        if task is not None:
            # The flag and the wake end the loop even if its cancellation is lost below it (see
            # _heartbeat); the bound keeps a registry client stuck in a call from holding up exit.
            self._stopping = True
            self._wake.set()
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=self.heartbeat_s * 2 + 1)
            if not done:
                log.warning("node %s: the registry heartbeat did not stop; leaving it", self.id)
            elif not task.cancelled() and task.exception() is not None:
                log.warning("node %s: the registry heartbeat failed: %r", self.id, task.exception())
        if self.backend is None:
            return
        try:
            async with asyncio.timeout(3):
                await self._flush()
                await self.backend.delete_node(self.id)
        except (RegistryError, TimeoutError) as exc:
            log.warning("node %s could not leave the registry (it expires by itself): %s", self.id, exc)
        await self.backend.close()

    def changed(self) -> None:
        """Publish soon: load reports on change, not only on the timer (scale.md §4.4)."""
        self._wake.set()

    # -- sessions -------------------------------------------------------------------------------
    @property
    def session_prefix(self) -> str:
        """Session ids made here start with this node's id and a dot (``owner_hint`` reads it back)."""
        return f"{self.id}." if self.backend is not None else ""

    def claim(self, session_id: str) -> None:
        """This node holds the session now (written at the next ``settle``, or the heartbeat)."""
        if self.backend is None:
            return
        value = session_value(node_id=self.id)
        self._sessions[session_id] = value
        self._pending[session_id] = value
        self.changed()

    def release(self, session_id: str, reason: str, user_id: str | None) -> None:
        if self.backend is None:
            return
        self._sessions.pop(session_id, None)
        value = session_value(ended=reason, user_id=user_id)
        self._pending[session_id] = value
        self._ended[session_id] = value
        self._ended.move_to_end(session_id)
        while len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)
        self.changed()

    async def settle(self, timeout_s: float = 1.0) -> None:
        """Write pending claims now, so a request for a just-started session finds its owner.

        Bounded: with the registry down the call still starts (this node answers it directly).
        """
        if self.backend is None or not self._pending:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self._flush()
        except (RegistryError, TimeoutError) as exc:
            self._registry_failed(exc)

    async def lookup(self, session_id: str) -> Lookup:
        """Who holds a session that is not here (Unknown when not clustered or the registry is down)."""
        if self.backend is None:
            return Unknown()
        try:
            raw = await self.backend.get_session(session_id)
            if raw is None:  # not written yet (or lost with a registry restart): what the id says
                return self._owner_from_id(session_id)
            owner, ended, user = parse_session_value(raw)
            if ended is not None:
                return Ended(ended, user)
            if owner is None:
                return Unknown()
            if owner == self.id:
                # Not live here, yet the registry names this node. Either it ended here a moment
                # ago and its end is not written yet (a client's session/end right after its peer
                # or socket closed, as web/rtcvoice.js hangs up: that is no lost call, and 410
                # would say it is), or this node restarted and lost it.
                ended_here = self._ended.get(session_id)
                if ended_here is not None:
                    _, reason, user = parse_session_value(ended_here)
                    if reason is not None:
                        return Ended(reason, user)
                return Lost(owner)
            for node in await self.peers(fresh=True):
                if node.id == owner and node.alive:
                    return Owner(node)
            return Lost(owner)
        except RegistryError as exc:
            self._registry_failed(exc)
            return self._owner_from_id(session_id)

    def _owner_from_id(self, session_id: str) -> Lookup:
        """With the registry down: the node a session id names, as last seen (a new call admitted
        during the outage must still get its offer and its end through any node)."""
        hint = session_id.rpartition(".")[0]
        if hint and hint != self.id:
            for node in self._peers:
                if node.id == hint:
                    return Owner(node)
        return Unknown()

    async def peers(self, *, fresh: bool = False) -> list[NodeRecord]:
        """The other live nodes, as last published (refetched when older than a heartbeat)."""
        if self.backend is None:
            return []
        if fresh or time.monotonic() - self._peers_at > self.heartbeat_s:
            try:
                await self._refresh_peers()
            except RegistryError as exc:
                self._registry_failed(exc)
        return [p for p in self._peers if p.alive]

    async def _refresh_peers(self) -> None:
        assert self.backend is not None
        nodes = await self.backend.nodes()
        self._peers = [n for n in nodes if n.id != self.id]
        self._peers_at = time.monotonic()

    def _calls(self, peer: NodeRecord) -> int:
        """The peer's calls: as published, plus those sent to it since."""
        published = peer.expires - 3 * self.heartbeat_s  # every node publishes with the same expiry
        sent = [t for t in self._sent.get(peer.id, []) if t > published]
        self._sent[peer.id] = sent
        return peer.calls + len(sent)

    def _calls_per_cpu(self, peer: NodeRecord) -> float:
        return self._calls(peer) / max(peer.cpus, 0.05)

    def _takes_calls(self, peer: NodeRecord, *, roomy: bool) -> bool:
        if not peer.alive or peer.state != "serving" or self._calls(peer) >= peer.max_calls:
            return False
        return peer.load < self.load_threshold if roomy else True

    async def place(self) -> NodeRecord | None:
        """The other serving node with the fewest calls per CPU: one under the load threshold
        first, else any not full (the call must go somewhere). None when none can take it."""
        peers = await self.peers()
        candidates = [p for p in peers if self._takes_calls(p, roomy=True)] or [
            p for p in peers if self._takes_calls(p, roomy=False)
        ]
        if not candidates:
            return None

        def emptiness(p: NodeRecord) -> tuple[float, float]:
            return (self._calls_per_cpu(p), p.load)

        best = min(emptiness(p) for p in candidates)
        choice = random.choice([p for p in candidates if emptiness(p) <= best])
        self._sent.setdefault(choice.id, []).append(time.time())
        return choice

    # -- registry writes ---------------------------------------------------------------------------
    async def _publish(self) -> None:
        assert self.backend is not None
        await self.backend.put_node(self.record(), 3 * self.heartbeat_s)
        await self._flush()

    async def _flush(self) -> None:
        assert self.backend is not None
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        live = {k: v for k, v in batch.items() if k in self._sessions}
        ended = {k: v for k, v in batch.items() if k not in self._sessions}
        try:
            await self.backend.put_sessions(live, SESSION_TTL_S)
            await self.backend.put_sessions(ended, ENDED_TTL_S)
        except BaseException:
            self._pending = {**batch, **self._pending}  # written again next time
            raise

    async def _heartbeat(self) -> None:
        assert self.backend is not None
        me = asyncio.current_task()
        refreshed = time.monotonic()
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                async with asyncio.timeout(self.heartbeat_s * 2):
                    if time.monotonic() - refreshed > SESSION_TTL_S / 4 or not self.registry_ok:
                        # Every live session again: after a registry restart they would be missing.
                        self._pending = {**self._sessions, **self._pending}
                        refreshed = time.monotonic()
                    await self._publish()
                    # Kept current for placement, and for finding calls by id if the registry goes.
                    await self._refresh_peers()
                if not self.registry_ok:
                    log.warning("node %s: registry reachable again; re-registered", self.id)
                self.registry_ok = True
            except (RegistryError, TimeoutError) as exc:
                self._registry_failed(exc)
            if me is not None and me.cancelling():
                # A registry client caught our CancelledError mid-command and returned (seen with
                # redis-py under load): the loop would go on, and the shutdown waiting on it hang.
                raise asyncio.CancelledError
            await asyncio.sleep(0.05)  # a burst of changes publishes once, not once per change

    def _registry_failed(self, exc: BaseException) -> None:
        if self.registry_ok:
            log.warning(
                "node %s: cluster registry unreachable (%s): calls go on, new calls are taken here only",
                self.id,
                exc or "timed out",
            )
        self.registry_ok = False
