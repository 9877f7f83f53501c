"""Where nodes and sessions are registered: Redis (many machines) or a folder (one machine).

Both keep values with an expiry, so a node that dies drops out by itself. Keys:
``rtcvoice:node:<id>`` (a NodeRecord as JSON), the set ``rtcvoice:nodes`` (ids, pruned as their
records expire) and ``rtcvoice:session:<id>`` (owner, or why it ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from .records import NodeRecord

PREFIX = "rtcvoice:"


class RegistryError(Exception):
    """The registry cannot be reached or used; the message says what to fix."""


class Backend(Protocol):
    name: str

    async def ping(self) -> None: ...

    async def put_node(self, record: NodeRecord, ttl_s: float) -> None: ...

    async def delete_node(self, node_id: str) -> None: ...

    async def nodes(self) -> list[NodeRecord]: ...

    async def put_sessions(self, values: dict[str, str], ttl_s: float) -> None: ...

    async def get_session(self, session_id: str) -> str | None: ...

    async def close(self) -> None: ...


def backend_kind(url: str) -> str:
    """``redis`` or ``file`` for a ``cluster_url``; ValueError, with the fix, for one this cannot use."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return "redis"
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"cluster_url {url!r}: a folder is written file:///absolute/path")
        return "file"
    raise ValueError(
        f"cluster_url {url!r} must be redis://HOST:PORT/DB (rediss:// for TLS) or file:///FOLDER"
    )


def open_backend(url: str) -> Backend:
    """The backend a ``cluster_url`` names (nothing is contacted yet). ValueError as ``backend_kind``."""
    if backend_kind(url) == "redis":
        return RedisBackend(url.strip())
    return FileBackend(Path(unquote(urlsplit(url.strip()).path)))


class RedisBackend:
    """Redis (or anything speaking its protocol: Valkey, KeyDB, a managed Redis)."""

    def __init__(self, url: str) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise ValueError(
                f"cluster_url {url!r} needs the redis package ({exc}): pip install 'rtcvoice[cluster]'"
            ) from exc
        self.url = url
        self.name = "redis"
        # Short timeouts: a registry that hangs must not hold up a call's signaling for long.
        self._redis: Any = aioredis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=2.0, health_check_interval=10
        )

    def _where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"

    async def _call(self, coro: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise RegistryError(f"Redis at {self._where()}: {exc}") from exc

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def put_node(self, record: NodeRecord, ttl_s: float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(f"{PREFIX}node:{record.id}", record.to_json(), px=int(ttl_s * 1000))
        pipe.sadd(f"{PREFIX}nodes", record.id)
        await self._call(pipe.execute())

    async def delete_node(self, node_id: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(f"{PREFIX}node:{node_id}")
        pipe.srem(f"{PREFIX}nodes", node_id)
        await self._call(pipe.execute())

    async def nodes(self) -> list[NodeRecord]:
        ids = sorted(m.decode() for m in await self._call(self._redis.smembers(f"{PREFIX}nodes")))
        if not ids:
            return []
        raws = await self._call(self._redis.mget([f"{PREFIX}node:{i}" for i in ids]))
        records, gone = [], []
        for node_id, raw in zip(ids, raws, strict=True):
            record = NodeRecord.from_json(raw) if raw is not None else None
            if record is None:
                gone.append(node_id)
            else:
                records.append(record)
        if gone:
            await self._call(self._redis.srem(f"{PREFIX}nodes", *gone))
        return records

    async def put_sessions(self, values: dict[str, str], ttl_s: float) -> None:
        if not values:
            return
        pipe = self._redis.pipeline(transaction=False)
        for session_id, value in values.items():
            pipe.set(f"{PREFIX}session:{session_id}", value, px=int(ttl_s * 1000))
        await self._call(pipe.execute())

    async def get_session(self, session_id: str) -> str | None:
        raw = await self._call(self._redis.get(f"{PREFIX}session:{session_id}"))
        return raw.decode() if raw is not None else None

    async def close(self) -> None:
        await self._redis.aclose()


class FileBackend:
    """A folder on this machine (the workers' default): one small JSON file per node and session.

    Files are replaced atomically (write, then rename), so a reader never sees half a record.
    File work runs in a thread: the event loop never waits on the disk.
    """

    PRUNE_EVERY_S = 60.0

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = "file"
        self._pruned = time.monotonic()
        # Held by each file operation in its thread: a write whose await was cancelled still
        # finishes before a later delete runs, so a node that left does not reappear.
        self._lock = threading.Lock()

    def _session_path(self, session_id: str) -> Path:
        # Session ids may be a backend's own strings: hash them into safe, bounded file names.
        return self.root / "sessions" / (hashlib.sha256(session_id.encode()).hexdigest()[:40] + ".json")

    def _write(self, path: Path, value: str, ttl_s: float) -> None:
        payload = json.dumps({"value": value, "expires": time.time() + ttl_s})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or float(data.get("expires", 0)) <= time.time():
            return None
        value = data.get("value")
        return value if isinstance(value, str) else None

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            return fn(*args)

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(self._locked, fn, *args)
        except OSError as exc:
            raise RegistryError(f"cluster folder {self.root}: {exc}") from exc

    def _ping(self) -> None:
        for sub in ("nodes", "sessions"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        probe = self.root / "nodes" / ".probe"
        probe.write_text("")
        probe.unlink()

    async def ping(self) -> None:
        await self._run(self._ping)

    async def put_node(self, record: NodeRecord, ttl_s: float) -> None:
        await self._run(self._write, self.root / "nodes" / f"{record.id}.json", record.to_json(), ttl_s)

    async def delete_node(self, node_id: str) -> None:
        def delete() -> None:
            with contextlib.suppress(OSError):
                (self.root / "nodes" / f"{node_id}.json").unlink()

        await self._run(delete)

    async def nodes(self) -> list[NodeRecord]:
        def read_all() -> list[NodeRecord]:
            records = []
            for path in sorted((self.root / "nodes").glob("*.json")):
                raw = self._read(path)
                record = NodeRecord.from_json(raw) if raw is not None else None
                if record is not None:
                    records.append(record)
                elif raw is None and not path.name.startswith("."):
                    with contextlib.suppress(OSError):
                        if self._read(path) is None:
                            path.unlink()  # expired: the node is gone
            return records

        result: list[NodeRecord] = await self._run(read_all)
        if time.monotonic() - self._pruned > self.PRUNE_EVERY_S:
            self._pruned = time.monotonic()
            await self._run(self._prune_sessions)
        return result

    def _prune_sessions(self) -> None:
        """Delete expired session files (Redis expires its keys by itself)."""
        for path in (self.root / "sessions").glob("*.json"):
            if self._read(path) is None:
                with contextlib.suppress(OSError):
                    path.unlink()

    async def put_sessions(self, values: dict[str, str], ttl_s: float) -> None:
        def write_all() -> None:
            for session_id, value in values.items():
                self._write(self._session_path(session_id), value, ttl_s)

        if values:
            await self._run(write_all)

    async def get_session(self, session_id: str) -> str | None:
        result: str | None = await self._run(self._read, self._session_path(session_id))
        return result

    async def close(self) -> None:
        return None
