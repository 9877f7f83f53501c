"""The side-by-side harness (``rtcvoice bench --peer``, bench/peers/): one caller, each stack's own
signaling, timing from what the caller hears."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from conftest import ServerFactory
from peer_bots import TONE_S, PeerBots

from rtcvoice.bench import add_arguments, synthesize_questions
from rtcvoice.bench_peers import (
    PeerCall,
    PeerLevel,
    PeerTurn,
    Target,
    capacity,
    parse_target,
    run_peers,
    speak,
)
from rtcvoice.engines.agents.echo import EchoAgent
from rtcvoice.engines.tts.tone import ToneTts

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


async def serve_bots(bots: PeerBots) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(bots.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def test_peer_targets_name_their_stack_url_and_process() -> None:
    assert parse_target("pipecat-tuned=http://10.0.0.5:7860@4242") == Target(
        "pipecat-tuned", "pipecat", "http://10.0.0.5:7860", 4242
    )
    assert parse_target("rtcvoice=http://h:8080/") == Target("rtcvoice", "rtcvoice", "http://h:8080", None)
    for bad in ("livekit=http://h:1", "pipecat", "fastrtc=http://h:1@me"):
        with pytest.raises(ValueError):
            parse_target(bad)


async def test_one_caller_times_rtcvoice_and_the_pipecat_and_fastrtc_protocols_side_by_side(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    rtcvoice = await start_server(EchoAgent(), tts=ToneTts())
    bots = PeerBots()
    runner, url = await serve_bots(bots)
    questions = tmp_path / "q.txt"
    questions.write_text("What is the capital of France?\n")
    report = tmp_path / "peers.json"
    pid = os.getpid()
    try:
        code = await run_peers(
            bench_args(
                *("--questions", str(questions), "--peer-rounds", "2", "--json", str(report)),
                *("--peer", f"rtcvoice={rtcvoice}@{pid}", "--peer", f"pipecat-x={url}@{pid}"),
                *("--peer", f"fastrtc-x={url}"),
            )
        )
    finally:
        await runner.cleanup()
    assert code == 0
    assert bots.offers == {"pipecat": 2, "fastrtc": 2}  # one call per stack per round
    data = json.loads(report.read_text())
    levels = {lv["target"]: lv for lv in data["levels"]}
    assert set(levels) == {"rtcvoice", "pipecat-x", "fastrtc-x"}
    for name, level in levels.items():
        assert level["turns"] == 2 and level["failed_turns"] == 0 and level["cut_offs"] == 0, name
        assert [t["round"] for t in level["per_turn"]] == [1, 2]
        assert 0 < level["p50_ms"] < 5000, name
    for name in ("pipecat-x", "fastrtc-x"):  # the bots' tone, heard whole
        assert all(abs(t["reply_s"] - TONE_S) < 0.15 for t in levels[name]["per_turn"]), levels[name]
    # The bots answer after 0.3 s of quiet; rtcvoice waits for its end-of-turn silence, then STT.
    assert levels["pipecat-x"]["p50_ms"] < levels["rtcvoice"]["p50_ms"]
    assert levels["rtcvoice"]["server_cpu_s_per_call_s"] > 0
    assert levels["fastrtc-x"]["server_cpu_s_per_call_s"] is None  # no process named
    ratios = {(r["rtcvoice"], r["peer"]): r for r in data["ratios"]}
    assert set(ratios) == {("rtcvoice", "pipecat-x"), ("rtcvoice", "fastrtc-x")}
    mine, theirs = levels["rtcvoice"]["p50_ms"], levels["pipecat-x"]["p50_ms"]
    assert ratios["rtcvoice", "pipecat-x"]["p50"] == round(mine / theirs, 2)


async def test_a_reply_heard_while_the_caller_still_speaks_is_a_cut_off() -> None:
    """A pause of 0.8 s inside the utterance: the bots answer after 0.3 s of quiet, so their tone
    comes before the utterance's last words. The turn is timed from the end of the speech all the
    same (the tone after it, if any), and marked."""
    ((_text, pcm, rate),) = await asyncio.to_thread(synthesize_questions, ["Book a table for four people."])
    gap = np.zeros(int(0.8 * rate), np.int16)
    bots = PeerBots()
    runner, url = await serve_bots(bots)
    call = PeerCall(Target("pipecat-eager", "pipecat", url))
    try:
        await call.connect()
        whole = await speak(call, pcm, rate, reply_timeout=5, quiet_s=1.0)
        paused = await speak(call, np.concatenate([pcm, gap, pcm]), rate, reply_timeout=5, quiet_s=1.0)
    finally:
        await call.close()
        await runner.cleanup()
    assert whole[2] is False and whole[0] is not None
    assert paused[2] is True
    assert bots.replies == 3  # one for the whole, two for the utterance with a pause


async def test_a_stack_that_never_answers_fails_its_turns_and_has_no_capacity(tmp_path: Path) -> None:
    class Mute(PeerBots):
        async def _listen(self, track, voice):  # type: ignore[no-untyped-def]
            await asyncio.Event().wait()  # hears, never answers

    bots = Mute()
    runner, url = await serve_bots(bots)
    questions = tmp_path / "q.txt"
    questions.write_text("How many legs does a spider have?\n")
    report = tmp_path / "mute.json"
    try:
        code = await run_peers(
            bench_args(
                *("--questions", str(questions), "--peer-rounds", "1", "--json", str(report)),
                *("--peer", f"pipecat-mute={url}", "--peer-reply-timeout-s", "2", "--concurrency", "1,2"),
            )
        )
    finally:
        await runner.cleanup()
    data = json.loads(report.read_text())
    one, two = data["levels"]
    assert one["failed_turns"] == 1 and one["p50_ms"] is None
    assert two["skipped"] and bots.offers["pipecat"] == 1  # past the knee: not run
    assert data["capacity"] == {"pipecat-mute": 0}
    assert code == 1


def _level(n: int, v2v: list[float | None], failed_calls: int = 0) -> PeerLevel:
    turns = [PeerTurn("s", n, 1, 0, "q", v) for v in v2v]
    return PeerLevel("s", n, turns=turns, failed_calls=failed_calls)


def test_capacity_is_the_last_level_within_one_and_a_half_times_the_one_call_p95() -> None:
    one = _level(1, [500, 520, 600])
    assert capacity([one, _level(2, [600, 850]), _level(4, [700, 1000])]) == 2
    assert capacity([one, _level(2, [500, None])]) == 1  # a turn without a reply
    assert capacity([one, _level(2, [500], failed_calls=1)]) == 1  # a call that did not connect
    assert capacity([_level(1, [None])]) == 0


async def test_the_shared_llm_server_streams_openai_chunks_to_every_stack() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(PEERS / "llm_server.py"), "--port", str(port), "--instant"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        line = await asyncio.to_thread(proc.stdout.readline)  # type: ignore[union-attr]
        assert b"ready" in line, line
        body = {"model": "x", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as resp:
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                events = [ln[6:] for ln in (await resp.text()).splitlines() if ln.startswith("data: ")]
    finally:
        proc.terminate()
        proc.wait(10)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Sure, here is a short answer. I hope that helps you."
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.skipif(
    not all((PEERS / f".venv-{n}" / "bin" / "python").exists() for n in ("pipecat", "fastrtc")),
    reason="the peers' virtualenvs are made by bench/peers/run, not by the test suite",
)
def test_the_real_pipecat_and_fastrtc_bots_answer_the_harness(tmp_path: Path) -> None:
    questions = tmp_path / "q.txt"
    questions.write_text("What is the capital of France?\n")
    proc = subprocess.run(
        [sys.executable, str(PEERS / "compare.py"), "--instant", "--configs", "tuned", "--capacity", ""]
        + ["--rounds", "1", "--questions", str(questions), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "latency-tuned.json").read_text())
    assert {lv["target"]: lv["failed_turns"] for lv in data["levels"]} == {
        "rtcvoice-tuned": 0,
        "pipecat-tuned": 0,
        "fastrtc-tuned": 0,
    }
    assert all(lv["server_cpu_s_per_call_s"] > 0 for lv in data["levels"])
