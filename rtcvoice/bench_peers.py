"""``rtcvoice bench --peer NAME=URL``: one caller for rtcvoice, pipecat and fastrtc, side by side.

Every stack is dialed through its own signaling by the same aiortc caller (the paced microphone,
the 60 ms jitter buffer with loss concealment and the recording of
:class:`~rtcvoice.client.VoiceCallClient`), which speaks the same utterances into each and times
only what it hears: voice-to-voice from the last speech sample sent to the first audible sample
of the reply, a reply being over once the call has been quiet for ``--peer-quiet-s``. No stack's
own events are read, so the figure means the same thing for all of them.

* ``rtcvoice``: ``POST /api/v1/voice/session/start``, then the offer to its ``offer_url``;
* ``pipecat``: ``POST /api/offer`` (``SmallWebRTCRequestHandler``), ``{sdp, type}``;
* ``fastrtc``: ``POST /webrtc/offer`` with a ``webrtc_id`` (``Stream.mount``).

The stack is the start of NAME (``pipecat-tuned=http://...``). ``URL@PID`` names the server's
process, whose CPU time (``/proc``) gives CPU seconds per call-second. Rounds
(``--peer-rounds``) interleave the stacks, so a busier minute of a shared machine falls on all of
them. With ``--concurrency 1,2,4`` each level runs N calls at once; the capacity is the largest N
whose p95 stays within 1.5x the one-call p95 with no failed turn (a turn fails when no reply is
heard within ``--peer-reply-timeout-s``, or a call fails to connect).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from aiortc import RTCSessionDescription

from .audio import Int16Audio, rms_dbfs
from .bench import CALLER_JITTER_FRAMES, CAPACITY_FACTOR, read_questions
from .client import SPEECH_DBFS, CallError, VoiceCallClient
from .transports.ice import rtc_configuration

KINDS = ("rtcvoice", "pipecat", "fastrtc")


@dataclass(frozen=True)
class Target:
    name: str
    kind: str
    url: str
    pid: int | None = None


def parse_target(spec: str) -> Target:
    """``NAME=URL`` or ``NAME=URL@PID``; the stack is the kind NAME starts with."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"--peer {spec!r}: write NAME=URL, e.g. pipecat=http://10.0.0.5:7860")
    kind = next((k for k in KINDS if name.startswith(k)), None)
    if kind is None:
        raise ValueError(f"--peer {spec!r}: NAME must start with one of {', '.join(KINDS)}")
    url, at, pid = rest.rpartition("@") if "@" in rest.rsplit("/", 1)[-1] else (rest, "", "")
    if at and not pid.isdigit():
        raise ValueError(f"--peer {spec!r}: the part after @ must be the server's process id")
    return Target(name, kind, url.rstrip("/"), int(pid) if at else None)


