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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .audio import Int16Audio, float_to_int16
from .client import VoiceCallClient

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
        for n, (text, pcm, rate) in enumerate(questions, start=1):
            client.play(pcm, rate)
            end = await client.wait_count("end_of_response", n, 180)
            await asyncio.sleep(0.3)
            turns.append(_turn_from(client, n, text, end, concurrency, index))
    finally:
        await client.close()
    return turns


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


async def run_level(server: str, questions: list[tuple[str, Int16Audio, int]], concurrency: int) -> Level:
    before = await asyncio.to_thread(_status, server)
    started = time.monotonic()
    results = await asyncio.gather(
        *(
            run_call(server, questions, concurrency=concurrency, index=i, delay=(i * 0.37) % 2.0)
            for i in range(concurrency)
        ),
        return_exceptions=True,
    )
    wall = time.monotonic() - started
    after = await asyncio.to_thread(_status, server)
    turns = [t for r in results if isinstance(r, list) for t in r]
    failed = [r for r in results if isinstance(r, BaseException)]
    for exc in failed:
        print(f"bench: a call failed at concurrency {concurrency}: {exc!r}", file=sys.stderr)
    return Level(
        concurrency=concurrency,
        turns=turns,
        wall_s=round(wall, 1),
        cpu_s_per_call=_cpu_per_call(before, after, concurrency),
        rss_mb=after.get("process", {}).get("rss_mb"),
        late_frames=int(after.get("late_frames", 0)) - int(before.get("late_frames", 0)),
        failed_calls=len(failed),
    )


def _cpu_per_call(before: dict[str, Any], after: dict[str, Any], calls: int) -> float | None:
    """Server CPU seconds per call, when the server reports its process stats (older ones do not)."""
    if "process" not in before or "process" not in after:
        return None
    return round((float(after["process"]["cpu_s"]) - float(before["process"]["cpu_s"])) / calls, 2)


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
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def report(levels: list[Level], settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "settings": settings,
        "capacity": capacity(levels),
        "capacity_rule": f"p95 voice-to-voice within {CAPACITY_FACTOR}x the single-call p95, no underruns",
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(serve_args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    if not any(a.startswith("--db-path") for a in serve_args):
        # The benchmark's calls are not worth keeping: their threads go to a throwaway database.
        serve_args = [
            *serve_args,
            "--db-path",
            os.path.join(tempfile.mkdtemp(prefix="rtcvoice-bench-"), "bench.db"),
        ]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rtcvoice",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
            *serve_args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=None,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"rtcvoice bench: the server exited with {proc.returncode}")
        try:
            _status(url)
            return proc, url
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("rtcvoice bench: the server did not start within 180 s")


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


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


async def run(args: argparse.Namespace) -> int:
    texts = QUESTIONS
    if args.questions:
        texts = [
            q.strip() for q in (await asyncio.to_thread(_read_text, args.questions)).splitlines() if q.strip()
        ]
    levels_wanted = sorted({int(n) for n in str(args.concurrency).split(",") if n.strip()})
    serve_args = list(args.serve_arg)
    if args.instant:
        serve_args += ["--agent", "echo", "--tts", "tone"]
    proc = None
    server = args.server
    if not server:
        proc, server = await asyncio.to_thread(start_server, serve_args)
    try:
        questions = (await asyncio.to_thread(synthesize_questions, texts)) * max(1, args.runs)
        status = await asyncio.to_thread(_status, server)
        levels = []
        for n in levels_wanted:
            level = await run_level(server, questions, n)
            levels.append(level)
            print(table([level]), flush=True)
        result = report(
            levels, {"server": server, "engines": status.get("engines"), "serve_args": serve_args}
        )
        print(f"capacity: {result['capacity']} simultaneous calls ({result['capacity_rule']})")
        if args.json_path == "-":
            print(json.dumps(result, indent=1))
        elif args.json_path:
            await asyncio.to_thread(_write_text, args.json_path, json.dumps(result, indent=1))
        if args.plot and levels:
            await asyncio.to_thread(plot, levels[0], args.plot)
            print(f"plot: {args.plot}")
        return 0 if levels and all(lv.turns for lv in levels) else 1
    finally:
        if proc is not None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
