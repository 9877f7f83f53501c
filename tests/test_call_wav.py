"""``rtcvoice call --wav``: the whole WAV is heard, through its pauses, turns and interruptions,
and the call ends after the reply to the last turn, as a user runs it (a real process)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from conftest import BASE_SETTINGS
from speech import TTS_RATE, speak, wer

from rtcvoice.audio import read_wav, rms_dbfs, write_wav
from rtcvoice.client import TurnLedger
from rtcvoice.engines import Engines
from rtcvoice.engines.agents.echo import EchoAgent
from rtcvoice.engines.tts.tone import ToneTts
from rtcvoice.server import create_app

RTCVOICE = [sys.executable, "-m", "rtcvoice"]
# The echo agent repeats each sentence and the tone TTS "says" it, in this many seconds a word:
# QUICK answers a short sentence in ~1 s, well inside a 2 s pause; SLOW takes ~5 s, long enough
# to be talked over after the server's rejoin window (speech that soon would continue the turn).
QUICK, SLOW = 0.12, 0.5


@pytest.fixture(scope="module")
async def servers(
    shared_engines: Engines, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[float, str]]:
    """The module's servers by the tone's seconds a word: real STT and VAD, instant agent and TTS."""
    runners: list[web.AppRunner] = []
    urls: dict[float, str] = {}
    for per_word in (QUICK, SLOW):
        db = tmp_path_factory.mktemp("call-wav") / "rtcvoice.db"
        engines = dataclasses.replace(shared_engines, agent=EchoAgent(), tts=ToneTts(per_word))
        runner = web.AppRunner(create_app(BASE_SETTINGS.replace(db_path=str(db)), engines=engines))
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        urls[per_word] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield urls
    for runner in runners:
        await runner.cleanup()


def wav_of(path: Path, *parts: str | float) -> Path:
    """A WAV of sentences (str, spoken by hibari) and silences (float, seconds), in order."""
    audio = []
    for part in parts:
        if isinstance(part, str):
            audio.append(speak(part, lead_s=0.0, tail_s=0.0)[0])
        else:
            audio.append(np.zeros(int(part * TTS_RATE), np.int16))
    write_wav(path, np.concatenate(audio), TTS_RATE)
    return path


@dataclass
class Called:
    rc: int
    events: list[dict[str, Any]]
    stderr: str

    @property
    def summary(self) -> dict[str, Any]:
        assert self.events and self.events[-1]["type"] == "summary", self.events[-3:]
        return self.events[-1]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


async def rtcvoice_call(server: str, *args: str) -> Called:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTCVOICE_", "OPENAI_"))}
    proc = await asyncio.create_subprocess_exec(
        *RTCVOICE,
        "call",
        "--server",
        server,
        *args,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    except BaseException:
        proc.kill()  # a call that hangs must not outlive the test
        await proc.wait()
        raise
    lines = out.decode().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert proc.returncode is not None
    return Called(proc.returncode, events, err.decode())


FIRST, SECOND, THIRD = (
    "The weather is lovely today.",
    "I would like a table for two.",
    "Thank you for your help.",
)


async def test_a_wav_of_three_sentences_is_answered_three_times_before_the_call_ends(
    servers: dict[float, str], tmp_path: Path
) -> None:
    wav = wav_of(tmp_path / "three.wav", 0.3, FIRST, 2.0, SECOND, 2.0, THIRD, 0.3)
    out = tmp_path / "replies.wav"
    call = await rtcvoice_call(servers[QUICK], "--wav", str(wav), "--out", str(out))

    assert call.rc == 0, call.stderr
    turns = call.summary["turns"]
    assert len(turns) == 3, turns
    for said, turn in zip((FIRST, SECOND, THIRD), turns, strict=True):
        assert wer(said, turn["you_said"]) <= 0.25, turns
        assert turn["ai_said"].startswith("You said:") and wer(said, turn["ai_said"][9:]) <= 0.25, turn
    # Each reply fits in the pause after its sentence: nobody talked over anybody.
    assert [t["interrupted"] for t in turns] == [False, False, False]
    # It hung up after the third reply: that reply's end was the last word of the call.
    ends = call.of_type("end_of_response")
    assert [e["turn_id"] for e in ends] == [t["turn_id"] for t in turns]
    after = {e["type"] for e in call.events[call.events.index(ends[-1]) + 1 :]}
    assert not after & {"speech_started", "speech_stopped", "final_transcript", "ai_text"}, after
    # What it heard was recorded: three replies' tones, with the pauses between them.
    pcm, rate = read_wav(out)
    loud = [rms_dbfs(pcm[i : i + rate // 10]) > -30 for i in range(0, pcm.size, rate // 10)]
    assert sum(loud) / 10 >= 0.8 * sum(len(t["ai_said"].split()) for t in turns) * QUICK


async def test_talking_over_the_reply_interrupts_it_and_the_call_goes_on_to_the_end(
    servers: dict[float, str], tmp_path: Path
) -> None:
    # The first reply lasts ~5 s. The second sentence starts 3.5 s after the first ends: after the
    # end-of-turn silence (at most 1.6 s) and the rejoin window (1.5 s), so it is a turn of its own
    # that talks over the reply, well before the reply's end.
    first_said = "Tell me about the garden behind the house."
    second_said = "Sorry, please go on."
    wav = wav_of(tmp_path / "over.wav", 0.3, first_said, 3.5, second_said, 0.3)
    typed = "That is all."
    call = await rtcvoice_call(servers[SLOW], "--wav", str(wav), "--text", typed, "--quiet")

    assert call.rc == 0, call.stderr
    assert [e["type"] for e in call.events] == ["summary"]  # --quiet
    first, second, text_turn = call.summary["turns"]
    assert wer(first_said, first["you_said"]) <= 0.25, call.summary["turns"]
    assert first["interrupted"] is True and first["ai_said"], first
    assert wer(second_said, second["you_said"]) <= 0.25, second
    assert second["interrupted"] is False and second["ai_said"].startswith("You said:"), second
    # The typed message waited for that reply (or it would have interrupted it), then got its own.
    assert text_turn["you_said"] == typed and text_turn["ai_said"] == f"You said: {typed}", text_turn


async def test_a_call_that_is_not_answered_in_time_says_what_is_missing_and_fails(
    servers: dict[float, str], tmp_path: Path
) -> None:
    # The WAV ends as the sentence does; the server needs 0.3 s of silence or more to end the turn.
    wav = wav_of(tmp_path / "abrupt.wav", 0.3, "Please call me back tomorrow.")
    call = await rtcvoice_call(servers[QUICK], "--wav", str(wav), "--timeout", "0.2", "--quiet")

    assert call.rc == 1
    assert "gave up 0.2 s after the WAV had been played" in call.stderr, call.stderr
    # Either the turn is still being heard, or it ended and its reply has not: both are named.
    assert "speech still being heard" in call.stderr or "turn(s) unanswered" in call.stderr, call.stderr
    assert "--timeout" in call.stderr and "Traceback" not in call.stderr
    assert call.summary["session_id"]  # the summary still comes


def test_the_ledger_counts_the_turns_the_server_names_not_pairs_of_events() -> None:
    ledger = TurnLedger()

    def feed(*events: dict[str, Any]) -> bool:
        for event in events:
            ledger.feed(event)
        return ledger.settled

    # A short noise over the reply pauses it, then the reply goes on: no turn of its own.
    assert not feed(
        {"type": "speech_stopped", "turn_id": "a"}, {"type": "final_transcript", "turn_id": "a", "text": "Hi"}
    )
    assert not feed({"type": "playback_paused", "turn_id": "a"}, {"type": "speech_started"})
    assert not feed({"type": "playback_resumed", "turn_id": "a"})
    assert feed({"type": "end_of_response", "turn_id": "a", "interrupted": False, "text": "Hi."})
    # A turn that ended too early is joined to the speech after it, which answers both.
    assert not feed({"type": "speech_stopped", "turn_id": "b"}, {"type": "speech_started"})
    assert not feed({"type": "speech_stopped", "turn_id": "c"})
    assert not feed({"type": "final_transcript", "turn_id": "c", "text": "b and c", "continues": "b"})
    assert feed({"type": "end_of_response", "turn_id": "c", "interrupted": False, "text": "Yes."})
    # Noise gets no reply; a failed transcription neither.
    assert feed({"type": "speech_started"}, {"type": "speech_stopped", "turn_id": "d"}) is False
    assert feed({"type": "final_transcript", "turn_id": "d", "text": "", "empty": True})
    assert feed({"type": "speech_stopped", "turn_id": "e"}, {"type": "error", "turn_id": "e", "code": "stt"})
    # A typed message is awaited until a turn it opened ends, or the server refuses it.
    ledger.typed("hello")
    assert not feed({"type": "ai_text", "turn_id": "f", "text": "Hel"})
    assert feed({"type": "end_of_response", "turn_id": "f", "interrupted": False, "text": "Hello."})
    ledger.typed("x" * 5000)
    assert feed({"type": "error", "code": "message_too_large"})

    rows = {row["turn_id"]: row for row in ledger.summary()}
    assert list(rows) == ["a", "b", "c", "e", "f"]  # "d" was noise
    assert rows["c"]["continues"] == "b" and rows["f"]["you_said"] == "hello"
    assert rows["e"]["error"] == "stt" and not any(r.get("unanswered") for r in rows.values())