class PeerCall(VoiceCallClient):
    """The bench's caller, dialing a stack through that stack's own signaling."""

    def __init__(self, target: Target) -> None:
        super().__init__(target.url, jitter_frames=CALLER_JITTER_FRAMES)
        self.target = target
        self._heard_from = 0  # received chunks already known to be before the current turn

    async def connect(self, *, session: dict[str, Any] | None = None, timeout: float = 20.0) -> None:
        if self.target.kind == "rtcvoice":
            await super().connect(session=session, timeout=timeout)
            return
        import aiohttp

        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        # pipecat's client opens a data channel for its RTVI messages; fastrtc's docs say it needs one.
        pc, failed = self._peer(rtc_configuration([]), "text" if self.target.kind == "fastrtc" else "pipecat")
        await pc.setLocalDescription(await pc.createOffer())
        body: dict[str, Any] = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
        path = "/api/offer"
        if self.target.kind == "fastrtc":
            path = "/webrtc/offer"
            body["webrtc_id"] = uuid.uuid4().hex[:10]
        async with self._http.post(self.server + path, json=body) as resp:
            answer = await resp.json(content_type=None)
            if resp.status >= 400 or answer.get("status") == "failed" or "sdp" not in answer:
                raise CallError(f"{self.target.name}: {path}: HTTP {resp.status}: {str(answer)[:200]}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await self._wait_connected(failed, timeout)

    def loud_after(self, t: float) -> float | None:
        """Arrival time of the first audible chunk at or after ``t`` (scanning only new chunks)."""
        chunks, times = self.received.chunks, self.received.times
        i = self._heard_from
        while i < len(times) and times[i] < t:
            i += 1
        self._heard_from = i
        for j in range(i, len(times)):
            if rms_dbfs(chunks[j]) > SPEECH_DBFS:
                return times[j]
        return None

    def last_loud(self) -> float | None:
        chunks, times = self.received.chunks, self.received.times
        for j in range(len(times) - 1, max(self._heard_from, len(times) - 400) - 1, -1):
            if rms_dbfs(chunks[j]) > SPEECH_DBFS:
                return times[j]
        return None


@dataclass
class PeerTurn:
    target: str
    concurrency: int
    round: int
    call: int
    utterance: str
    voice_to_voice_ms: float | None  # None: no reply heard in time (a failed turn)
    reply_s: float | None = None  # how long the reply was heard for
    # Reply audio was heard while the caller was still speaking: the stack took a pause inside
    # the utterance for its end and answered part of it (a cut-off).
    cut_off: bool = False


async def speak(
    call: PeerCall, pcm: Int16Audio, rate: int, *, reply_timeout: float, quiet_s: float
) -> tuple[float | None, float | None, bool]:
    """Play one utterance and wait for the reply to start and end: (voice-to-voice ms, reply s,
    whether reply audio came while the utterance was still being spoken)."""
    before = len(call.speech_ends)
    # Past the first frames: the caller waited for the last reply to go quiet before speaking.
    started = time.monotonic() + 0.2
    call.play(pcm, rate)
    await call.wait_played(timeout=60 + len(pcm) / rate)
    for _ in range(100):  # the mark lands just after the mic sent it
        if len(call.speech_ends) > before:
            break
        await asyncio.sleep(0.01)
    if len(call.speech_ends) <= before:
        raise CallError("the utterance has no speech louder than the caller's threshold")
    spoke = call.speech_ends[before]
    early = call.loud_after(started)
    cut_off = early is not None and early < spoke
    heard = None
    while time.monotonic() < spoke + reply_timeout:
        heard = call.loud_after(spoke)
        if heard is not None:
            break
        await asyncio.sleep(0.05)
    if heard is None:
        return None, None, cut_off
    while True:  # until quiet for quiet_s (or a reply longer than a minute)
        await asyncio.sleep(0.1)
        last = call.last_loud() or heard
        if time.monotonic() - last >= quiet_s or time.monotonic() - heard > 60:
            return round((heard - spoke) * 1000.0, 1), round(last - heard, 2), cut_off


async def one_call(
    target: Target,
    utterances: list[tuple[str, Int16Audio, int]],
    *,
    concurrency: int,
    round_: int,
    index: int,
    reply_timeout: float,
    quiet_s: float,
) -> list[PeerTurn]:
    await asyncio.sleep((index * 0.37) % 2.0)  # staggered starts, as in bench.py
    call = PeerCall(target)
    turns: list[PeerTurn] = []
    try:
        await call.connect()
        await asyncio.sleep(1.0)  # the bots set their pipelines up once the peer connects
        for text, pcm, rate in utterances:
            v2v, reply_s, cut = await speak(call, pcm, rate, reply_timeout=reply_timeout, quiet_s=quiet_s)
            turns.append(PeerTurn(target.name, concurrency, round_, index, text, v2v, reply_s, cut))
            await asyncio.sleep(0.5)
    finally:
        await call.close()
    return turns


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads), from /proc."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class PeerLevel:
    target: str
    concurrency: int
    turns: list[PeerTurn] = field(default_factory=list)
    failed_calls: int = 0
    cpu_s: float = 0.0  # the server's CPU over the level's calls, all rounds
    call_s: float = 0.0  # call-seconds: calls x wall time, all rounds
    measured_cpu: bool = False
    caller_cpu: float = 0.0  # the busiest the caller (this process) was, in CPUs
    skipped: bool = False  # not run: a lower level was already over the budget

    def v2v(self) -> list[float]:
        return [t.voice_to_voice_ms for t in self.turns if t.voice_to_voice_ms is not None]

    def pct(self, q: float) -> float | None:
        vals = self.v2v()
        return round(float(np.percentile(vals, q)), 1) if vals else None

    @property
    def failed_turns(self) -> int:
        return sum(1 for t in self.turns if t.voice_to_voice_ms is None)

    @property
    def cut_offs(self) -> int:
        return sum(1 for t in self.turns if t.cut_off)

    @property
    def cpu_per_call_s(self) -> float | None:
        """Server CPU seconds per second of one call."""
        return round(self.cpu_s / self.call_s, 3) if self.measured_cpu and self.call_s else None


