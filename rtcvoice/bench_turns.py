"""``rtcvoice bench --turn-taking``: does the server let callers finish, and answer them at once?

The turn-taking corpus (:mod:`rtcvoice.turn_corpus`) is played into real WebRTC calls, one item
at a time, each labelled with where the caller's speech starts, pauses and truly ends. From the
server's events, timed where the caller is, it reports:

- cut-offs: on items with thinking pauses, the share where ``speech_stopped`` arrived between
  the first word and the true end, i.e. the server ended the turn while the caller was mid-way;
  and how often the caller even heard the AI start answering the half sentence;
- end-of-turn delay after the true end: the server's ``metrics.end_of_turn`` and, at the
  caller, from the last speech sample sent to ``speech_stopped`` received;
- voice-to-voice on finished statements and questions: from the last speech sample sent to the
  first audible reply sample received (as ``rtcvoice bench`` measures it), and the server's;
- false interruptions: while the AI speaks a reply, the caller makes a listener's sound
  ("mm-hmm", "yeah", a cough, a click). ``cut``: the reply ended (``end_of_response`` with
  ``interrupted: true``); ``resumed``: it was paused and went on (``playback_paused`` then
  ``playback_resumed``); ``ignored``: the server never took it for speech.

Replies are listened to for a second, then cut with an ``interrupt`` event (what they say is not
measured, and a 200-token reply would make the run long); a call holds a few items, so its
history stays short. Item selection: ``--questions FILE`` with one corpus item id or kind per line
(``kind:N`` for the first N of a kind); default, the whole corpus.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .audio import WEBRTC_RATE, Int16Audio, resample_pcm
from .bench_nodes import one_server, pop_workers
from .client import CallError, VoiceCallClient
from .turn_corpus import HIBARI, Clip, Item, corpus, subset, synthesize

CALL_ITEMS = 6  # items per call: a fresh call now and then keeps the agent's history short
LEAD_S = 0.5  # silence before each item's speech (the VAD's pre-roll sees silence, as in a call)
LISTEN_S = 1.0  # how much of each reply is heard before the caller cuts it short
ANSWER_TIMEOUT_S = 90.0
FIRST_AUDIO_TIMEOUT_S = 30.0
SOUND_AFTER_S = 0.6  # a listener's sound comes this long into the AI's reply
VERDICT_WAIT_S = 4.0  # after the sound, how long the server may take to cut or resume the reply
VERDICT_GRACE_S = 0.3
CARRIER = Item(
    "carrier-story",
    "statement",
    ("Tell me a long story about a lighthouse keeper and his cat.",),
    (),
    HIBARI[0],
)
SPOKEN_KINDS = ("unfinished", "looks_done", "statement", "question")
SOUND_KINDS = ("backchannel", "noise")
CALLER_JITTER_FRAMES = 3  # as rtcvoice bench: a browser's jitter buffer


@dataclass
class ItemResult:
    item: str
    kind: str
    voice: str
    text: str
    pauses_s: list[float] = field(default_factory=list)
    # Spoken items.
    cuts: int = 0  # speech_stopped events between the first word and the true end
    half_answered: bool = False  # reply audio reached the caller before they had finished
    # Cut off, yet the words after each cut joined the turn (final_transcript ``continues``), so
    # the last reply answers the whole sentence; None where the item was not cut.
    answered_whole: bool | None = None
    end_of_turn_ms: float | None = None  # the server's metrics.end_of_turn for the final turn
    client_end_of_turn_ms: float | None = None  # true end sent → speech_stopped received
    voice_to_voice_ms: float | None = None  # the server's metrics.voice_to_voice
    client_voice_to_voice_ms: float | None = None  # last speech sample sent → first reply sample heard
    transcript: str = ""
    reply: str = ""
    # Listener sounds over a reply.
    # cut, resumed, held (paused, neither cut nor resumed in VERDICT_WAIT_S), ignored (never taken for
    # speech), or late (the reply had ended before the sound).
    verdict: str | None = None
    paused_ms: float | None = None  # how long the reply was held (playback_paused → playback_resumed)
    sound_heard: bool | None = None  # the server's VAD took the sound for speech (speech_started)
    error: str | None = None

    @property
    def cut_off(self) -> bool:
        return self.cuts > 0


def select(items: list[Item], lines: list[str]) -> list[Item]:
    """Corpus items named by id, or by kind (``kind`` or ``kind:N``), in corpus order."""
    wanted: set[str] = set()
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, n = line.partition(":")
        if any(i.id == line for i in items):
            wanted.add(line)
        elif n.isdigit() or any(i.kind == kind for i in items):
            picked = subset(items, kinds=[kind], per_kind=int(n) if n.isdigit() else None)
            if not picked:
                raise SystemExit(f"rtcvoice bench --turn-taking: no corpus items of kind {kind!r}")
            wanted.update(i.id for i in picked)
        else:
            raise SystemExit(f"rtcvoice bench --turn-taking: {line!r} is neither a corpus item id nor a kind")
    return [i for i in items if i.id in wanted]


class Player:
    """Plays clips into a call's microphone and notes when chosen samples leave."""

    def __init__(self, client: VoiceCallClient) -> None:
        self.client = client

    def play(self, pcm: Int16Audio, rate: int, marks: dict[str, int]) -> dict[str, asyncio.Future[float]]:
        """Queue ``pcm``; for each mark (a sample offset at ``rate``), the time its sample is sent."""
        mic = self.client.mic
        base = mic.written
        mic.write(resample_pcm(pcm, rate, WEBRTC_RATE))

        async def sent(position: int) -> float:
            await mic.wait_played(position)
            return time.monotonic()

        return {
            name: asyncio.ensure_future(sent(base + round(offset * WEBRTC_RATE / rate)))
            for name, offset in marks.items()
        }


