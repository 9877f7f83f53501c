"""``rtcvoice bench``: voice-to-voice latency and capacity, from real headless WebRTC calls.

Each call is a real aiortc peer (:class:`~rtcvoice.client.VoiceCallClient`) speaking questions
synthesized by hibari. Per turn it records the server's ``metrics`` event and what the caller
experienced: voice-to-voice from the last speech sample sent to the first audible sample
received. The difference between the client's and the server's voice-to-voice is the transport
(network, jitter buffers, codec, the VAD's own lag); what the server spends outside STT, LLM and
TTS and the end-of-turn wait is its overhead.

With ``--concurrency 1,2,4`` the same questions run on N simultaneous calls per level; the
capacity is the largest N whose p95 voice-to-voice stays within 1.5x the single-call p95 with no
audio underruns (late frames on the paced track, or gaps inside a reply).

With ``--nodes 1,2,3`` (and ``--workers 1,2``) each configuration gets servers of its own and a
sweep of its own, each node held to ``--node-cpus`` and the caller to ``--caller-cpus``
(bench_nodes.py, bench_cpu.py); the summary gives the capacity ratios between them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .audio import Int16Audio, float_to_int16
from .bench_cpu import PERIOD_US, CpuGroup, CpuShares
from .bench_nodes import (
    CALLER_LIMIT,
    CallerUse,
    Cluster,
    NodeUse,
    Probe,
    Sampler,
    caller_use,
    node_use,
    pop_workers,
    start_cluster,
    summarize,
    summary_text,
)
from .client import QUIET_S, VoiceCallClient

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Can you recommend a good book?",
    "What time is it in Tokyo?",
    "Tell me a fun fact about the moon.",
    "How do I boil an egg?",
    "Is it going to rain tomorrow?",
    "What is two plus two?",
]
SERVER_STAGES = (
    "end_of_turn",
    "stt",
    "llm_first_token",
    "llm_first_sentence",
    "tts_first_audio",
    "compute_after_turn_end",
    "server_overhead",
    "voice_to_voice",
)
COLUMNS = (*SERVER_STAGES, "transport", "client_voice_to_voice")
# What follows each other between the end of speech and the first reply audio heard: STT, LLM
# and TTS overlap the silence when the turn was answered speculatively, so the plot stacks the
# silence, the compute left after it, the server's overhead and the transport.
SEQUENCE = ("end_of_turn_silence", "compute_after_turn_end", "server_overhead", "transport")
CAPACITY_FACTOR = 1.5
# The caller's jitter buffer, in 20 ms frames. aiortc holds 4 (80 ms); Chrome held 58 ms on
# average in the project's browser test on the same machine (tests/test_browser.py writes it
# to artifacts/browser/latency.json), so the bench's caller holds 3, as a browser would.
CALLER_JITTER_FRAMES = 3
# The caller's breath after a reply's last event before the next question (and the reply's last
# audio frames, in flight behind its end_of_response).
ANSWERED_QUIET_S = 0.3


@dataclass
class Turn:
    concurrency: int
    call: int
    question: str
    transcript: str = ""
    reply: str = ""
    underruns: int = 0
    ms: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Level:
    concurrency: int
    turns: list[Turn]
    wall_s: float
    cpu_s_per_call: float | None
    rss_mb: float | None
    late_frames: int
    failed_calls: int = 0
    nodes: list[NodeUse] = field(default_factory=list)  # what each node did (read from its status)
    caller: CallerUse | None = None  # the bench's own CPU, against its share

    def values(self, column: str) -> list[float]:
        return [v for t in self.turns if (v := t.ms.get(column)) is not None]

    def pct(self, column: str, q: float) -> float | None:
        vals = self.values(column)
        return round(float(np.percentile(vals, q)), 1) if vals else None

    @property
    def underruns(self) -> int:
        return self.late_frames + sum(t.underruns for t in self.turns)


def synthesize_questions(texts: list[str]) -> list[tuple[str, Int16Audio, int]]:
    from hibari import Hibari

    tts = Hibari()
    out = []
    for text in texts:
        audio = tts(text, seed=1)
        pad = np.zeros(int(0.3 * tts.sample_rate), np.float32)
        out.append((text, float_to_int16(np.concatenate([pad, audio, pad])), tts.sample_rate))
    return out


async def run_call(
    server: str, questions: list[tuple[str, Int16Audio, int]], *, concurrency: int, index: int, delay: float
) -> list[Turn]:
    await asyncio.sleep(delay)  # staggered starts: callers do not speak in lockstep
    client = VoiceCallClient(server, jitter_frames=CALLER_JITTER_FRAMES)
    turns: list[Turn] = []
    try:
        await client.connect()
        await ask(client, questions, turns, concurrency=concurrency, index=index, timeout=180)
    finally:
        await client.close()
    return turns


async def ask(
    client: VoiceCallClient,
    questions: list[tuple[str, Int16Audio, int]],
    turns: list[Turn],
    *,
    concurrency: int,
    index: int,
    timeout: float,
) -> None:
    """Speak each question on a connected call and add its turn to ``turns`` once answered
    (TimeoutError if one is not answered within ``timeout``: ``turns`` holds those that were)."""
    for n, (text, pcm, rate) in enumerate(questions, start=1):
        end = await ask_one(client, pcm, rate, timeout, quiet_s=ANSWERED_QUIET_S)
        turns.append(_turn_from(client, n, text, end, concurrency, index))


async def ask_one(
    client: VoiceCallClient, pcm: Int16Audio, rate: int, timeout: float, *, quiet_s: float = QUIET_S
) -> dict[str, Any]:
    """Speak one question and return its answer: the last reply since it was asked that played to
    its end (the last end_of_response there if every one was interrupted).

    Answered once every turn the server opened has ended and ``quiet_s`` passed, not at the next
    end_of_response: a turn ended at a pause inside the question ("Thank you. | Can you sum up
    ...") has its reply interrupted by the rest, and the reply to the whole question comes after.
    """
    asked = len(client.events)
    client.play(pcm, rate)
    await client.wait_played(timeout)
    await client.wait_answered(timeout, quiet_s=quiet_s)
    ends = [e for _t, e in client.events[asked:] if e.get("type") == "end_of_response"]
    if not ends:
        raise TimeoutError("the call settled without a reply")
    return next((e for e in reversed(ends) if not e.get("interrupted")), ends[-1])


def _turn_from(
    client: VoiceCallClient, n: int, text: str, end: dict[str, Any], concurrency: int, index: int
) -> Turn:
    turn_id = end.get("turn_id")
    metrics = next((e for e in client.of_type("metrics") if e.get("turn_id") == turn_id), {})
    final = next((e for e in client.of_type("final_transcript") if e.get("turn_id") == turn_id), {})
    ms: dict[str, float | None] = {k: metrics.get(k) for k in SERVER_STAGES}
    client_v2v = None
    if len(client.speech_ends) >= n:
        spoke = client.speech_ends[n - 1]
        heard = client.received.first_sound_after(spoke)
        if heard is not None:
            client_v2v = round((heard - spoke) * 1000.0, 1)
    ms["client_voice_to_voice"] = client_v2v
    server_v2v = ms.get("voice_to_voice")
    if client_v2v is not None and server_v2v is not None:
        ms["transport"] = round(client_v2v - server_v2v, 1)
    parts = [server_v2v, ms.get("compute_after_turn_end"), ms.get("server_overhead")]
    if all(p is not None for p in parts):
        v2v, compute, overhead = (float(p or 0.0) for p in parts)
        ms["end_of_turn_silence"] = round(v2v - compute - overhead, 1)
    return Turn(
        concurrency=concurrency,
        call=index,
        question=text,
        transcript=str(final.get("text", "")),
        reply=str(end.get("text", ""))[:120],
        underruns=int(end.get("underruns", 0)),
        ms=ms,
    )


def _status(server: str) -> dict[str, Any]:
    with urllib.request.urlopen(server + "/api/v1/voice/status", timeout=10) as resp:
        data: dict[str, Any] = json.load(resp)
        return data


async def run_level(
    server: str,
    questions: list[tuple[str, Int16Audio, int]],
    concurrency: int,
    *,
    probes: list[Probe] | None = None,
    caller_group: CpuGroup | None = None,
    caller_cpus: float | None = None,
) -> Level:
    """N calls through ``server``; every node in ``probes`` (default: that server) is read meanwhile."""
    async with Sampler(probes or [Probe(server, None, None)], caller_group) as sampler:
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                run_call(server, questions, concurrency=concurrency, index=i, delay=(i * 0.37) % 2.0)
                for i in range(concurrency)
            ),
            return_exceptions=True,
        )
        wall = time.monotonic() - started
    turns = [t for r in results if isinstance(r, list) for t in r]
    failed = [r for r in results if isinstance(r, BaseException)]
    for exc in failed:
        print(f"bench: a call failed at concurrency {concurrency}: {exc!r}", file=sys.stderr)
    nodes = node_use(sampler, concurrency)
    machine = float(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else 1.0
    return Level(
        concurrency=concurrency,
        turns=turns,
        wall_s=round(wall, 1),
        cpu_s_per_call=round(sum(n.cpu_s for n in nodes) / concurrency, 2) if nodes else None,
        rss_mb=round(sum(n.rss_mb for n in nodes), 1) if nodes else None,
        late_frames=sum(n.late_frames for n in nodes),
        failed_calls=len(failed),
        nodes=nodes,
        caller=caller_use(sampler, concurrency, caller_cpus or machine),
    )


def capacity(levels: list[Level]) -> int:
    """Largest N such that every tested level up to N stays within the latency budget, gap-free."""
    if not levels:
        return 0
    base = levels[0].pct("client_voice_to_voice", 95) or levels[0].pct("voice_to_voice", 95)
    best = 0
    for level in sorted(levels, key=lambda lv: lv.concurrency):
        p95 = level.pct("client_voice_to_voice", 95) or level.pct("voice_to_voice", 95)
        ok = (
            base is not None
            and p95 is not None
            and p95 <= CAPACITY_FACTOR * base
            and level.underruns == 0
            and level.failed_calls == 0
        )
        if not ok:
            break
        best = level.concurrency
    return best


def knee(levels: list[Level]) -> Level | None:
    """The first level over the latency budget (or with gaps), where capacity ends; None if none was."""
    ordered = sorted(levels, key=lambda lv: lv.concurrency)
    cap = capacity(ordered)
    return next((lv for lv in ordered if lv.concurrency > cap), None)


def validity(levels: list[Level]) -> tuple[bool, str]:
    """A run is valid when the caller kept up at every level up to the knee (scale.md §4.3)."""
    last = knee(levels)
    limit = last.concurrency if last is not None else max((lv.concurrency for lv in levels), default=0)
    starved = [
        lv for lv in levels if lv.concurrency <= limit and lv.caller is not None and not lv.caller.valid
    ]
    if starved:
        worst = max(starved, key=lambda lv: lv.caller.busy_of_share or 0.0 if lv.caller else 0.0)
        use = worst.caller.busy_of_share if worst.caller else None
        return False, (
            f"invalid: the caller used {use:.0%} of its share at {worst.concurrency} calls "
            f"(limit {CALLER_LIMIT:.0%}): the figure may be about the caller, not the server"
        )
    return True, f"valid: the caller stayed under {CALLER_LIMIT:.0%} of its share up to the knee"


def table(levels: list[Level]) -> str:
    lines = []
    head = f"{'N':>3} {'stage':<22}{'p50 ms':>10}{'p95 ms':>10}"
    for level in levels:
        lines.append(
            f"concurrency {level.concurrency}: {len(level.turns)} turns, {level.failed_calls} failed calls, "
            f"{level.wall_s} s, server CPU {level.cpu_s_per_call} s/call, RSS {level.rss_mb} MB, "
            f"underruns {level.underruns} (late frames {level.late_frames})"
        )
        lines.append(head)
        for column in COLUMNS:
            lines.append(
                f"{level.concurrency:>3} {column:<22}{_fmt(level.pct(column, 50)):>10}{_fmt(level.pct(column, 95)):>10}"
            )
        lines.extend(_use_lines(level))
    return "\n".join(lines)


def _use_lines(level: Level) -> list[str]:
    lines = []
    for n in level.nodes:
        share = f" = {_pct(n.busy_of_share)} of {n.cpus:g}" if n.cpus else ""
        throttled = f", throttled in {_pct(n.throttled)} of periods" if n.throttled is not None else ""
        lines.append(
            f"    node {n.node}: peak {n.calls_peak} calls, {n.call_s} call-s, {n.cpu_s_per_call_s} CPU-s per "
            f"call-s, busy {n.busy_cpus} CPU{share}{throttled}, late frames {n.late_frames}"
        )
    c = level.caller
    if c is not None:
        throttled = f", throttled in {_pct(c.throttled)} of periods" if c.throttled is not None else ""
        lines.append(
            f"    caller: busy {c.busy_cpus} CPU = {_pct(c.busy_of_share)} of {c.cpus:g}{throttled}, its loop "
            f"waited for a core {_pct(c.loop_wait)} of the time: {'ok' if c.valid else 'STARVED'}"
        )
    return lines


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def report(levels: list[Level], settings: dict[str, Any]) -> dict[str, Any]:
    valid, why = validity(levels)
    last = knee(levels)
    return {
        "settings": settings,
        "capacity": capacity(levels),
        "capacity_rule": f"p95 voice-to-voice within {CAPACITY_FACTOR}x the single-call p95, no underruns",
        "knee": last.concurrency if last is not None else None,
        "valid": valid,
        "validity": why,
        "levels": [
            {
                "concurrency": lv.concurrency,
                "turns": len(lv.turns),
                "failed_calls": lv.failed_calls,
                "wall_s": lv.wall_s,
                "server_cpu_s_per_call": lv.cpu_s_per_call,
                "server_rss_mb": lv.rss_mb,
                "late_frames": lv.late_frames,
                "underruns": lv.underruns,
                "p50_ms": {c: lv.pct(c, 50) for c in COLUMNS},
                "p95_ms": {c: lv.pct(c, 95) for c in COLUMNS},
                "nodes": [asdict(n) for n in lv.nodes],
                "caller": asdict(lv.caller) if lv.caller is not None else None,
                "per_turn": [asdict(t) for t in lv.turns],
            }
            for lv in levels
        ],
    }


def plot(level: Level, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [t for t in level.turns if all(t.ms.get(k) is not None for k in SEQUENCE)]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.5 * len(turns) + 5), 4.5))
    x = np.arange(len(turns))
    bottom = np.zeros(len(turns))
    for stage in SEQUENCE:
        vals = np.array([max(0.0, float(t.ms[stage] or 0.0)) for t in turns])
        ax.bar(x, vals, bottom=bottom, label=stage)
        bottom += vals
    for q, style in ((50, "--"), (95, ":")):
        v = level.pct("client_voice_to_voice", q)
        if v is not None:
            ax.axhline(
                v, color="black", linestyle=style, linewidth=1, label=f"p{q} voice-to-voice {v:.0f} ms"
            )
    ax.set_xticks(x, [f"{t.call}:{t.question[:14]}" for t in turns], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ms from the end of the caller's speech")
    ax.set_title(f"rtcvoice voice-to-voice by stage (concurrency {level.concurrency})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


async def read_questions(args: argparse.Namespace) -> list[str]:
    """The lines of ``--questions`` (blank ones skipped), or the 8 built-in questions."""
    if not args.questions:
        return list(QUESTIONS)
    lines = (await asyncio.to_thread(_read_text, args.questions)).splitlines()
    return [q.strip() for q in lines if q.strip()]


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="benchmark this running server instead of starting one")
    p.add_argument("--runs", type=int, default=1, help="times each call speaks the question set")
    p.add_argument("--questions", help="a text file with one question per line (default: 8 built in)")
    p.add_argument(
        "--concurrency", default="1", help="simultaneous calls; a list sweeps levels, e.g. 1,2,4,8"
    )
    p.add_argument(
        "--instant", action="store_true", help="self-started server with the echo agent and tone TTS"
    )
    p.add_argument("--json", dest="json_path", help="write the full report as JSON here ('-' for stdout)")
    p.add_argument("--plot", help="write a PNG of the per-stage split per turn (first level) here")
    p.add_argument(
        "--serve-arg", action="append", default=[], help="extra flag for the self-started server (repeatable)"
    )
    p.add_argument(
        "--nodes",
        default="1",
        help="rtcvoice serve processes sharing a file:// registry and one SQLite file; every call enters "
        "through the first. A list (1,2,3) sweeps each in turn and reports the capacity ratios",
    )
    p.add_argument(
        "--workers",
        help="serve --workers for each node; a list (1,2) compares them (default: a --serve-arg "
        "--workers, else 1)",
    )
    p.add_argument(
        "--node-cpus",
        type=float,
        help="CPU share of each node (0.4): a cgroup quota as root, else whole cores by affinity, else none",
    )
    p.add_argument(
        "--caller-cpus",
        type=float,
        help="CPU share of the caller (this process, whose aiortc peers are the calls); default: unlimited, "
        "counted against what the nodes leave of the machine",
    )
    p.add_argument(
        "--cpu-period-ms",
        type=float,
        default=PERIOD_US / 1000,
        help="cgroup quota period: a share is enforced per period, and a node that spends its quota early "
        "stalls until the next one",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="run each configuration this many times, interleaved (medians)"
    )
    p.add_argument(
        "--until-knee", action="store_true", help="end a sweep at the first level over the latency budget"
    )
    p.add_argument(
        "--summarize",
        nargs="+",
        metavar="JSON",
        help="only print the capacity table and ratios of these reports (from --json), then exit",
    )
    p.add_argument(
        "--turn-taking",
        action="store_true",
        help="play the turn-taking corpus (pauses inside unfinished sentences, finished statements and "
        "questions, false interruptions) into real calls: cut-off rate, end-of-turn delay, voice-to-voice",
    )
    p.add_argument(
        "--memory",
        type=int,
        metavar="BATCHES",
        help="BATCHES batches of --memory-batch concurrent calls: the server's RSS with the calls up and "
        "after each batch (does it plateau?), and MB per concurrent call",
    )
    p.add_argument(
        "--memory-batch", type=int, default=10, help="calls at once per --memory batch (default 10)"
    )
    p.add_argument(
        "--memory-reply-words",
        type=int,
        default=24,
        help="words each --memory call has the echo agent say back (24: ~3 s of the beep TTS)",
    )
    p.add_argument(
        "--network",
        metavar="LOSS%,...",
        help="the questions over a clean (0) and impaired networks (e.g. 0,3,10 percent UDP loss) in a private "
        "network namespace: words heard, voice-to-voice, audio concealed, side by side (needs root)",
    )
    p.add_argument(
        "--network-delay-ms", type=float, default=30.0, help="one-way delay of an impaired network"
    )
    p.add_argument(
        "--network-jitter-ms",
        type=float,
        default=15.0,
        help="standard deviation of that delay (reorders packets)",
    )
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=URL[@PID]",
        help="dial this stack through its own signaling (NAME starts with rtcvoice, pipecat or fastrtc) "
        "and time only what the caller hears; repeat for a side-by-side run (bench/peers/run starts them all)",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="the CPU one call's parts need alone (Opus, resampling, Silero, SRTP per call-second; Whisper "
        "per turn), on the questions' speech",
    )
    p.add_argument("--peer-rounds", type=int, default=3, help="--peer: rounds, the stacks interleaved")
    p.add_argument(
        "--peer-quiet-s",
        type=float,
        default=1.2,
        help="--peer: a reply is over after this long without sound",
    )
    p.add_argument(
        "--peer-reply-timeout-s",
        type=float,
        default=15.0,
        help="--peer: a turn with no reply heard this long after the speech ended has failed",
    )
    p.add_argument(
        "--peer-server-cpus",
        type=float,
        help="--peer: the CPUs each stack's server was held to (reports capacity per core)",
    )
    p.add_argument(
        "--long-call",
        type=int,
        metavar="TURNS",
        help="one call of TURNS turns with uncapped replies: how the first-token time grows with the history",
    )


def serve_args_of(args: argparse.Namespace) -> list[str]:
    """The ``rtcvoice serve`` arguments a bench starts its server with: ``--serve-arg``s, and the
    echo agent and beep TTS for ``--instant``."""
    serve_args = list(args.serve_arg)
    if args.instant:
        serve_args += ["--agent", "echo", "--tts", "tone"]
    return serve_args


def _counts(raw: str, flag: str) -> list[int]:
    try:
        counts = [int(n) for n in raw.split(",") if n.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"rtcvoice bench: {flag} {raw!r} must be numbers of 1 or more, e.g. 1,2,3")
    return list(dict.fromkeys(counts))


async def run(args: argparse.Namespace) -> int:
    if args.summarize:
        reports = [json.loads(await asyncio.to_thread(_read_text, path)) for path in args.summarize]
        print(summary_text(summarize([r for rep in reports for r in rep.get("runs", [rep])])))
        return 0
    if args.turn_taking:
        from .bench_turns import run_turn_taking

        return await run_turn_taking(args)
    if args.memory:
        from .bench_memory import run_memory

        return await run_memory(args)
    if args.network:
        from .bench_network import run_network

        return await run_network(args)
    if args.floor:
        from .bench_floor import report as floor_report
        from .bench_floor import text as floor_text

        utterances = await asyncio.to_thread(synthesize_questions, await read_questions(args))
        floor = await asyncio.to_thread(floor_report, utterances)
        print(floor_text(floor))
        if args.json_path:
            await asyncio.to_thread(_write_text, args.json_path, json.dumps(floor, indent=1))
        return 0
    if args.peer:
        from .bench_peers import run_peers

        return await run_peers(args)
    if args.long_call:
        from .bench_long import run_long_call

        return await run_long_call(args)
    texts = await read_questions(args)
    levels_wanted = sorted({int(n) for n in str(args.concurrency).split(",") if n.strip()})
    serve_args, serve_workers = pop_workers(serve_args_of(args))
    nodes = _counts(args.nodes, "--nodes")
    workers = _counts(args.workers, "--workers") if args.workers else [serve_workers or 1]
    configs = [(n, w) for n in nodes for w in workers]
    if args.server and configs != [(1, 1)]:
        raise SystemExit("rtcvoice bench: --nodes and --workers start servers of their own; drop --server")
    # SIGTERM ends the bench like Ctrl-C: the nodes are stopped and the cgroups removed.
    main = asyncio.current_task()
    terminated: list[bool] = []
    if main is not None:

        def on_term() -> None:
            terminated.append(True)
            main.cancel()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
    shares = CpuShares.detect(bool(args.node_cpus or args.caller_cpus), round(args.cpu_period_ms * 1000))
    if args.node_cpus or args.caller_cpus:
        print(f"bench: CPU shares: {shares.method} ({shares.reason})", flush=True)
    try:
        hold = shares.place(os.getpid(), "caller", args.caller_cpus) if args.caller_cpus else None
        questions = (await asyncio.to_thread(synthesize_questions, texts)) * max(1, args.runs)
        runs: list[tuple[dict[str, Any], list[Level]]] = []
        for repeat in range(max(1, args.repeat)):
            for n, w in configs:
                if len(configs) > 1 or args.repeat > 1:
                    print(f"== nodes {n}, workers {w}, repeat {repeat + 1} ==", flush=True)
                runs.append(await _sweep(args, serve_args, questions, levels_wanted, n, w, shares, hold))
    except asyncio.CancelledError:
        if not terminated:
            raise  # Ctrl-C: asyncio.run reports it as KeyboardInterrupt
        print("rtcvoice bench: stopped (SIGTERM); nodes stopped, CPU groups removed", file=sys.stderr)
        return 143
    finally:
        shares.close()
    if len(runs) == 1:
        result = runs[0][0]
    else:
        reports = [r for r, _ in runs]
        result = {
            "capacity_rule": reports[0]["capacity_rule"],
            "runs": reports,
            "summary": summarize(reports),
        }
        print(summary_text(result["summary"]))
    if args.json_path == "-":
        print(json.dumps(result, indent=1))
    elif args.json_path:
        await asyncio.to_thread(_write_text, args.json_path, json.dumps(result, indent=1))
    first = runs[0][1]
    if args.plot and first:
        await asyncio.to_thread(plot, first[0], args.plot)
        print(f"plot: {args.plot}")
    return 0 if all(levels and all(lv.turns for lv in levels) for _, levels in runs) else 1


async def _sweep(
    args: argparse.Namespace,
    serve_args: list[str],
    questions: list[tuple[str, Int16Audio, int]],
    levels_wanted: list[int],
    nodes: int,
    workers: int,
    shares: CpuShares,
    hold: CpuGroup | list[int] | None,
) -> tuple[dict[str, Any], list[Level]]:
    """One configuration: its own servers, a sweep of levels, its report."""
    cluster: Cluster | None = None
    server = args.server
    if not server:
        starting = asyncio.ensure_future(
            asyncio.to_thread(
                start_cluster,
                serve_args,
                nodes=nodes,
                workers=workers,
                node_cpus=args.node_cpus,
                shares=shares,
            )
        )
        try:
            cluster = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Ctrl-C while the nodes load: the thread goes on starting them; stop what it started.
            with contextlib.suppress(BaseException):
                started = await starting
                await asyncio.to_thread(started.stop)
            raise
        server = cluster.entry
    try:
        status = await asyncio.to_thread(_status, server)
        probes = cluster.probes() if cluster is not None else [Probe(server, None, None)]
        held = sum(s.cpus or 0.0 for s in cluster.servers) if cluster is not None else 0.0
        if isinstance(hold, CpuGroup):
            caller_cpus = hold.cpus
        elif isinstance(hold, list):
            caller_cpus = float(len(hold))
        else:  # unlimited: whatever the nodes' shares leave of the machine
            caller_cpus = max(0.1, shares.machine_cpus - held) if held else shares.machine_cpus
        levels: list[Level] = []
        for n in levels_wanted:
            level = await run_level(
                server,
                questions,
                n,
                probes=probes,
                caller_group=hold if isinstance(hold, CpuGroup) else None,
                caller_cpus=caller_cpus,
            )
            levels.append(level)
            print(table([level]), flush=True)
            if args.until_knee and knee(levels) is not None:
                break
        settings = {
            "server": server,
            "engines": status.get("engines"),
            "serve_args": serve_args,
            "nodes": nodes,
            "workers": workers,
            "node_cpus": cluster.servers[0].cpus if cluster is not None else None,
            "caller_cpus": caller_cpus,
            "caller_held": hold is not None,
            "cpu_limit": {
                "method": shares.method,
                "reason": shares.reason,
                "period_ms": shares.period_us / 1000,
            },
        }
        result = report(levels, settings)
        print(
            f"capacity: {result['capacity']} simultaneous calls ({result['capacity_rule']}); {result['validity']}"
        )
        return result, levels
    finally:
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