async def run_level(
    target: Target,
    utterances: list[tuple[str, Int16Audio, int]],
    level: PeerLevel,
    *,
    round_: int,
    reply_timeout: float,
    quiet_s: float,
) -> None:
    n = level.concurrency
    cpu0 = cpu_seconds(target.pid)
    caller0 = time.process_time()
    started = time.monotonic()
    results = await asyncio.gather(
        *(
            one_call(
                target,
                utterances,
                concurrency=n,
                round_=round_,
                index=i,
                reply_timeout=reply_timeout,
                quiet_s=quiet_s,
            )
            for i in range(n)
        ),
        return_exceptions=True,
    )
    wall = time.monotonic() - started
    cpu1 = cpu_seconds(target.pid)
    level.caller_cpu = max(level.caller_cpu, round((time.process_time() - caller0) / wall, 2))
    for r in results:
        if isinstance(r, BaseException):
            level.failed_calls += 1
            print(f"bench: {target.name}: a call failed at concurrency {n}: {r!r}", file=sys.stderr)
        else:
            level.turns.extend(r)
    if cpu0 is not None and cpu1 is not None:
        level.measured_cpu = True
        level.cpu_s += cpu1 - cpu0
        level.call_s += n * wall


def within_budget(level: PeerLevel, base: PeerLevel) -> bool:
    """p95 within 1.5x the one-call p95, and nothing failed."""
    p95, one = level.pct(95), base.pct(95)
    return (
        one is not None
        and p95 is not None
        and p95 <= CAPACITY_FACTOR * one
        and not level.failed_turns
        and not level.failed_calls
    )


def capacity(levels: list[PeerLevel]) -> int:
    """Largest N such that every level up to N stays within the budget."""
    ordered = sorted((lv for lv in levels if not lv.skipped), key=lambda lv: lv.concurrency)
    best = 0
    for level in ordered:
        if not within_budget(level, ordered[0]):
            break
        best = level.concurrency
    return best


def ratios(levels: dict[str, dict[int, PeerLevel]]) -> list[dict[str, Any]]:
    """rtcvoice / each peer, for p50 and p95 at one call: under 1 means rtcvoice answers sooner."""
    ours = [name for name in levels if name.startswith("rtcvoice")]
    rows = []
    for mine in ours:
        for name, by_n in levels.items():
            if name.startswith("rtcvoice") or 1 not in by_n or 1 not in levels[mine]:
                continue
            row: dict[str, Any] = {"rtcvoice": mine, "peer": name}
            for q in (50, 95):
                a, b = levels[mine][1].pct(q), by_n[1].pct(q)
                row[f"p{q}"] = round(a / b, 2) if a and b else None
            rows.append(row)
    return rows


