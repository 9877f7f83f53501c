"""Optional OpenTelemetry: one trace per turn, a "turn" span with "stt", "agent" and "tts" children.

Needs the otel extra (``pip install 'rtcvoice[otel]'``); without ``otel_endpoint`` nothing here
is imported. Spans are made from each turn's ``metrics`` event when it passes, so the turn's
code carries no tracing calls. That event reports durations, not times: the spans are placed
on the clock from them (see :func:`turn_layout`), the durations themselves are exact.

Spans go through a BatchSpanProcessor: export (an HTTP POST) happens on its own thread, never
on the event loop; :meth:`Tracer.shutdown` flushes what is queued and blocks, so callers run it
in a thread.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..settings import Settings
from .metrics import STAGES as TIMINGS

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

INSTALL_HINT = "pip install 'rtcvoice[otel]'"
TRACES_PATH = "/v1/traces"
# Each child span: (name, the metrics event's fields for its duration, first present wins). The
# agent's part of the first audio is its first sentence (the TTS starts on it), not its whole
# reply; a turn cut off before a whole sentence has only its first token.
CHILDREN = (
    ("stt", ("stt",)),
    ("agent", ("llm_first_sentence", "llm_first_token")),
    ("tts", ("tts_first_audio",)),
)


def check_tracing(settings: Settings) -> None:
    """ValueError, with the fix, when ``otel_endpoint`` is set but OpenTelemetry is not installed."""
    if settings.otel_endpoint.strip():
        _import_otel()


def _import_otel() -> None:
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"otel_endpoint is set, but OpenTelemetry is not installed ({exc}): {INSTALL_HINT}, "
            "or unset otel_endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)"
        ) from None


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for an endpoint given as a collector's base URL (the OTel convention)."""
    endpoint = endpoint.strip().rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


def _otlp_exporter(endpoint: str) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=traces_url(endpoint))


@dataclass(frozen=True)
class Span:
    name: str
    start_ns: int
    end_ns: int


def turn_layout(event: dict[str, Any], end_ns: int) -> tuple[Span, list[Span]]:
    """The turn and its stages on the clock, for a ``metrics`` event that passed at ``end_ns``.

    A spoken turn's event comes when its first audio is played, so the turn runs from the end of
    the caller's speech (``voice_to_voice`` before) to then. Its stages ran back to back (the
    agent starts on the transcript, the TTS on the first sentence) and end where the first
    audio was ready: ``end_of_turn + compute_after_turn_end`` after the speech ended. A turn
    without those (text only, or cut off before any audio) ends when its event came, with its
    stages laid end to end from its start. Stages the turn did not have (no STT for typed text)
    have no span.
    """
    ms = {
        k: float(v) for k in TIMINGS if isinstance(v := event.get(k), int | float) and not isinstance(v, bool)
    }
    stages: list[tuple[str, int]] = []
    for name, fields in CHILDREN:
        found = next((ms[f] for f in fields if f in ms), None)
        if found is not None:
            stages.append((name, int(found * 1e6)))
    total = sum(d for _, d in stages)
    if "voice_to_voice" in ms:
        start = end_ns - int(ms["voice_to_voice"] * 1e6)
        if "end_of_turn" in ms and "compute_after_turn_end" in ms:
            ready = start + int((ms["end_of_turn"] + ms["compute_after_turn_end"]) * 1e6)
        else:
            ready = end_ns
    else:
        start = end_ns - total
        ready = end_ns
    ready = min(ready, end_ns)
    children: list[Span] = []
    cursor = ready
    for name, duration in reversed(stages):
        children.append(Span(name, cursor - duration, cursor))
        cursor -= duration
    children.reverse()
    # Work done ahead of the turn's end (speculation) starts before it: the turn covers it all.
    return Span("turn", min(start, cursor), end_ns), children


class Tracer:
    """Spans per turn into ``exporter``; the server's comes from :meth:`from_settings`."""

    def __init__(self, *, exporter: SpanExporter, node_id: str) -> None:
        _import_otel()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create(
            {
                "service.name": "rtcvoice",
                "service.version": __version__,
                "service.instance.id": node_id,
                "host.name": socket.gethostname(),
            }
        )
        # A provider of its own, not the global one: several servers can share a process (tests).
        self.provider: TracerProvider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self.provider.get_tracer("rtcvoice", __version__)

    @classmethod
    def from_settings(cls, settings: Settings, node_id: str) -> Tracer | None:
        """None without ``otel_endpoint``; ValueError (with the fix) when OpenTelemetry is missing."""
        endpoint = settings.otel_endpoint.strip()
        if not endpoint:
            return None
        _import_otel()
        return cls(exporter=_otlp_exporter(endpoint), node_id=node_id)

    def record_turn(self, event: dict[str, Any], *, thread_id: str | None = None) -> None:
        """Spans for one ``metrics`` event (anything else is ignored)."""
        if event.get("type") != "metrics":
            return
        from opentelemetry import trace

        turn, children = turn_layout(event, time.time_ns())
        attributes: dict[str, str | float | bool] = {}
        for key in ("session_id", "turn_id"):
            if isinstance(value := event.get(key), str):
                attributes[key] = value
        if thread_id:
            attributes["thread_id"] = thread_id
        for key in TIMINGS:
            if isinstance(value := event.get(key), int | float) and not isinstance(value, bool):
                attributes[f"{key}_ms"] = float(value)
        if isinstance(speculative := event.get("speculative"), bool):
            attributes["speculative"] = speculative
        parent = self._tracer.start_span("turn", start_time=turn.start_ns, attributes=attributes)
        context = trace.set_span_in_context(parent)
        ids = {k: v for k, v in attributes.items() if k in ("session_id", "turn_id", "thread_id")}
        for child in children:
            span = self._tracer.start_span(
                child.name,
                context=context,
                start_time=child.start_ns,
                attributes={**ids, "duration_ms": (child.end_ns - child.start_ns) / 1e6},
            )
            span.end(end_time=child.end_ns)
        parent.end(end_time=turn.end_ns)

    def force_flush(self, timeout_ms: int = 5000) -> bool:
        """Export what is queued now (blocks)."""
        return bool(self.provider.force_flush(timeout_ms))

    def shutdown(self) -> None:
        """Flush and stop the export thread (blocks up to the exporter's timeout)."""
        self.provider.shutdown()
