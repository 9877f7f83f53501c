"""Voice-to-voice latency of `rtcvoice serve` with its embedded engines, from real `rtcvoice call`-style calls.

    .venv/bin/python bench/latency.py [--runs 3] [--server URL] [-- serve flags...]

Starts a server (unless --server is given), speaks each question (synthesized by hibari) from a
real aiortc peer, and prints per-turn server metrics and client-measured voice-to-voice, then
medians. Issue 6 grows this into `rtcvoice bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from rtcvoice.audio import float_to_int16
from rtcvoice.client import VoiceCallClient

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Can you recommend a good book?",
    "What time is it in Tokyo?",
    "Tell me a fun fact about the moon.",
]
STAGES = ("end_of_turn", "stt", "llm_first_token", "llm_first_sentence", "tts_first_audio", "voice_to_voice")


def question_audio(text: str) -> tuple[np.ndarray, int]:
    from hibari import Hibari

    audio = Hibari()(text, seed=1)
    pad = lambda s: np.zeros(int(s * 24000), np.float32)  # noqa: E731
    return float_to_int16(np.concatenate([pad(0.3), audio, pad(1.5)])), 24000


async def one_turn(server: str, pcm: np.ndarray, rate: int) -> dict[str, Any]:
    client = VoiceCallClient(server)
    await client.connect()
    try:
        client.play(pcm, rate)
        # Metrics arrive with the first reply audio; the rest of the reply is not timed.
        await client.wait_count("metrics", 1, 120)
        await asyncio.sleep(1.0)
    finally:
        await client.close()
    metrics = client.of_type("metrics")[0]
    row = {k: metrics.get(k) for k in STAGES}
    heard = client.received.first_sound_after(client.speech_ends[0]) if client.speech_ends else None
    row["client_voice_to_voice"] = round((heard - client.speech_ends[0]) * 1000, 1) if heard else None
    row["transcript"] = client.of_type("final_transcript")[0]["text"]
    row["reply"] = "".join(e["text"] for e in client.of_type("ai_text"))[:60]
    return row


def start_server(extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTCVOICE_", "OPENAI_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtcvoice", "serve", "--port", str(port), "--log-level", "WARNING", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/api/v1/voice/health", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stdout.read() if proc.stdout else ''}") from None
            time.sleep(0.3)
    raise SystemExit("server did not start")


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--server")
    p.add_argument("serve_args", nargs="*")
    args = p.parse_args()
    proc = None
    server = args.server
    if not server:
        proc, server = start_server(args.serve_args)
    try:
        audio = [question_audio(q) for q in QUESTIONS]
        rows = []
        for run in range(args.runs):
            for _q, (pcm, rate) in zip(QUESTIONS, audio, strict=True):
                row = await one_turn(server, pcm, rate)
                row["run"] = run
                rows.append(row)
                print(json.dumps(row), flush=True)
        keys = (*STAGES, "client_voice_to_voice")
        med = {k: statistics.median(r[k] for r in rows if r[k] is not None) for k in keys}
        print(json.dumps({"turns": len(rows), "median_ms": med}))
        v2v = med["voice_to_voice"]
        share = {
            k: round(100 * med[k] / v2v, 1)
            for k in ("end_of_turn", "stt", "llm_first_token", "tts_first_audio")
        }
        share["other"] = round(100 - sum(share.values()), 1)
        print(json.dumps({"share_of_voice_to_voice_pct": share}))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
