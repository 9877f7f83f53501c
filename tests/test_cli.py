"""The two commands a user runs: ``rtcvoice serve`` and ``rtcvoice call``, as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
from speech import speak, wer

from rtcvoice.audio import STT_RATE, int16_to_float, read_wav, resample_pcm, write_wav
from rtcvoice.engines import Engines
from rtcvoice.settings import Settings

RTCVOICE = [sys.executable, "-m", "rtcvoice"]


def clean_env() -> dict[str, str]:
    # No keys, no endpoints: the embedded defaults must carry the call alone.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTCVOICE_", "OPENAI_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not printed; got:\n{''.join(lines)}")


async def test_serve_and_call_hold_a_spoken_exchange_offline(tmp_path: Path, shared_engines: Engines) -> None:
    question = "What colour is the sky on a clear day?"
    wav = tmp_path / "question.wav"
    write_wav(wav, *speak(question))
    out = tmp_path / "reply.wav"
    port = free_port()
    # The blocking process calls run in a thread: this test shares the event loop with the rest.
    server = await asyncio.to_thread(
        subprocess.Popen,
        [
            *RTCVOICE,
            "serve",
            "--port",
            str(port),
            "--llm-max-tokens",
            "40",
            "--db-path",
            str(tmp_path / "rtcvoice.db"),
        ],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        startup = "".join(await asyncio.to_thread(wait_for_line, server, "listening on", 120))
        assert "agent: local" in startup and "(chosen by agent=auto)" in startup, startup
        call = await asyncio.to_thread(
            subprocess.run,
            [*RTCVOICE, "call", "--wav", str(wav), "--server", f"http://127.0.0.1:{port}", "--out", str(out)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert call.returncode == 0, call.stdout + call.stderr
        events = [json.loads(line) for line in call.stdout.splitlines() if line.startswith("{")]
        types = [e["type"] for e in events]
        assert "session.started" in types and "metrics" in types and types[-1] == "summary"
        final = next(e for e in events if e["type"] == "final_transcript")
        assert wer(question, final["text"]) <= 0.25, final
        ai_text = "".join(e["text"] for e in events if e["type"] == "ai_text")
        assert ai_text.strip(), "the embedded LLM said nothing"
        summary = events[-1]
        assert summary["client_voice_to_voice_ms"] > 0

        pcm, rate = read_wav(out)
        heard = await shared_engines.stt.transcribe(int16_to_float(resample_pcm(pcm, rate, STT_RATE)))
        assert wer(ai_text, heard) <= 0.5, (ai_text, heard)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.to_thread(server.wait, 30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert rc == 0


def test_serve_says_why_when_no_agent_can_answer() -> None:
    proc = subprocess.run(
        [*RTCVOICE, "serve", "--agent", "webhook", "--port", str(free_port())],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "RTCVOICE_WEBHOOK_URL" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        (["--ice-servers", "stun.example.com:3478"], "is not a STUN/TURN URL"),
        (["--ice-servers", "turn:turn.example.com:3478"], "TURN URLs need credentials"),
        (["--ice-transport-policy", "relay"], "needs a turn: or turns: URL"),
        (["--ice-servers", "turns:turn.example.com:5349?transport=udp"], "DTLS"),
    ],
)
def test_a_bad_ice_setting_stops_serve_with_one_line_before_any_model_loads(
    argv: list[str], fix: str
) -> None:
    proc = subprocess.run(
        [*RTCVOICE, "serve", "--port", str(free_port()), "--log-level", "DEBUG", *argv],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    # One line and nothing logged before it: the engines (which log as they load) never started.
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("rtcvoice: cannot start: "), proc.stderr
    assert fix in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        (["--tools", "no_such_module:TOOLS"], "cannot import no_such_module"),
        (["--tools", "not_installed_pack"], "no installed tool pack of that name"),
        (["--builtin-tools", "end_call,teleport"], "unknown built-in tools ['teleport']"),
        (["--tools-url", "http://127.0.0.1:9/tools"], "cannot list its tools"),
    ],
)
def test_a_bad_tool_setting_stops_serve_before_any_model_loads(argv: list[str], fix: str) -> None:
    proc = subprocess.run(
        [*RTCVOICE, "serve", "--port", str(free_port()), *argv],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "rtcvoice: cannot start: " in proc.stderr and fix in proc.stderr, proc.stderr
    assert "engines ready" not in proc.stderr, proc.stderr


def test_serve_help_documents_every_setting() -> None:
    proc = subprocess.run([*RTCVOICE, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    help_text = " ".join(proc.stdout.split())
    for f in fields(Settings):
        assert "--" + f.name.replace("_", "-") in help_text
        assert "RTCVOICE_" + f.name.upper() in help_text


@pytest.mark.parametrize(
    "argv", [["call"], ["call", "--wav", "/nonexistent.wav", "--server", "http://127.0.0.1:9"]]
)
def test_call_fails_clearly(argv: list[str]) -> None:
    proc = subprocess.run([*RTCVOICE, *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stderr.strip()
    assert "Traceback" not in proc.stderr
