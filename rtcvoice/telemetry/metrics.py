"""Prometheus metrics of one node: calls, turns, per-stage latency, engine errors, late audio, CPU.

Each :class:`Metrics` owns its registry (several apps share a test process, and the default
global registry would mix them). Counters and histograms move as conversation events pass
(:meth:`Metrics.observe_event`); the node's state is read only when scraped, from the
:class:`NodeReadings` callable the server supplies, so nothing has to keep gauges in step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# The stage timings a turn's ``metrics`` event carries (Turn.metrics in conversation.py), in ms.
# A fixed list: a label value per field a client could not add to, and what dashboards can rely on.
STAGES = (
    "end_of_turn",
    "stt",
    "llm_first_token",
    "llm_first_sentence",
    "tts_first_audio",
    "voice_to_voice",
    "compute_after_turn_end",
    "server_overhead",
)
# Fine where replies live (50 ms - 1.5 s), coarse out to a stalled engine (10 s).
STAGE_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0)
MAX_CODE_CHARS = 40  # error codes are the server's own; this only bounds a label if one ever is not


@dataclass(frozen=True)
class NodeReadings:
    """The node as it is at scrape time."""

    node_id: str
    version: str
    calls: int
    max_calls: int
    serving: bool
    load: float
    registry_ok: bool
    late_frames: int


class Metrics:
    def __init__(self, readings: Callable[[], NodeReadings] | None = None, *, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.turns = Counter(
            "rtcvoice_turns",
            "Turns answered (end_of_response), by whether the caller cut them off.",
            ["interrupted"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "rtcvoice_turn_stage_seconds",
            "Latency of each stage of a turn, from its metrics event (stage: the event's field).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.engine_errors = Counter(
            "rtcvoice_engine_errors",
            "Errors that ended or degraded a turn (STT, agent, TTS, or the server itself), by code.",
            ["code"],
            registry=r,
        )
        self.underruns = Counter(
            "rtcvoice_audio_underruns",
            "Gaps in a reply's audio: speech was synthesized slower than it played.",
            registry=r,
        )
        self.calls_started = Counter(
            "rtcvoice_calls_started", "Calls started, by transport.", ["transport"], registry=r
        )
        self.calls_ended = Counter(
            "rtcvoice_calls_ended", "Calls ended, by the reason clients see.", ["reason"], registry=r
        )
        # Zero series from the start: a rate() over a series that appears mid-window reads as nothing.
        for flag in ("false", "true"):
            self.turns.labels(interrupted=flag)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        if process:
            ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes
        if readings is not None:
            r.register(_NodeCollector(readings))

    # -- updates ----------------------------------------------------------------------------------
    def observe_event(self, event: dict[str, Any]) -> None:
        """Count one event a Conversation emitted (cheap; every event of every call passes here)."""
        kind = event.get("type")
        if kind == "metrics":
            for stage in STAGES:
                value = event.get(stage)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.stage_seconds.labels(stage=stage).observe(value / 1000.0)
        elif kind == "end_of_response":
            self.turns.labels(interrupted="true" if event.get("interrupted") else "false").inc()
            underruns = event.get("underruns")
            if isinstance(underruns, int) and underruns > 0:
                self.underruns.inc(underruns)
        elif kind == "error" and "turn_id" in event:
            # An error inside a turn is an engine's (or the server's) failure; errors outside one
            # answer a client's bad request (unknown thread, refused setting) and are no fault here.
            code = str(event.get("code") or "unknown")[:MAX_CODE_CHARS]
            self.engine_errors.labels(code=code).inc()

    def call_started(self, transport: str) -> None:
        self.calls_started.labels(transport=transport).inc()

    def call_ended(self, reason: str) -> None:
        self.calls_ended.labels(reason=reason[:MAX_CODE_CHARS]).inc()

    # -- exposition --------------------------------------------------------------------------------
    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (body, content type): Prometheus text, or OpenMetrics if ``accept`` asks."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class _NodeCollector(Collector):
    def __init__(self, readings: Callable[[], NodeReadings]) -> None:
        self._readings = readings
        self._failed = False

    def describe(self) -> list[Metric]:
        # Registering must not read the node: the server registers before the node has started.
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            n = self._readings()
        except Exception:
            # A scrape without these series beats a failed scrape (that would hide the rest too).
            if not self._failed:
                log.exception("metrics: reading the node failed; its gauges are left out")
                self._failed = True
            return
        info = InfoMetricFamily("rtcvoice_node", "This node: its id in the cluster and its version.")
        info.add_metric([], {"node": n.node_id, "version": n.version})
        yield info
        yield GaugeMetricFamily("rtcvoice_active_calls", "Calls on this node now.", value=n.calls)
        yield GaugeMetricFamily(
            "rtcvoice_max_calls", "Calls this node takes at most (max_sessions).", value=n.max_calls
        )
        yield GaugeMetricFamily(
            "rtcvoice_node_serving",
            "1 while the node takes new calls, 0 while it drains.",
            value=1.0 if n.serving else 0.0,
        )
        yield GaugeMetricFamily(
            "rtcvoice_node_load",
            "CPU busy fraction of the CPUs this node may use (what placement reads).",
            value=n.load,
        )
        yield GaugeMetricFamily(
            "rtcvoice_registry_ok",
            "1 while the cluster registry answers (always 1 alone).",
            value=1.0 if n.registry_ok else 0.0,
        )
        yield CounterMetricFamily(
            "rtcvoice_late_frames",
            "Outbound 20 ms audio frames sent after their slot (a gap heard).",
            value=n.late_frames,
        )
