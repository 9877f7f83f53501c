"""What a tool call costs a turn: typed turns on a voice session (the session WebSocket, so
the audio is the server's own timing, no network), answered by a local OpenAI-protocol server
that answers at once, spoken by hibari. Three kinds of turn, interleaved:

- ``none``: the model answers straight away;
- ``fast``: the model first calls a tool that takes 100 ms, then answers;
- ``slow``: the tool takes 1500 ms (the filler, "One moment.", starts at --tool-filler-ms 700).

For each: the median time from the text message to the first reply audio the server sends (what
the caller hears first: the filler, or the answer), and to the answer's first text (the model's
words after the tool; its audio follows one TTS first-chunk later).

    .venv/bin/python bench/tool_latency.py --runs 7
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_openai import FakeOpenAI, ToolCalls  # noqa: E402

from rtcvoice.engines import load_engines  # noqa: E402
from rtcvoice.server import create_app  # noqa: E402
from rtcvoice.settings import Settings  # noqa: E402
from rtcvoice.tools import tool_from_function  # noqa: E402

ANSWER = "The table is booked for seven tonight."


async def lookup(kind: str) -> dict[str, str]:
    """Look the booking up."""
    await asyncio.sleep({"fast": 0.1, "slow": 1.5}[kind])
    return {"status": "booked"}


def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
    last = messages[-1]
    if last["role"] == "tool" or "none" in last["content"]:
        return ANSWER
    return ToolCalls([("lookup", {"kind": "fast" if "fast" in last["content"] else "slow"})])


async def one_turn(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, float | None]:
    sent = time.monotonic()
    await ws.send_json({"type": "text_message", "content": f"Book it ({kind})."})
    first_audio: float | None = None
    answer_text_at: float | None = None
    async for msg in ws:
        now = time.monotonic()
        if msg.type == aiohttp.WSMsgType.BINARY:
            if first_audio is None and any(msg.data):
                first_audio = now
        elif msg.type == aiohttp.WSMsgType.TEXT:
            event = msg.json()
            if event["type"] == "ai_text" and not event.get("filler") and answer_text_at is None:
                answer_text_at = now
            if event["type"] == "end_of_response":
                break
    ms = lambda t: None if t is None else round((t - sent) * 1000, 1)  # noqa: E731
    return {"first_audio_ms": ms(first_audio), "answer_text_ms": ms(answer_text_at)}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings = Settings.from_env({}, agent="openai", llm_model="fake", db_path=":memory:")
    async with FakeOpenAI(model) as fake:
        settings = settings.replace(openai_base_url=fake.base_url)
        engines = await load_engines(settings)
        app = create_app(settings, engines=engines)
        runner = web.AppRunner(app)
        await runner.setup()
        from rtcvoice.server.keys import TOOLS

        app[TOOLS].tools["lookup"] = tool_from_function(lookup)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}/api/v1/voice"
        rows: dict[str, list[dict[str, float | None]]] = {"none": [], "fast": [], "slow": []}
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{url}/session/start", json={"output_sample_rate": 24000}) as resp:
                    started = await resp.json()
                async with http.ws_connect(started["ws_url"]) as ws:
                    await ws.receive()
                    await one_turn(ws, "none")  # warm up
                    for _ in range(args.runs):
                        for kind in rows:
                            rows[kind].append(await one_turn(ws, kind))
        finally:
            await runner.cleanup()
            await engines.aclose()
    summary = {}
    for kind, turns in rows.items():
        summary[kind] = {
            key: statistics.median(v for t in turns if (v := t[key]) is not None)
            for key in ("first_audio_ms", "answer_text_ms")
        }
    print(f"{'turn':<6}{'first audio (ms)':>18}{'answer text (ms)':>19}   medians of {args.runs}")
    for kind, row in summary.items():
        print(f"{kind:<6}{row['first_audio_ms']:>18.0f}{row['answer_text_ms']:>19.0f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": args.runs, "summary": summary, "turns": rows}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
