"""``rtcvoice bench --memory BATCHES``: does the server's memory come back after calls, or plateau?

BATCHES batches of ``--memory-batch`` concurrent WebRTC calls (each connects, sends a message,
waits for the spoken reply and hangs up). The server's RSS is read from its status while every
call of a batch is up (the cost of a concurrent call at peak) and 1.5 s after the batch has hung
up (what stays). Native memory (codecs, onnxruntime, allocator arenas) is invisible to Python's
heap counts, so this reads the process's RSS. ``--instant`` (the echo agent and the beep TTS)
keeps the models' own memory out of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from typing import Any

from .bench import _status, _write_text, serve_args_of
from .bench_nodes import one_server
from .client import VoiceCallClient

PLATEAU_WINDOW = 5
SETTLE_S = 1.5  # past the server's malloc trim, 0.5 s after the last call ended
# The echo agent says these back: 24 words are ~3 s of the beep TTS, so every call of a batch
# speaks at once.
REPLY_WORDS = 24


def _words(n: int) -> str:
    return " ".join(f"word{i}" for i in range(n))


def _rss(server: str) -> float:
    return float(_status(server)["process"]["rss_mb"])


async def _call(server: str, up: asyncio.Barrier, up_rss: list[float], words: int) -> None:
    client = VoiceCallClient(server)
    await client.connect()
    try:
        client.send({"type": "text_message", "content": _words(words)})
        await client.wait_for(lambda e: e.get("type") == "state" and e.get("state") == "speaking", 60)
        if await up.wait() == 0:  # one caller reads the peak while every reply is being spoken
            up_rss.append(await asyncio.to_thread(_rss, server))
        await up.wait()
        await client.wait_count("end_of_response", 1, 60)
    finally:
        await client.close()


def _median_end(values: list[float]) -> float:
    return float(statistics.median(values[-PLATEAU_WINDOW:]))


def plateau_report(idle: float, after: list[float], during: list[float], batch: int) -> dict[str, Any]:
    half = len(after) // 2
    return {
        "idle_rss_mb": idle,
        "rss_after_batch_mb": after,
        "rss_during_batch_mb": during,
        "peak_rss_mb": max(during + after),
        # What a concurrent call costs while it is up, over the idle server.
        "mb_per_concurrent_call": round((max(during) - idle) / batch, 1) if during else None,
        # The plateau test: what the second half of the batches still added, each end read as the
        # median of up to 5 batches (one reading moves by 1-2 MB with what the allocator holds).
        "growth_last_half_mb": round(_median_end(after) - _median_end(after[:half]), 1) if half else None,
        "growth_mb": round(after[-1] - idle, 1) if after else None,
    }


async def run_memory(args: argparse.Namespace) -> int:
    batches: int = args.memory
    size: int = args.memory_batch
    if batches < 2 or size < 1:
        raise SystemExit("rtcvoice bench: --memory needs 2 batches or more, --memory-batch 1 or more")
    serve_args = serve_args_of(args)
    async with one_server(args.server, serve_args) as server:
        idle = await asyncio.to_thread(_rss, server)
        print(f"== memory: {batches} batches of {size} calls; idle RSS {idle:.0f} MB ==", flush=True)
        after: list[float] = []
        during: list[float] = []
        failed = 0
        for n in range(batches):
            up = asyncio.Barrier(size)
            up_rss: list[float] = []
            results = await asyncio.gather(
                *(_call(server, up, up_rss, args.memory_reply_words) for _ in range(size)),
                return_exceptions=True,
            )
            failed += sum(isinstance(r, BaseException) for r in results)
            await asyncio.sleep(SETTLE_S)
            after.append(await asyncio.to_thread(_rss, server))
            during += up_rss
            peak = f"{up_rss[0]:.0f}" if up_rss else "-"
            print(
                f"batch {n + 1:3d}: RSS {peak:>5} MB with the calls up, {after[-1]:.0f} MB after", flush=True
            )
    report = plateau_report(idle, after, during, size) | {"failed_calls": failed, "serve_args": serve_args}
    print(
        f"peak {report['peak_rss_mb']:.0f} MB, {report['mb_per_concurrent_call']} MB per concurrent call, "
        f"grew {report['growth_mb']} MB, {report['growth_last_half_mb']} MB of it in the last half",
        flush=True,
    )
    if args.json_path == "-":
        print(json.dumps(report, indent=1))
    elif args.json_path:
        await asyncio.to_thread(_write_text, args.json_path, json.dumps(report, indent=1))
    if failed:
        print(f"rtcvoice bench: {failed} calls failed", file=sys.stderr)
    return 0 if not failed else 1
