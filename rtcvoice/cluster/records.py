"""What a node publishes about itself, and what the registry says about a session."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from typing import Literal

NodeState = Literal["serving", "draining"]

NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_node_id(node_id: str) -> None:
    """ValueError unless ``node_id`` is a name that can go in registry keys, file names and URLs."""
    if not NODE_ID_PATTERN.match(node_id):
        raise ValueError(
            f"node_id {node_id!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


@dataclass(frozen=True)
class NodeRecord:
    id: str
    url: str  # where other nodes reach its HTTP server
    state: NodeState
    calls: int
    max_calls: int
    load: float  # busy fraction of the CPUs it may use, over the last heartbeat
    cpus: float
    version: str
    expires: float  # epoch seconds; a record past this is a dead node's

    @property
    def alive(self) -> bool:
        return self.expires > time.time()

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> NodeRecord | None:
        """None for a record this version cannot read (a newer node's, or a torn write)."""
        try:
            data = json.loads(raw)
            return cls(
                id=str(data["id"]),
                url=str(data["url"]),
                state="draining" if data["state"] == "draining" else "serving",
                calls=int(data["calls"]),
                max_calls=int(data["max_calls"]),
                load=float(data["load"]),
                cpus=float(data["cpus"]),
                version=str(data.get("version", "")),
                expires=float(data["expires"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Owner:
    """The session is live on this node."""

    node: NodeRecord


@dataclass(frozen=True)
class Lost:
    """The session was live on a node that is gone (killed, or cut off from the registry)."""

    node_id: str


@dataclass(frozen=True)
class Ended:
    """The session ended, for this reason; ``user_id`` is whose it was."""

    reason: str
    user_id: str | None


@dataclass(frozen=True)
class Unknown:
    """The registry knows nothing of the session (never started, or long gone)."""


Lookup = Owner | Lost | Ended | Unknown


def session_value(*, node_id: str | None = None, ended: str | None = None, user_id: str | None = None) -> str:
    """The registry's value for a session: its owner while live, or why it ended."""
    if ended is not None:
        return json.dumps({"ended": ended, "user": user_id}, separators=(",", ":"))
    return json.dumps({"node": node_id}, separators=(",", ":"))


def parse_session_value(raw: str | bytes) -> tuple[str | None, str | None, str | None]:
    """(owner node id, end reason, user id); all None for a value this version cannot read."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None
    node, ended, user = data.get("node"), data.get("ended"), data.get("user")
    return (
        node if isinstance(node, str) else None,
        ended if isinstance(ended, str) else None,
        user if isinstance(user, str) else None,
    )
