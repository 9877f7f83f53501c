"""The JS client's ``Transcript`` (web/rtcvoice.js), fed server events in Node: what a page shows."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

WEB = Path(__file__).resolve().parents[1] / "web"


def entries_after(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed to load web/rtcvoice.js (Node 18 or newer).")
    script = (
        "import(process.argv[1]).then((m) => { const t = new m.Transcript();"
        " for (const e of JSON.parse(process.argv[2])) t.apply(e);"
        " console.log(JSON.stringify(t.entries)); })"
    )
    result = subprocess.run(
        [node, "--input-type=module", "-e", script, (WEB / "rtcvoice.js").as_uri(), json.dumps(events)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def test_a_sentence_that_continues_an_early_turn_replaces_its_half_and_the_dropped_reply() -> None:
    # The server ended the turn at "What is the weather like?", began a reply, and the caller
    # went on: the whole sentence is the turn, as in the AI's history, shown once.
    events = [
        {"type": "speech_started"},
        {"type": "speech_stopped", "turn_id": "a"},
        {"type": "final_transcript", "turn_id": "a", "text": "What is the weather like?"},
        {"type": "ai_text", "turn_id": "a", "text": "It is sunny"},
        {"type": "speech_started"},
        {"type": "end_of_response", "turn_id": "a", "interrupted": True, "text": "It is sunny"},
        {"type": "speech_stopped", "turn_id": "b"},
        {
            "type": "final_transcript",
            "turn_id": "b",
            "text": "What is the weather like? In Paris this weekend?",
            "continues": "a",
        },
        {"type": "ai_text", "turn_id": "b", "text": "Rain in Paris."},
        {"type": "end_of_response", "turn_id": "b", "interrupted": False, "text": "Rain in Paris."},
    ]
    shown = [(e["role"], e["text"], e["turnId"]) for e in entries_after(events)]
    assert shown == [
        ("user", "What is the weather like? In Paris this weekend?", "b"),
        ("assistant", "Rain in Paris.", "b"),
    ]


def test_a_reply_talked_over_with_a_new_request_stays_shown_as_interrupted() -> None:
    events = [
        {"type": "speech_stopped", "turn_id": "a"},
        {"type": "final_transcript", "turn_id": "a", "text": "Tell me about octopuses."},
        {"type": "ai_text", "turn_id": "a", "text": "Octopuses have"},
        {"type": "end_of_response", "turn_id": "a", "interrupted": True, "text": "Octopuses have"},
        {"type": "speech_started"},
        {"type": "speech_stopped", "turn_id": "b"},
        {"type": "final_transcript", "turn_id": "b", "text": "What about squid?"},
    ]
    entries = entries_after(events)
    assert [(e["role"], e["text"]) for e in entries] == [
        ("user", "Tell me about octopuses."),
        ("assistant", "Octopuses have"),
        ("user", "What about squid?"),
    ]
    assert entries[1]["interrupted"] is True
