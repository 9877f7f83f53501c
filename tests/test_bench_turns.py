"""``rtcvoice bench --turn-taking``: the harness against a real server, and its accounting."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rtcvoice.bench_turns import ItemResult, select, summarize
from rtcvoice.turn_corpus import corpus


@pytest.mark.timeout(120)
async def test_turn_taking_bench_reports_cut_offs_delays_and_false_interruptions(tmp_path: Path) -> None:
    """Three corpus items into real WebRTC calls to a server with instant engines (echo, tone)."""
    chosen, report = tmp_path / "items.txt", tmp_path / "turns.json"
    chosen.write_text("unfinished:1\nquestion:1\nbackchannel:1\n")
    command = [
        *(sys.executable, "-m", "rtcvoice", "bench", "--turn-taking", "--instant"),
        *("--questions", str(chosen), "--json", str(report)),
    ]
    proc = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cut off mid-sentence" in proc.stdout and "listener sounds over a reply" in proc.stdout
    data = json.loads(report.read_text())
    assert data["settings"]["engines"] == {"stt": "whisper", "agent": "echo", "tts": "tone"}
    items = {row["kind"]: row for row in data["items"]}
    assert set(items) == {"unfinished", "question", "backchannel"}
    assert all(row["error"] is None for row in items.values()), data["items"]
    for kind in ("unfinished", "question"):
        row = items[kind]
        assert row["transcript"], row
        # The turn ends after the caller's last word, within the longest silence any policy waits.
        assert 0 < row["client_end_of_turn_ms"] < 3000, row
        assert row["end_of_turn_ms"] is not None and row["end_of_turn_ms"] > 0, row
        # The caller hears the reply after the server plays it: the transport is in between.
        assert row["client_voice_to_voice_ms"] > row["voice_to_voice_ms"] > 0, row
    assert items["unfinished"]["pauses_s"] and isinstance(items["unfinished"]["cut_off"], bool)
    assert items["backchannel"]["verdict"] in ("cut", "held", "resumed", "ignored")
    summary = data["summary"]
    assert summary["items"] == 3 and summary["errors"] == 0
    assert summary["cut_off"]["paused_items"]["n"] == 1
    assert summary["client_voice_to_voice_ms"]["question"]["n"] == 1
    assert summary["false_interruptions"]["sounds"] == 1


def test_items_are_chosen_by_id_kind_or_first_n_of_a_kind() -> None:
    items = corpus()
    first_question = next(i for i in items if i.kind == "question")
    picked = select(items, ["noise", "question:1", "# a comment", items[0].id])
    assert [i.id for i in picked] == [items[0].id, first_question.id, "noise-cough", "noise-click"]
    with pytest.raises(SystemExit):
        select(items, ["no-such-item"])


def result(kind: str, **fields: object) -> ItemResult:
    row = ItemResult(f"{kind}-x", kind, "hibari:heart@1", "text", [0.9] if kind == "unfinished" else [])
    for name, value in fields.items():
        setattr(row, name, value)
    return row


def test_summary_counts_cut_offs_on_paused_items_and_leaves_late_sounds_out() -> None:
    summary = summarize(
        [
            result(
                "unfinished", cuts=1, half_answered=True, client_end_of_turn_ms=400.0, answered_whole=True
            ),
            result("unfinished", cuts=2, half_answered=True, answered_whole=False),
            result("unfinished", client_end_of_turn_ms=1200.0),
            result("question", client_voice_to_voice_ms=900.0, client_end_of_turn_ms=500.0),
            result("question", error="TimeoutError: no answer"),
            result("backchannel", verdict="cut", sound_heard=True),
            result("noise", verdict="ignored", sound_heard=False),
            result("backchannel", verdict="late"),
        ]
    )
    assert summary["errors"] == 1
    assert summary["cut_off"]["paused_items"] == {"n": 3, "count": 2, "rate": 0.667}
    assert summary["cut_off"]["half_answered"]["count"] == 2
    # Of the two cut off, one was still answered whole: the words after its pause joined the turn.
    assert summary["cut_off"]["answered_whole"] == {"n": 2, "count": 1, "rate": 0.5}
    # The true end of a paused item counts only where the turn was not already cut in a pause.
    assert summary["client_end_of_turn_ms"]["paused_items_true_end"]["p50"] == 1200.0
    assert summary["client_voice_to_voice_ms"]["question"] == {
        "n": 1,
        "p50": 900.0,
        "p95": 900.0,
        "mean": 900.0,
    }
    fi = summary["false_interruptions"]
    assert (fi["sounds"], fi["late"], fi["cut"], fi["ignored"], fi["cut_rate"]) == (2, 1, 1, 1, 0.5)