def _events_since(client: VoiceCallClient, index: int, type_: str) -> list[tuple[float, dict[str, Any]]]:
    return [(t, e) for t, e in client.events[index:] if e.get("type") == type_]


async def _first_sound(client: VoiceCallClient, after: float, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        heard = client.received.first_sound_after(after)
        if heard is not None:
            return heard
        await asyncio.sleep(0.05)
    return None


async def _settle(client: VoiceCallClient) -> None:
    await client.wait_played(ANSWER_TIMEOUT_S)
    await client.wait_answered(ANSWER_TIMEOUT_S)


async def _cut_replies_short(client: VoiceCallClient, after: float) -> None:
    """Hear each reply that starts after ``after`` for LISTEN_S, then stop it: its length is not
    what is measured. Runs until cancelled (once the call has settled)."""
    while True:
        heard = await _first_sound(client, after, FIRST_AUDIO_TIMEOUT_S)
        if heard is None:
            return
        await asyncio.sleep(max(0.0, heard + LISTEN_S - time.monotonic()))
        if not client.turns.settled:
            client.send({"type": "interrupt"})
        after = time.monotonic() + 0.5  # the stopped reply's last frames are still arriving


async def _settle_hushed(client: VoiceCallClient, after: float) -> None:
    """Until the server has answered everything, every reply cut short after ``after``."""
    cutting = asyncio.ensure_future(_cut_replies_short(client, after))
    try:
        await _settle(client)
    finally:
        cutting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cutting


async def run_spoken(client: VoiceCallClient, item: Item, clip: Clip) -> ItemResult:
    pcm, rate, labels = clip
    result = ItemResult(item.id, item.kind, item.voice.id, item.text, list(item.pauses_s))
    first = len(client.events)
    sent = Player(client).play(pcm, rate, {"start": labels.speech_start, "end": labels.end})
    started, ended = await sent["start"], await sent["end"]
    await _settle_hushed(client, ended)
    stopped = _events_since(client, first, "speech_stopped")
    result.cuts = sum(1 for t, _e in stopped if started < t < ended)
    early = client.received.first_sound_after(started)
    result.half_answered = early is not None and early < ended
    final = next(((t, e) for t, e in stopped if t >= ended), None)
    if final is None:
        result.error = "no speech_stopped after the true end"
        return result
    at, event = final
    turn_id = event.get("turn_id")
    result.client_end_of_turn_ms = round((at - ended) * 1000.0, 1)
    metrics = next(
        (e for _t, e in _events_since(client, first, "metrics") if e.get("turn_id") == turn_id), {}
    )
    result.end_of_turn_ms = metrics.get("end_of_turn")
    result.voice_to_voice_ms = metrics.get("voice_to_voice")
    heard = client.received.first_sound_after(ended)
    if heard is not None:
        result.client_voice_to_voice_ms = round((heard - ended) * 1000.0, 1)
    finals = _events_since(client, first, "final_transcript")
    transcript = [e for _t, e in finals if e.get("turn_id") == turn_id]
    result.transcript = str(transcript[-1].get("text", "")) if transcript else ""
    if result.cuts:
        joins = [e for t, e in finals if t > started and e.get("continues")]
        result.answered_whole = len(joins) >= result.cuts
    end = [e for _t, e in _events_since(client, first, "end_of_response") if e.get("turn_id") == turn_id]
    result.reply = str(end[-1].get("text", ""))[:120] if end else ""
    return result


async def run_sound(client: VoiceCallClient, item: Item, clip: Clip, carrier: Clip) -> ItemResult:
    """The carrier question, then the listener's sound ``SOUND_AFTER_S`` into the AI's reply."""
    result = ItemResult(item.id, item.kind, item.voice.id, item.text)
    first = len(client.events)
    player = Player(client)
    carrier_end = await player.play(carrier.pcm, carrier.rate, {"end": carrier.labels.end})["end"]
    heard = await _first_sound(client, carrier_end, FIRST_AUDIO_TIMEOUT_S)
    replies = _events_since(client, first, "speech_stopped")
    if heard is None or not replies:
        result.error = "the carrier question got no audible reply"
        await _settle_hushed(client, time.monotonic())
        return result
    turn_id = replies[-1][1].get("turn_id")
    await asyncio.sleep(max(0.0, heard + SOUND_AFTER_S - time.monotonic()))
    pcm, rate, labels = clip
    sound_start = await player.play(pcm, rate, {"start": labels.speech_start})["start"]
    with contextlib.suppress(TimeoutError):
        await client.wait_for(
            lambda e: (
                e.get("turn_id") == turn_id and e.get("type") in ("end_of_response", "playback_resumed")
            ),
            VERDICT_WAIT_S,
            after=first,
        )
    await asyncio.sleep(VERDICT_GRACE_S)  # events the server sent with the verdict are still coming in

    def times(type_: str) -> list[float]:
        return [t for t, e in _events_since(client, first, type_) if e.get("turn_id") == turn_id]

    paused, resumed = times("playback_paused"), times("playback_resumed")
    result.sound_heard = any(t >= sound_start for t, _e in _events_since(client, first, "speech_started"))
    end = next(
        (e for _t, e in _events_since(client, first, "end_of_response") if e.get("turn_id") == turn_id), None
    )
    ended_at = times("end_of_response")
    if ended_at and ended_at[0] < sound_start:
        result.verdict = "late"  # the reply was over before the sound: nothing to interrupt
    elif end is not None and end.get("interrupted"):
        result.verdict = "cut"
    elif resumed or paused:
        # Paused and not cut within VERDICT_WAIT_S: resumed, or still held (counted as resumed
        # only once playback_resumed says so).
        result.verdict = "resumed" if resumed else "held"
    else:
        result.verdict = "ignored"  # the server never took the sound for speech
    if paused and resumed:
        result.paused_ms = round((resumed[0] - paused[0]) * 1000.0, 1)
    # The verdict is in: the rest of the story, and any reply to the sound, need not be heard.
    if end is None:
        client.send({"type": "interrupt"})
    await _settle_hushed(client, time.monotonic())
    return result


async def run_items(server: str, items: list[Item], *, log: bool = True) -> list[ItemResult]:
    carrier = await asyncio.to_thread(synthesize, CARRIER, lead_s=LEAD_S, tail_s=0.2)
    clips = await asyncio.to_thread(lambda: [synthesize(i, lead_s=LEAD_S, tail_s=0.5) for i in items])
    results: list[ItemResult] = []
    client: VoiceCallClient | None = None
    try:
        for n, (item, clip) in enumerate(zip(items, clips, strict=True)):
            if client is None or n % CALL_ITEMS == 0:
                if client is not None:
                    await client.close()
                client = VoiceCallClient(server, jitter_frames=CALLER_JITTER_FRAMES)
                await client.connect()
                await asyncio.sleep(0.5)  # the server says hello and prepares the agent
            try:
                if item.kind in SOUND_KINDS:
                    result = await run_sound(client, item, clip, carrier)
                else:
                    result = await run_spoken(client, item, clip)
            except (CallError, TimeoutError) as exc:
                result = ItemResult(item.id, item.kind, item.voice.id, item.text, list(item.pauses_s))
                result.error = f"{type(exc).__name__}: {exc}"
                await client.close()
                client = None
            results.append(result)
            if log:
                print(_line(result), flush=True)
            await asyncio.sleep(0.3)
    finally:
        if client is not None:
            await client.close()
    return results


def _line(r: ItemResult) -> str:
    if r.kind in SOUND_KINDS:
        what = f"{r.verdict}" + (f" (held {r.paused_ms:.0f} ms)" if r.paused_ms is not None else "")
        what += ", the VAD heard it" if r.sound_heard else ", the VAD did not hear it"
    else:
        what = (
            f"cuts {r.cuts}{' HALF-ANSWERED' if r.half_answered else ''}"
            f"{' (joined)' if r.answered_whole else ''}, eot {_fmt(r.end_of_turn_ms)} / "
            f"{_fmt(r.client_end_of_turn_ms)} ms, v2v {_fmt(r.client_voice_to_voice_ms)} ms, heard {r.transcript!r}"
        )
    error = f" ERROR {r.error}" if r.error else ""
    return f"  {r.item[:58]:<58} {what}{error}"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def _rate(flags: list[bool]) -> dict[str, Any]:
    return {
        "n": len(flags),
        "count": sum(flags),
        "rate": round(sum(flags) / len(flags), 3) if flags else None,
    }


def summarize(results: list[ItemResult]) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    spoken = [r for r in ok if r.kind in SPOKEN_KINDS]
    paused = [r for r in spoken if r.pauses_s]
    finished = [r for r in spoken if not r.pauses_s]

    def dist(rows: list[ItemResult], attr: str) -> dict[str, Any]:
        values = [v for r in rows if (v := getattr(r, attr)) is not None]
        return {
            "n": len(values),
            "p50": _pct(values, 50),
            "p95": _pct(values, 95),
            "mean": round(statistics.fmean(values), 1) if values else None,
        }

    groups = {
        "statement": [r for r in finished if r.kind == "statement"],
        "question": [r for r in finished if r.kind == "question"],
        "finished": finished,
        "paused_items_true_end": [r for r in paused if not r.cut_off],
    }
    sounds = [r for r in ok if r.kind in SOUND_KINDS and r.verdict != "late"]
    verdicts = {v: sum(1 for r in sounds if r.verdict == v) for v in ("cut", "held", "resumed", "ignored")}
    return {
        "items": len(results),
        "errors": len(results) - len(ok),
        "cut_off": {
            "paused_items": _rate([r.cut_off for r in paused]),
            "unfinished": _rate([r.cut_off for r in paused if r.kind == "unfinished"]),
            "looks_done": _rate([r.cut_off for r in paused if r.kind == "looks_done"]),
            "finished_items": _rate([r.cut_off for r in finished]),
            "half_answered": _rate([r.half_answered for r in spoken]),
            # Of the paused items cut off, those whose reply still answered the whole sentence.
            "answered_whole": _rate([bool(r.answered_whole) for r in paused if r.cut_off]),
        },
        "end_of_turn_ms": {name: dist(rows, "end_of_turn_ms") for name, rows in groups.items()},
        "client_end_of_turn_ms": {name: dist(rows, "client_end_of_turn_ms") for name, rows in groups.items()},
        "voice_to_voice_ms": {name: dist(rows, "voice_to_voice_ms") for name, rows in groups.items()},
        "client_voice_to_voice_ms": {
            name: dist(rows, "client_voice_to_voice_ms") for name, rows in groups.items()
        },
        "false_interruptions": {
            "sounds": len(sounds),
            "late": sum(1 for r in ok if r.verdict == "late"),
            "heard_as_speech": sum(1 for r in sounds if r.sound_heard),
            **verdicts,
            "cut_rate": round(verdicts["cut"] / len(sounds), 3) if sounds else None,
            "by_kind": {
                kind: {v: sum(1 for r in sounds if r.kind == kind and r.verdict == v) for v in verdicts}
                for kind in SOUND_KINDS
            },
        },
    }


def table(summary: dict[str, Any]) -> str:
    cut = summary["cut_off"]

    def rate(d: dict[str, Any]) -> str:
        return f"{d['count']}/{d['n']}" + (f" ({100 * d['rate']:.0f}%)" if d["rate"] is not None else "")

    lines = [
        f"turn-taking: {summary['items']} items, {summary['errors']} errors",
        f"cut off mid-sentence (speech_stopped before the true end): items with pauses {rate(cut['paused_items'])}"
        f" [unfinished {rate(cut['unfinished'])}, looks finished {rate(cut['looks_done'])}];"
        f" finished items {rate(cut['finished_items'])}",
        f"heard the AI answer before finishing: {rate(cut['half_answered'])}",
        f"cut off, but the words after the pause joined the turn (the reply answers the whole sentence): "
        f"{rate(cut['answered_whole'])}",
        "",
        f"{'ms after the true end':<26}{'group':<24}{'n':>4}{'p50':>9}{'p95':>9}",
    ]
    for metric, label in (
        ("end_of_turn_ms", "end of turn (server)"),
        ("client_end_of_turn_ms", "end of turn (caller)"),
        ("voice_to_voice_ms", "voice-to-voice (server)"),
        ("client_voice_to_voice_ms", "voice-to-voice (caller)"),
    ):
        for group, d in summary[metric].items():
            lines.append(f"{label:<26}{group:<24}{d['n']:>4}{_fmt(d['p50']):>9}{_fmt(d['p95']):>9}")
    f = summary["false_interruptions"]
    lines += [
        "",
        f"listener sounds over a reply: {f['sounds']} (and {f['late']} after the reply had ended), "
        f"{f['heard_as_speech']} taken for speech: "
        f"cut {f['cut']}, held {f['held']}, resumed {f['resumed']}, ignored {f['ignored']}"
        + (f" -> false-interruption rate {100 * f['cut_rate']:.0f}%" if f["cut_rate"] is not None else ""),
    ]
    for kind, counts in f["by_kind"].items():
        lines.append(f"  {kind}: " + ", ".join(f"{v} {n}" for v, n in counts.items()))
    return "\n".join(lines)


async def run_turn_taking(args: argparse.Namespace) -> int:
    from .bench import _read_text, _status, _write_text, serve_args_of

    items = corpus()
    if args.questions:
        items = select(items, (await asyncio.to_thread(_read_text, args.questions)).splitlines())
    serve_args, _workers = pop_workers(serve_args_of(args))
    async with one_server(args.server, serve_args) as server:
        status = await asyncio.to_thread(_status, server)
        print(f"turn-taking: {len(items)} corpus items into {server} ({status.get('engines')})", flush=True)
        started = time.monotonic()
        results = await run_items(server, items)
        wall = round(time.monotonic() - started, 1)
    summary = summarize(results)
    print(table(summary), flush=True)
    report = {
        "settings": {
            "server": server,
            "engines": status.get("engines"),
            "serve_args": serve_args,
            "wall_s": wall,
        },
        "summary": summary,
        "items": [{**asdict(r), "cut_off": r.cut_off} for r in results],
    }
    if args.json_path == "-":
        print(json.dumps(report, indent=1))
    elif args.json_path:
        await asyncio.to_thread(_write_text, args.json_path, json.dumps(report, indent=1))
    return 0 if results and summary["errors"] < len(results) else 1


if __name__ == "__main__":  # pragma: no cover - use ``rtcvoice bench --turn-taking``
    sys.exit("run: rtcvoice bench --turn-taking")
