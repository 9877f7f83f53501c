"""What operators and orchestrators ask a node: ``/metrics``, ``/readyz``, ``/livez``; and the wiring
that feeds the node's telemetry (metrics, spans per turn) from every call's events.

The three routes sit outside ``/api/``, so they take no token (auth.py opens every path outside
it): a Prometheus scraper or a kubelet probe carries none.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import __version__
from ..telemetry import Metrics, NodeReadings, Tracer, check_tracing
from .keys import METRICS, NODE, REALTIME, SESSIONS, SETTINGS

log = logging.getLogger(__name__)

__all__ = ["OPS", "OpsState", "install", "node_readings", "observed", "routes", "tracer_of", "transport_name"]

NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class OpsState:
    started: bool = False  # every cleanup context has started (engines loaded, store open)
    stopping: bool = False  # shutdown began: take no traffic
    tracer: Tracer | None = None


OPS = web.AppKey("ops", OpsState)


def install(app: web.Application) -> None:
    """Metrics, readiness state and (with ``otel_endpoint``) the tracer, for ``create_app``.

    ValueError, with the fix, when ``otel_endpoint`` is set without OpenTelemetry installed:
    before minutes of model loading, like the other settings that cannot work.
    """
    check_tracing(app[SETTINGS])
    app[METRICS] = Metrics(lambda: node_readings(app))
    app[OPS] = OpsState()
    # on_startup handlers run after every cleanup context has started, whenever this is called.
    app.on_startup.append(_started)
    app.on_shutdown.append(_stopping)
    app.cleanup_ctx.append(_tracer_ctx)


def routes() -> list[web.RouteDef]:
    return [web.get("/metrics", metrics), web.get("/readyz", readyz), web.get("/livez", livez)]


def node_id(app: web.Application) -> str:
    if NODE in app:
        return app[NODE].id
    return app[SETTINGS].node_id.strip() or socket.gethostname()


def node_readings(app: web.Application) -> NodeReadings:
    sessions = app[SESSIONS] if SESSIONS in app else None
    late = sessions.late_frames if sessions is not None else 0
    if NODE in app:
        node = app[NODE]
        return NodeReadings(
            node_id=node.id,
            version=__version__,
            calls=node.calls(),
            max_calls=node.max_calls,
            serving=node.serving,
            load=node.load(),
            registry_ok=node.registry_ok,
            late_frames=late,
        )
    calls = (len(sessions) if sessions is not None else 0) + (len(app[REALTIME]) if REALTIME in app else 0)
    return NodeReadings(
        node_id=node_id(app),
        version=__version__,
        calls=calls,
        max_calls=app[SETTINGS].max_sessions,
        serving=True,
        load=0.0,
        registry_ok=True,
        late_frames=late,
    )


def transport_name(peer: object) -> str:
    """A call's transport as a metrics label: webrtc, websocket, realtime, socketio, audiochat."""
    return type(peer).__name__.removesuffix("Peer").lower() or "unknown"


def tracer_of(app: web.Application) -> Tracer | None:
    return app[OPS].tracer if OPS in app else None


# -- the calls' events ------------------------------------------------------------------------------
_reported: set[type[BaseException]] = set()


def observed(
    app: web.Application, send: Callable[[dict[str, Any]], None], *, thread_id: str | None = None
) -> Callable[[dict[str, Any]], None]:
    """``send``, with every event counted (and each turn traced) on its way to the client.

    Telemetry never fails a call: an error in it is logged (once per kind) and the event still goes.
    """
    metrics = app[METRICS] if METRICS in app else None
    state = app[OPS] if OPS in app else None
    if metrics is None and state is None:
        return send
    thread = thread_id  # a turn's span names its thread; the event does not carry it

    def observe(event: dict[str, Any]) -> None:
        nonlocal thread
        try:
            if metrics is not None:
                metrics.observe_event(event)
            kind = event.get("type")
            if kind == "thread.updated" and isinstance(event.get("thread_id"), str):
                thread = event["thread_id"]
            elif kind == "metrics" and state is not None and state.tracer is not None:
                state.tracer.record_turn(event, thread_id=thread)
        except Exception as exc:
            if type(exc) not in _reported:
                _reported.add(type(exc))
                log.exception("telemetry failed on a %r event (reported once per kind)", event.get("type"))
        send(event)

    return observe


# -- lifecycle ------------------------------------------------------------------------------------
async def _started(app: web.Application) -> None:
    app[OPS].started = True


async def _stopping(app: web.Application) -> None:
    app[OPS].stopping = True


async def _tracer_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[OPS]
    # Made at startup, not in create_app: its export thread should live only while the app runs.
    state.tracer = Tracer.from_settings(app[SETTINGS], node_id(app))
    if state.tracer is not None:
        log.info("tracing turns to %s", app[SETTINGS].otel_endpoint)
    yield
    tracer, state.tracer = state.tracer, None
    if tracer is not None:
        await asyncio.to_thread(tracer.shutdown)  # flushing is an HTTP POST: off the event loop


# -- routes ---------------------------------------------------------------------------------------
async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type, **NO_STORE})


async def readyz(request: web.Request) -> web.Response:
    """200 while this node should get new calls; 503 while starting, draining or stopping."""
    app = request.app
    state = app[OPS]
    answer: dict[str, Any] = {"node": node_id(app)}
    if NODE in app:
        node = app[NODE]
        answer.update(calls=node.calls(), max_calls=node.max_calls)
        draining = not node.serving
    else:
        draining = False
    if state.stopping:
        status = "stopping"
    elif not state.started:
        status = "starting"
    elif draining:
        status = "draining"
    else:
        status = "ready"
    return web.json_response(
        {"status": status, **answer}, status=200 if status == "ready" else 503, headers=NO_STORE
    )


async def livez(request: web.Request) -> web.Response:
    """200 whenever the event loop answers; names the node (nodes check their own URL with it)."""
    return web.json_response(
        {"status": "alive", "node": node_id(request.app), "version": __version__}, headers=NO_STORE
    )
