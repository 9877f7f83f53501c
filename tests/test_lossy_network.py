"""Real calls through a lossy, jittery network: the words still arrive and no lost frame is a hole.

The network is this machine's own, impaired in a private network namespace by an iptables NFQUEUE
rule and rtcvoice.netem (the kernel has no netem qdisc); ``rtcvoice bench --network`` sets it up,
so this test runs the bench an operator runs and checks its report."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rtcvoice.bench_network import words_heard
from rtcvoice.netem import Delayer, Impairment

QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Tell me a fun fact about the moon.",
)


def test_netem_drops_its_share_and_lets_the_rest_go_late_and_out_of_order() -> None:
    delayer = Delayer(Impairment(loss=0.1, delay_ms=30, jitter_ms=15, seed=3))
    kept = [n for n in range(5000) if delayer.admit(n, now=n * 0.02)]
    assert 400 < 5000 - len(kept) < 600
    assert delayer.due(0.0) == []  # nothing leaves before its delay
    released = delayer.due(float("inf"))
    assert sorted(released) == kept and released != kept  # all of them, some reordered
    summary = delayer.summary()
    assert summary["reordered"] > 0 and 27 < summary["mean_delay_ms"] < 33


def test_netem_without_jitter_keeps_the_order() -> None:
    delayer = Delayer(Impairment(delay_ms=30))
    for n in range(100):
        assert delayer.admit(n, now=n * 0.02)
    assert delayer.due(0.02 * 99 + 0.029) == list(range(99))  # the last is 1 ms from due
    assert delayer.summary()["reordered"] == 0 and delayer.tally.dropped == 0


def test_words_heard_counts_the_question_words_in_order() -> None:
    assert words_heard("What is the capital of France?", "What is the capital and friends?") == (4, 6)
    assert words_heard("How many legs?", "how many legs") == (3, 3)
    assert words_heard("a b", "") == (0, 2)


def _can_make_a_network_namespace() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(
    not _can_make_a_network_namespace(),
    reason="needs root and a kernel that lets it make a network namespace (unshare --net)",
)
async def test_calls_over_3_and_10_percent_loss_with_jitter_keep_their_words_and_conceal_every_lost_frame(
    tmp_path: Path,
) -> None:
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n")
    report = tmp_path / "network.json"
    command = [
        *(sys.executable, "-m", "rtcvoice", "bench", "--instant", "--network", "0,3,10"),
        *("--questions", str(questions), "--json", str(report)),
    ]
    proc = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "words heard" in proc.stdout
    clean, lossy, lossier = json.loads(report.read_text())["conditions"]
    assert [c["condition"] for c in (clean, lossy, lossier)] == [
        "clean",
        "3% loss, 30±15 ms",
        "10% loss, 30±15 ms",
    ]
    for row in (clean, lossy, lossier):
        assert row["turns"] == len(QUESTIONS) and row["failed_turns"] == 0, row
        assert all(t["client_voice_to_voice"] is not None for t in row["per_turn"]), row
        # A frame lost on the way to the caller is a frame of concealment, never a hole that
        # shortens the reply and brings the rest of it early (holes would read 0.97 at 3% loss,
        # 0.90 at 10%). Not 1.0: a call's last frame or two lost are missed by nothing after them
        # (CI read 0.9949 once at 10%).
        assert row["received_per_call_s"] >= 0.98, row
    assert clean["dropped"] == clean["server_concealed_s"] == clean["concealed_s"] == 0
    for row, loss in ((lossy, 0.03), (lossier, 0.10)):
        assert loss / 2 < row["dropped"] / row["packets"] < loss * 2, row  # the network did lose
        assert row["reordered"] > 0
        assert row["server_concealed_s"] > 0 and row["concealed_s"] > 0, row
        # The server still hears the questions: words lost to the network are few (before
        # concealment, 3% loss lost 5-8 of 34 question words).
        assert row["words_heard"] >= 0.85 * clean["words_heard"], (row, clean)
    assert clean["words_heard"] >= 0.9 * clean["words_said"], clean
