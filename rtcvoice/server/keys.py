"""Typed keys of the aiohttp application's shared state (one place, so route modules can share them)."""

from __future__ import annotations

from aiohttp import web

from ..cluster.node import ClusterNode
from ..engines import Engines
from ..settings import Settings
from ..store import Store
from ..telemetry.metrics import Metrics
from ..tools import Toolbox
from ..transports.realtime import RealtimePeer
from .auth import Authenticator
from .sessions import SessionRegistry
from .turn import IceServers

SETTINGS = web.AppKey("settings", Settings)
ENGINES = web.AppKey("engines", Engines)
SESSIONS = web.AppKey("sessions", SessionRegistry)
ICE = web.AppKey("ice", IceServers)
STORE = web.AppKey("store", Store)
TOOLS = web.AppKey("tools", Toolbox)  # the tools the AI may call (README "Tools")
AUTH: web.AppKey[Authenticator | None] = web.AppKey("auth")
REALTIME: web.AppKey[set[RealtimePeer]] = web.AppKey("realtime_connections")
NODE = web.AppKey("node", ClusterNode)  # this node in its cluster (alone: a cluster of one)
METRICS = web.AppKey("metrics", Metrics)  # this node's Prometheus metrics (server/ops.py)