def report_text(levels: dict[str, dict[int, PeerLevel]], caps: dict[str, int], cpus: float | None) -> str:
    lines = [
        "| stack | calls | turns | failed | cut off | p50 ms | p95 ms | server CPU s per call-s | caller CPUs | capacity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_n in levels.items():
        for n, lv in sorted(by_n.items()):
            if lv.skipped:
                continue
            cap = f"{caps[name]}" + (f" ({caps[name] / cpus:.1f}/core)" if cpus else "") if n == 1 else ""
            lines.append(
                f"| {name} | {n} | {len(lv.turns)} | {lv.failed_turns + lv.failed_calls} | {lv.cut_offs} | "
                f"{_fmt(lv.pct(50))} | {_fmt(lv.pct(95))} | {_fmt(lv.cpu_per_call_s)} | {lv.caller_cpu:g} | {cap} |"
            )
    rows = ratios(levels)
    if rows:
        lines += ["", "| rtcvoice / peer | p50 | p95 |", "|---|---|---|"]
        lines += [f"| {r['rtcvoice']} / {r['peer']} | {_fmt(r['p50'])} | {_fmt(r['p95'])} |" for r in rows]
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


async def run_peers(args: argparse.Namespace) -> int:
    from .bench import _write_text, synthesize_questions

    try:
        targets = [parse_target(spec) for spec in args.peer]
    except ValueError as exc:
        raise SystemExit(f"rtcvoice bench: {exc}") from None
    texts = await read_questions(args)
    utterances = await asyncio.to_thread(synthesize_questions, texts)
    counts = sorted({int(n) for n in str(args.concurrency).split(",") if n.strip()})
    levels: dict[str, dict[int, PeerLevel]] = {
        t.name: {n: PeerLevel(t.name, n) for n in counts} for t in targets
    }
    rounds = max(1, args.peer_rounds)
    for round_ in range(1, rounds + 1):
        for n in counts:
            # The order turns each round: no stack always goes first (or right after another).
            order = targets[round_ - 1 :] + targets[: round_ - 1]
            for target in order:
                level = levels[target.name][n]
                lower = [lv for m, lv in levels[target.name].items() if m < n]
                if lower and any(lv.skipped or not within_budget(lv, lower[0]) for lv in lower):
                    level.skipped = True  # past this stack's knee: more calls only take longer
                    continue
                await run_level(
                    target,
                    utterances,
                    level,
                    round_=round_,
                    reply_timeout=args.peer_reply_timeout_s,
                    quiet_s=args.peer_quiet_s,
                )
                print(
                    f"round {round_}/{rounds} {target.name} x{n}: p50 {_fmt(level.pct(50))} ms, "
                    f"p95 {_fmt(level.pct(95))} ms, failed {level.failed_turns + level.failed_calls} "
                    f"(so far); caller busy {level.caller_cpu} CPU",
                    flush=True,
                )
    caps = {name: capacity(list(by_n.values())) for name, by_n in levels.items()}
    print(report_text(levels, caps, args.peer_server_cpus))
    result = {
        "targets": [asdict(t) for t in targets],
        "utterances": texts,
        "rounds": rounds,
        "server_cpus": args.peer_server_cpus,
        "capacity_rule": f"largest N with p95 <= {CAPACITY_FACTOR}x the one-call p95 and no failed turn",
        "levels": [
            {
                "target": lv.target,
                "concurrency": lv.concurrency,
                "turns": len(lv.turns),
                "failed_turns": lv.failed_turns,
                "failed_calls": lv.failed_calls,
                "cut_offs": lv.cut_offs,
                "p50_ms": lv.pct(50),
                "p95_ms": lv.pct(95),
                "round_p50_ms": [
                    round(float(np.median(v)), 1)
                    for r in range(1, rounds + 1)
                    if (
                        v := [
                            t.voice_to_voice_ms
                            for t in lv.turns
                            if t.round == r and t.voice_to_voice_ms is not None
                        ]
                    )
                ],
                "server_cpu_s_per_call_s": lv.cpu_per_call_s,
                "server_cpu_s": round(lv.cpu_s, 2),
                "call_s": round(lv.call_s, 1),
                "caller_cpus": lv.caller_cpu,
                "skipped": lv.skipped,
                "per_turn": [asdict(t) for t in lv.turns],
            }
            for by_n in levels.values()
            for lv in by_n.values()
        ],
        "capacity": caps,
        "ratios": ratios(levels),
    }
    if args.json_path == "-":
        print(json.dumps(result, indent=1))
    elif args.json_path:
        await asyncio.to_thread(_write_text, args.json_path, json.dumps(result, indent=1))
    # Failed turns are a finding about a stack; a stack that never answered is a run that measured
    # nothing (not reachable, not set up): that is an error.
    silent = [name for name, by_n in levels.items() if not any(lv.v2v() for lv in by_n.values())]
    for name in silent:
        print(f"rtcvoice bench: {name} answered no turn", file=sys.stderr)
    return 1 if silent else 0
