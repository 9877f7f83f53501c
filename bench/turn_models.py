"""Score the end-of-turn models offline on the turn-taking corpus, to choose the default.

    flock /tmp/rtcvoice-bench.lock .venv/bin/python bench/turn_models.py [--out FILE] [--json FILE]

For every thinking pause inside an item (the caller is NOT done) and every true end (the caller
IS done) it cuts the audio where the server stands during that silence: the utterance so far plus
200 ms of silence. It transcribes that with the server's Whisper engine, built from default
settings as ``rtcvoice serve`` builds it, then asks each model for P(done): the transcript's
trailing words, the embedded LLM, Smart Turn (the audio), and simple combinations.

Per candidate and threshold (P >= threshold counts as "done"): the share of inner pauses judged
done, each of which would cut the caller off if the silence were then short, and the share of
true ends judged done, each of which lets the turn end sooner. Then the time per call on this CPU.
The table goes to bench/results/turn-models.txt; every sample with its transcript and scores
follows it, so a surprise can be traced to the words Whisper heard.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rtcvoice.audio import STT_RATE, FloatAudio, int16_to_float, resample_pcm
from rtcvoice.engines.eot.words import TrailingWordsModel
from rtcvoice.engines.stt import create_stt
from rtcvoice.settings import Settings
from rtcvoice.turn_corpus import Item, corpus, espeak_available, synthesize

SILENCE_S = 0.2  # how far into the silence the server judges (and Smart Turn was trained to listen)
PRE_ROLL_S = 0.3  # the server keeps this much from before the VAD fired (conversation.PRE_ROLL_MS)
THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
TODAY_SILENCE_MS, TODAY_QUESTION_MS = 512, 384  # what ends a turn before issue 13
VAD_LAG_MS = 50  # Silero's median lag after the last word (conversation.py): it adds to a pause
OUT = Path(__file__).resolve().parent / "results" / "turn-models.txt"


@dataclass
class Sample:
    item: Item
    at: str  # "pause" (not done) or "end" (done)
    pause_s: float | None  # the pause's length, for a pause
    audio: FloatAudio  # 16 kHz, from the pre-roll to 200 ms into the silence
    text: str = ""
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.at == "end"


def samples(items: list[Item]) -> list[Sample]:
    out: list[Sample] = []
    for item in items:
        pcm, rate, labels = synthesize(item, lead_s=PRE_ROLL_S, tail_s=1.0)
        audio = int16_to_float(resample_pcm(pcm, rate, STT_RATE))

        # 16 kHz samples up to SILENCE_S after each labelled offset (at the item's rate).
        upto = [
            round((offset / rate + SILENCE_S) * STT_RATE)
            for offset in (*(p[0] for p in labels.pauses), labels.end)
        ]
        for (start, end), cut in zip(labels.pauses, upto, strict=False):
            out.append(Sample(item, "pause", (end - start) / rate, audio[:cut]))
        out.append(Sample(item, "end", None, audio[: upto[-1]]))
    return out


def load_models() -> tuple[dict[str, Callable[[Sample], float]], list[str]]:
    """Each single model as sample → P(done); and notes on those that could not be loaded."""
    notes: list[str] = []
    words = TrailingWordsModel()
    models: dict[str, Callable[[Sample], float]] = {"words": lambda s: words.probability(s.text, s.audio)}
    try:
        from rtcvoice.engines.eot.llm import LlamaEndOfTurn

        llm = LlamaEndOfTurn()
        # With punctuation the raw probabilities run ~1000x higher (Whisper's full stops): its own midpoint.
        llm_punct = LlamaEndOfTurn(keep_punctuation=True, midpoint=1e-2)
        models["llm"] = lambda s: llm.probability(s.text, s.audio)
        models["llm-punct"] = lambda s: llm_punct.probability(s.text, s.audio)
    except (ImportError, FileNotFoundError) as exc:
        notes.append(f"llm: not scored ({exc})")
    try:
        from rtcvoice.engines.eot.smart_turn import SmartTurnModel

        smart = SmartTurnModel.load()
        models["smart-turn"] = lambda s: smart.probability(s.text, s.audio)
    except (ImportError, FileNotFoundError) as exc:
        notes.append(f"smart-turn: not scored ({exc})")
    return models, notes


# Combinations of the single models' scores: (name, the models it needs, how it combines them).
VETO = 0.15  # words at or below this (an article, a preposition, a filler, a trailing comma) decide


def combinations() -> list[tuple[str, tuple[str, ...], Callable[[dict[str, float]], float]]]:
    def mean(a: str, b: str) -> Callable[[dict[str, float]], float]:
        return lambda s: (s[a] + s[b]) / 2

    def veto(then: str) -> Callable[[dict[str, float]], float]:
        # The words decide where they are sure the sentence goes on; elsewhere the other model does.
        return lambda s: s["words"] if s["words"] <= VETO else s[then]

    def veto_mean(a: str) -> Callable[[dict[str, float]], float]:
        return lambda s: s["words"] if s["words"] <= VETO else (s["words"] + s[a]) / 2

    return [
        ("mean(words,smart-turn)", ("words", "smart-turn"), mean("words", "smart-turn")),
        ("words-veto>smart-turn", ("words", "smart-turn"), veto("smart-turn")),
        ("words-veto>mean(words,smart-turn)", ("words", "smart-turn"), veto_mean("smart-turn")),
        ("mean(words,llm)", ("words", "llm"), mean("words", "llm")),
        ("words-veto>llm", ("words", "llm"), veto("llm")),
        ("mean(smart-turn,llm)", ("smart-turn", "llm"), mean("smart-turn", "llm")),
    ]


def today_cuts(sample: Sample) -> bool:
    """Whether the server before issue 13 ends the turn in this pause (an estimate from its length)."""
    if sample.pause_s is None:
        return False
    silence_ms = sample.pause_s * 1000 - VAD_LAG_MS
    limit = TODAY_QUESTION_MS if sample.text.rstrip().endswith("?") else TODAY_SILENCE_MS
    return silence_ms >= limit


def auc(done: list[float], not_done: list[float]) -> float:
    """The chance that a true end scores above an inner pause (ties count half): the ranking, any threshold."""
    pairs = [(1.0 if d > n else 0.5 if d == n else 0.0) for d in done for n in not_done]
    return sum(pairs) / max(1, len(pairs))


def judged(group: list[Sample], name: str, threshold: float) -> list[bool]:
    return [s.scores[name] >= threshold for s in group]


def rate(group: list[Sample], name: str, threshold: float) -> float:
    return sum(judged(group, name, threshold)) / max(1, len(group))


def count(group: list[Sample], name: str, threshold: float) -> str:
    return f"{sum(judged(group, name, threshold))}/{len(group)}"


def share(flags: list[bool]) -> str:
    return f"{sum(flags):>2}/{len(flags):<2} {100 * sum(flags) / max(1, len(flags)):3.0f}%"


def report(all_samples: list[Sample], times: dict[str, list[float]], notes: list[str]) -> str:
    pauses = [s for s in all_samples if not s.done]
    ends = [s for s in all_samples if s.done]
    unfinished = [s for s in pauses if s.item.kind == "unfinished"]
    looks_done = [s for s in pauses if s.item.kind == "looks_done"]
    names = list(all_samples[0].scores) if all_samples else []
    lines = [
        "End-of-turn models on the turn-taking corpus (rtcvoice/turn_corpus.py), offline.",
        f"{len(pauses)} inner pauses (caller NOT done: {len(unfinished)} after a word that cannot end a "
        f"sentence, {len(looks_done)} after a clause that looks finished) and {len(ends)} true ends "
        f"(caller done), from {len({s.item.id for s in all_samples})} items; each cut {SILENCE_S * 1000:.0f} ms "
        "into the silence and transcribed by the server's Whisper (tiny.en, default settings).",
        "voices: hibari" + (" and espeak-ng" if espeak_available() else " only (espeak-ng not installed)"),
        "",
        "P >= threshold counts as 'done'.  pauses→done: the caller would be cut off (lower is better);",
        "ends→done: the turn ends sooner (higher is better). unfin / looks: pauses of each kind judged done;",
        "hibari / espeak: pauses judged done, by voice.",
        "",
        f"{'candidate':<34}{'thr':>5}  {'pauses→done':>12} {'unfin':>6} {'looks':>6} {'hibari':>6} "
        f"{'espeak':>6}  {'ends→done':>12}",
    ]
    by_voice = {e: [s for s in pauses if s.item.voice.engine == e] for e in ("hibari", "espeak")}
    for name in names:
        ranking = auc([s.scores[name] for s in ends], [s.scores[name] for s in pauses])
        j, at = max((rate(ends, name, t) - rate(pauses, name, t), t) for t in THRESHOLDS)
        lines.append(
            f"{name}  (AUC {ranking:.3f}: a true end scores above an inner pause; "
            f"best threshold {at:.1f}: ends→done minus pauses→done = {j:+.2f})"
        )
        for t in THRESHOLDS:
            lines.append(
                f"{'':<34}{t:>5.1f}  {share(judged(pauses, name, t)):>12} {count(unfinished, name, t):>6} "
                f"{count(looks_done, name, t):>6} {count(by_voice['hibari'], name, t):>6} "
                f"{count(by_voice['espeak'], name, t):>6}  {share(judged(ends, name, t)):>12}"
            )
        lines.append("")
    cut_today = [today_cuts(s) for s in pauses]
    lines += [
        f"today (no model: {TODAY_SILENCE_MS} ms of silence ends a turn, {TODAY_QUESTION_MS} ms after '?'): "
        f"cuts the caller off in {share(cut_today).strip()} of these pauses (estimated from their lengths, "
        f"less ~{VAD_LAG_MS} ms of VAD lag)",
        "",
        f"{'time per call (this CPU)':<34}{'median ms':>10}{'p95 ms':>10}{'calls':>7}",
    ]
    for name, values in times.items():
        ms = [v * 1000 for v in values]
        lines.append(
            f"{name:<34}{statistics.median(ms):>10.1f}{float(np.percentile(ms, 95)):>10.1f}{len(ms):>7}"
        )
    lines += [f"note: {n}" for n in notes]
    lines += ["", "Per sample (kind, where, pause length, transcript, scores):"]
    for s in all_samples:
        pause = f"{s.pause_s:.2f}s" if s.pause_s is not None else "  -  "
        scores = " ".join(f"{n}={v:.2f}" for n, v in s.scores.items())
        lines.append(f"  {s.item.kind:<10} {s.at:<5} {pause} {s.item.voice.id:<18} {s.text!r:<62} {scores}")
    return "\n".join(lines) + "\n"


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the table goes (default {OUT})")
    parser.add_argument("--json", type=Path, help="also write every sample's transcript and scores here")
    args = parser.parse_args()

    items = [i for i in corpus() if i.kind not in ("backchannel", "noise")]
    found = samples(items)
    stt = create_stt(Settings.from_env({}))
    times: dict[str, list[float]] = {"stt (whisper)": []}
    try:
        await stt.transcribe(np.zeros(STT_RATE, np.float32))  # load and warm, as the server does
        for s in found:
            started = time.perf_counter()
            s.text = await stt.transcribe(s.audio, language="en")
            times["stt (whisper)"].append(time.perf_counter() - started)
    finally:
        await stt.aclose()

    models, notes = load_models()
    for name, model in models.items():
        model(found[0])  # load and warm
        times[name] = []
        for s in found:
            started = time.perf_counter()
            s.scores[name] = model(s)
            times[name].append(time.perf_counter() - started)
    for name, needs, combine in combinations():
        if all(n in models for n in needs):
            for s in found:
                s.scores[name] = combine(s.scores)

    text = report(found, times, notes)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        rows = [
            {
                "item": s.item.id,
                "kind": s.item.kind,
                "at": s.at,
                "pause_s": s.pause_s,
                "text": s.text,
                **s.scores,
            }
            for s in found
        ]
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
