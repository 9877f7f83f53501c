"""``rtcvoice bench --long-call TURNS``: one long call with full-length replies, turn by turn.

A call of many turns grows the history the agent reads before every reply. With replies that are
not cut short, that history outgrows the local model's context and its cache of the evaluated
prompt, and a turn that has to read it all again waits seconds for the first token. This bench
makes one real WebRTC call (the same caller as ``rtcvoice bench``) of TURNS spoken turns, each
waiting for the whole reply to be played, and reports per turn how long the history was, how many
prompt tokens the reply read (``end_of_response`` usage), the server's first-token time and the
voice-to-voice times; then p50 and p95 over the turns. ``--repeat N`` makes N such calls in a row
(each a fresh thread) and also gives the median of their p50s and p95s.

Replies are uncapped: the self-started server gets ``--llm-max-tokens`` LONG_REPLY_TOKENS unless a
``--serve-arg`` sets it, far above what SmolLM2 says to a question; a reply that still hits it is
counted in ``capped``.

On a shared machine another process taking a core for a few seconds is enough to make a turn
slow (llama.cpp's threads wait for each other at every layer), so each turn also records how
many cores the rest of the machine used meanwhile (``other_cores``: the machine's busy time less
the server's and the bench's own), and the summary is also given over the quiet turns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .audio import Int16Audio
from .bench import (
    CALLER_JITTER_FRAMES,
    _status,
    _turn_from,
    _write_text,
    ask_one,
    serve_args_of,
    synthesize_questions,
)
from .bench_nodes import one_server
from .client import VoiceCallClient

# Questions that lead on from each other, short factual ones between requests for explanations,
# lists and a story: the replies vary from a sentence to a paragraph, as in a real call.
LONG_CALL_QUESTIONS = [
    "What is the capital of France?",
    "Tell me about the history of Paris.",
    "How many legs does a spider have?",
    "Why do spiders build webs?",
    "Can you recommend a good book for a long flight?",
    "What is that book about?",
    "How do I boil an egg?",
    "And how long should I boil it for a soft yolk?",
    "Tell me a fun fact about the moon.",
    "Why does the moon change shape during the month?",
    "What should I pack for a weekend in the mountains?",
    "How can I stay warm at night in a tent?",
    "Explain how a rainbow forms.",
    "What is the difference between weather and climate?",
    "Can you give me a simple recipe for pancakes?",
    "What can I add to make them taste better?",
    "How do airplanes stay in the air?",
    "Tell me a short story about a brave little cat.",
    "What are some good ways to fall asleep faster?",
    "Thank you. Can you sum up what we talked about?",
]
# Far above a spoken answer from SmolLM2 (tens to a few hundred tokens): replies end when the
# model ends them. local_llama keeps this much of its context free for the reply.
LONG_REPLY_TOKENS = 512
# The slowest full reply is minutes of speech (a few hundred tokens at ~3 words a second).
TURN_TIMEOUT_S = 600.0
# A turn during which the rest of the machine used more than this many cores is not quiet.
QUIET_OTHER_CORES = 0.25
SAMPLE_S = 0.5
STAGES = ("llm_first_token", "voice_to_voice", "client_voice_to_voice")
EXTRA_STAGES = ("end_of_turn", "stt", "llm_first_sentence", "tts_first_audio", "compute_after_turn_end")


@dataclass
class LongTurn:
    turn: int
    question: str
    transcript: str
    reply: str  # its first 120 characters
    history_messages: int  # messages in the thread before this turn's question
    prompt_tokens: int | None  # the prompt this reply read, from end_of_response usage
    reply_tokens: int | None
    error: str | None = None
    other_cores: float | None = None  # the rest of the machine's CPU use from speech end to reply
    ms: dict[str, float | None] = field(default_factory=dict)


class LoadSampler:
    """How busy the rest of the machine is: /proc/stat's busy time less the server's (from its
    status) and this process's. Samples every SAMPLE_S on a thread of its own."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.points: list[tuple[float, float, float, float]] = []  # t, machine, server, own (CPU-s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-load", daemon=True)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @staticmethod
    def _machine_s() -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            machine = self._machine_s()
            if machine is None:
                return
            try:
                server = float(_status(self.server).get("process", {}).get("cpu_s", 0.0))
            except OSError:
                continue
            own = resource.getrusage(resource.RUSAGE_SELF)
            self.points.append((time.monotonic(), machine, server, own.ru_utime + own.ru_stime))

    def other_cores(self, t0: float, t1: float) -> float | None:
        """Cores the rest of the machine used on average between t0 and t1 (monotonic)."""
        inside = [p for p in self.points if t0 - SAMPLE_S <= p[0] <= t1 + SAMPLE_S]
        if len(inside) < 2:
            return None
        (ta, ma, sa, oa), (tb, mb, sb, ob) = inside[0], inside[-1]
        return round(max(0.0, (mb - ma) - (sb - sa) - (ob - oa)) / (tb - ta), 2)


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def summary(turns: list[LongTurn]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for stage in (*STAGES, *EXTRA_STAGES):
        vals = [v for t in turns if (v := t.ms.get(stage)) is not None]
        out[stage] = {"p50": pct(vals, 50), "p95": pct(vals, 95), "max": max(vals) if vals else None}
    return out


async def long_call(
    server: str, questions: list[tuple[str, Int16Audio, int]], max_tokens: int | None, load: LoadSampler
) -> list[LongTurn]:
    """One call speaking every question in turn, each after the previous reply was played out."""
    client = VoiceCallClient(server, jitter_frames=CALLER_JITTER_FRAMES)
    turns: list[LongTurn] = []
    history = 0
    try:
        await client.connect()
        for n, (text, pcm, rate) in enumerate(questions, start=1):
            # Its quiet second (the client's QUIET_S) is the caller's breath before the next one.
            end = await ask_one(client, pcm, rate, TURN_TIMEOUT_S)
            turn = _turn_from(client, n, text, end, 1, 0)
            usage = end.get("usage") or {}
            errors = [e for e in client.of_type("error") if e.get("turn_id") == end.get("turn_id")]
            long_turn = LongTurn(
                turn=n,
                question=text,
                transcript=turn.transcript,
                reply=turn.reply,
                history_messages=history,
                prompt_tokens=usage.get("input_tokens"),
                reply_tokens=usage.get("output_tokens"),
                error="; ".join(str(e.get("message", e.get("code"))) for e in errors) or None,
                ms={k: turn.ms.get(k) for k in (*STAGES, *EXTRA_STAGES)},
            )
            if len(client.speech_ends) >= n:
                spoke = client.speech_ends[n - 1]
                heard = client.received.first_sound_after(spoke) or client.event_time(end)
                long_turn.other_cores = load.other_cores(spoke, heard)
            turns.append(long_turn)
            history += bool(long_turn.transcript) + bool(str(end.get("text", "")).strip())
            print(_row(long_turn, max_tokens), flush=True)
    finally:
        await client.close()
    return turns


def _row(t: LongTurn, max_tokens: int | None) -> str:
    def f(v: float | int | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    capped = " CAPPED" if max_tokens and t.reply_tokens == max_tokens else ""
    error = f"  ERROR {t.error}" if t.error else ""
    other = "-" if t.other_cores is None else f"{t.other_cores:.2f}"
    return (
        f"{t.turn:>4} {t.history_messages:>8} {f(t.prompt_tokens):>8} {f(t.reply_tokens):>7}"
        f" {f(t.ms.get('llm_first_token')):>10} {f(t.ms.get('voice_to_voice')):>8}"
        f" {f(t.ms.get('client_voice_to_voice')):>8} {other:>6}  {t.question[:40]}{capped}{error}"
    )


HEADER = (
    f"{'turn':>4} {'history':>8} {'prompt':>8} {'reply':>7} {'first_tok':>10} {'v2v':>8} {'client':>8}"
    f" {'other':>6}"
)


def _max_tokens(serve_args: list[str]) -> int | None:
    for i, arg in enumerate(serve_args):
        if arg == "--llm-max-tokens" and i + 1 < len(serve_args):
            return int(serve_args[i + 1])
        if arg.startswith("--llm-max-tokens="):
            return int(arg.split("=", 1)[1])
    return None


def quiet(t: LongTurn) -> bool:
    return t.other_cores is not None and t.other_cores <= QUIET_OTHER_CORES


def run_report(turns: list[LongTurn], max_tokens: int | None) -> dict[str, Any]:
    calm = [t for t in turns if quiet(t)]
    return {
        "turns": len(turns),
        "errors": sum(t.error is not None for t in turns),
        "capped": sum(bool(max_tokens) and t.reply_tokens == max_tokens for t in turns),
        "quiet_turns": len(calm),
        "summary": summary(turns),
        "quiet_summary": summary(calm),
        "per_turn": [asdict(t) for t in turns],
    }


def median_of(runs: list[dict[str, Any]], stage: str, key: str, summary: str = "summary") -> float | None:
    vals = [v for r in runs if (v := r[summary][stage][key]) is not None]
    return round(float(np.median(vals)), 1) if vals else None


async def run_long_call(args: argparse.Namespace) -> int:
    turns_wanted: int = args.long_call
    if turns_wanted < 1:
        raise SystemExit("rtcvoice bench: --long-call needs 1 turn or more")
    serve_args = serve_args_of(args)
    if _max_tokens(serve_args) is None:
        serve_args += ["--llm-max-tokens", str(LONG_REPLY_TOKENS)]
    max_tokens = _max_tokens(serve_args)
    texts = [LONG_CALL_QUESTIONS[i % len(LONG_CALL_QUESTIONS)] for i in range(turns_wanted)]
    main = asyncio.current_task()
    if main is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    synthesizing = asyncio.ensure_future(asyncio.to_thread(synthesize_questions, texts))
    async with one_server(args.server, serve_args) as server:
        questions = await synthesizing
        status = await asyncio.to_thread(_status, server)
        runs: list[dict[str, Any]] = []
        for repeat in range(max(1, args.repeat)):
            print(f"== long call {repeat + 1}: {turns_wanted} turns, max tokens {max_tokens} ==", flush=True)
            print(HEADER, flush=True)
            with LoadSampler(server) as load:
                turns = await long_call(server, questions, max_tokens, load)
            runs.append(run_report(turns, max_tokens))
            print(_summary_text(runs[-1]["summary"]), flush=True)
            print(
                f"over the {runs[-1]['quiet_turns']} turns when the rest of the machine used at most "
                f"{QUIET_OTHER_CORES} cores:",
                flush=True,
            )
            print(_summary_text(runs[-1]["quiet_summary"]), flush=True)
    result: dict[str, Any] = {
        "settings": {
            "server": server,
            "engines": status.get("engines"),
            "serve_args": serve_args,
            "turns": turns_wanted,
            "llm_max_tokens": max_tokens,
        },
        "runs": runs,
        "median_of_runs": {
            stage: {key: median_of(runs, stage, key) for key in ("p50", "p95")} for stage in STAGES
        },
        "median_of_runs_quiet": {
            stage: {key: median_of(runs, stage, key, "quiet_summary") for key in ("p50", "p95")}
            for stage in STAGES
        },
    }
    if len(runs) > 1:
        print("median of runs:", flush=True)
        print(_summary_text(result["median_of_runs"]), flush=True)
    if args.json_path == "-":
        print(json.dumps(result, indent=1))
    elif args.json_path:
        await asyncio.to_thread(_write_text, args.json_path, json.dumps(result, indent=1))
    complete = all(r["turns"] == turns_wanted and r["errors"] == 0 for r in runs)
    if not complete:
        print("rtcvoice bench: some turns failed or were missing", file=sys.stderr)
    return 0 if complete else 1


def _summary_text(s: dict[str, dict[str, float | None]]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return "\n".join(
        f"  {stage:<22} p50 {f(s[stage]['p50']):>6} ms   p95 {f(s[stage]['p95']):>6} ms"
        for stage in STAGES
        if stage in s
    )
