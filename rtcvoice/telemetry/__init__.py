"""Operating a fleet: Prometheus metrics, structured logs and optional OpenTelemetry spans per turn.

A leaf package: it knows conversation events only as dicts and the node only through the
readings it is handed, so the server wires it in and nothing here imports the server.
"""

from __future__ import annotations

from .logs import JsonFormatter, log_context, session_id_var, setup_logging, turn_id_var
from .metrics import STAGES, Metrics, NodeReadings
from .tracing import Tracer, check_tracing

__all__ = [
    "STAGES",
    "JsonFormatter",
    "Metrics",
    "NodeReadings",
    "Tracer",
    "check_tracing",
    "log_context",
    "session_id_var",
    "setup_logging",
    "turn_id_var",
]
