"""A labelled turn-taking corpus, synthesized offline at run time (hibari and espeak-ng).

What a turn policy must get right, as audio with exact labels:

- ``unfinished``: a thinking pause (0.5-1.5 s) after a word that cannot end a sentence ("I want to
  book a table for ... four people"), with and without a filler ("um", "uh") before or after it;
- ``looks_done``: a pause after a clause that reads as finished, though the caller goes on ("I
  want to book a table ... for four people tomorrow evening"): silence and punctuation both say
  "done" here, only the caller's plan does not;
- ``statement`` and ``question``: finished turns (statements do not end in "?");
- ``backchannel`` and ``noise``: what a listener makes while the AI talks ("mm-hmm", "yeah",
  "okay", a cough, a click), for false-interruption tests.

Each piece of speech is synthesized on its own and the pieces are joined with exact silences, so
the labels are sample offsets, not guesses: where speech starts and truly ends, and where every
inner pause starts and ends. Joining pieces costs prosody (each piece is spoken as if whole, so
the voice falls before a pause more than a hesitating person's would): the corpus is a fair test
of what the words and the silence say, a harsh one for audio models that listen to intonation.

Synthesis is deterministic (hibari with a fixed seed, espeak-ng is deterministic) and each piece
is cached in memory, so the whole corpus takes seconds and a second pass is free.
"""

from __future__ import annotations

import logging
import shutil
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import numpy as np

from .audio import FloatAudio, Int16Audio, float_to_int16, int16_to_float, trim_silence

log = logging.getLogger(__name__)

Kind = Literal["unfinished", "looks_done", "statement", "question", "backchannel", "noise"]
KINDS: tuple[Kind, ...] = ("unfinished", "looks_done", "statement", "question", "backchannel", "noise")
HIBARI_RATE = 24_000
ESPEAK_RATE = 22_050  # what espeak-ng writes to --stdout
NOISE_RATE = 24_000
JOIN_S = 0.12  # between a filler and the words next to it: spoken together, not a pause
MIN_PAUSE_S = 0.3  # a gap this long is a labelled thinking pause; shorter ones are word joins
ESPEAK_NOTE = "espeak-ng is not installed: the corpus has the hibari voice only (apt-get install espeak-ng)"


@dataclass(frozen=True)
class Voice:
    """A synthetic speaker: hibari's bundled voice at a speed, or an espeak-ng voice at words per minute."""

    engine: Literal["hibari", "espeak", "synthetic"]
    name: str
    rate: float  # hibari: speed factor; espeak-ng: words per minute; synthetic: unused

    @property
    def id(self) -> str:
        return f"{self.engine}:{self.name}@{self.rate:g}"

    @property
    def sample_rate(self) -> int:
        return {"hibari": HIBARI_RATE, "espeak": ESPEAK_RATE}.get(self.engine, NOISE_RATE)


HIBARI = (Voice("hibari", "heart", 1.0), Voice("hibari", "heart", 0.85))
ESPEAK = (
    Voice("espeak", "en-us", 150),
    Voice("espeak", "en-gb", 175),
    Voice("espeak", "en+f3", 135),
    Voice("espeak", "en-us+m3", 165),
)
SYNTHETIC = Voice("synthetic", "noise", 0)


@dataclass(frozen=True)
class Item:
    """One turn (or listener sound): its pieces of speech and the gaps between them.

    ``gaps_s[i]`` is the silence between ``parts[i]`` and ``parts[i + 1]``: a thinking pause
    when at least :data:`MIN_PAUSE_S`, else the join around a filler. A ``noise`` item's one
    part names the sound ("cough", "click").
    """

    id: str
    kind: Kind
    parts: tuple[str, ...]
    gaps_s: tuple[float, ...]
    voice: Voice

    @property
    def text(self) -> str:
        """What is said, with "..." where the caller pauses."""
        out = self.parts[0]
        for gap, part in zip(self.gaps_s, self.parts[1:], strict=True):
            out += (" ... " if gap >= MIN_PAUSE_S else " ") + part
        return out

    @property
    def pauses_s(self) -> tuple[float, ...]:
        return tuple(g for g in self.gaps_s if g >= MIN_PAUSE_S)

    @property
    def finished_text(self) -> str:
        """The words without pause marks: what the caller meant as one turn."""
        return " ".join(self.parts)


@dataclass(frozen=True)
class Labels:
    """Sample offsets at ``rate`` in the synthesized clip (lead and tail silence included)."""

    rate: int
    speech_start: int
    end: int  # just after the last speech sample: the true end of the turn
    pauses: tuple[tuple[int, int], ...]  # (start, end) of each inner thinking pause
    said_before: tuple[str, ...]  # the words spoken before each pause

    def seconds(self, offset: int) -> float:
        return offset / self.rate

    def as_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "speech_start": self.speech_start,
            "end": self.end,
            "pauses": [list(p) for p in self.pauses],
            "said_before": list(self.said_before),
        }


class Clip(NamedTuple):
    pcm: Int16Audio
    rate: int
    labels: Labels


# -- the texts -----------------------------------------------------------------------------------
# Pieces around a pause after a word that cannot end a sentence (a preposition, article,
# conjunction, possessive, "to", a modal): silence alone would end these turns.
UNFINISHED: tuple[tuple[str, ...], ...] = (
    ("I want to book a table for", "four people tomorrow evening."),
    ("Can you help me find a flight to", "Lisbon next Friday?"),
    ("I need to buy milk, eggs and", "some fresh bread."),
    ("Could you remind me to call my", "sister at six?"),
    ("I was late this morning because", "the train broke down."),
    ("Tell me a story about a dragon with", "three heads."),
    ("What is the best way to get to the", "airport from here?"),
    ("I think we should", "leave a little earlier."),
    # Two pauses in one turn: each is a chance to cut the caller off.
    ("So I was thinking about", "maybe going to", "the beach on Sunday."),
    ("I would like to order a pizza with", "mushrooms and", "olives."),
)
# Pieces around a pause after a clause that could end a sentence, though this one goes on.
LOOKS_DONE: tuple[tuple[str, ...], ...] = (
    ("I want to book a table", "for four people tomorrow evening."),
    ("Tell me about octopuses", "and how they change colour."),
    ("Can you tell me", "how far it is to the moon?"),
    ("I would like a coffee", "with oat milk, please."),
    ("What is the weather like", "in Paris this weekend?"),
)
STATEMENTS = (
    "Tell me something about octopuses.",
    "I would like to order a large pizza.",
    "Please set a timer for ten minutes.",
    "My name is Anna and I live in Berlin.",
    "Play some relaxing music.",
    "I think that is all for today.",
)
QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Can you recommend a good book?",
    "Is it going to rain tomorrow?",
    "Where is the nearest train station?",
    "Why is the sky blue?",
)
BACKCHANNELS = ("Mm-hmm.", "Yeah.", "Okay.")
NOISES = ("cough", "click")
PAUSES_S = (0.6, 0.9, 1.2, 1.5, 0.75, 1.05, 0.5, 1.35)
# Where a filler goes around the pause: none, "um" before it, "uh" after it, or both.
FILLER_MODES = ("none", "before", "after", "both")


def _slug(text: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return "-".join(words[:5])


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def corpus(*, espeak: bool | None = None) -> list[Item]:
    """Every item, in a fixed order: each text in a hibari voice and (when espeak-ng is there) an
    espeak-ng voice, voices and rates cycling over the texts, pause lengths and filler placements
    cycling over the renditions.
    """
    if espeak is None:
        espeak = espeak_available()
        if not espeak:
            log.warning(ESPEAK_NOTE)
    items: list[Item] = []
    n = 0  # counts renditions of paused texts: pause length and filler placement cycle with it

    def voices(i: int, renditions: int = 2) -> list[Voice]:
        out = [HIBARI[i % len(HIBARI)]]
        if espeak and renditions > 1:
            out.append(ESPEAK[i % len(ESPEAK)])
        return out

    for kind, texts in (("unfinished", UNFINISHED), ("looks_done", LOOKS_DONE)):
        for i, pieces in enumerate(texts):
            # Texts with two pauses get one voice each: they already test two pauses.
            for voice in voices(i + (kind == "looks_done"), 1 if len(pieces) > 2 else 2):
                mode = FILLER_MODES[n % len(FILLER_MODES)] if kind == "unfinished" else "none"
                parts: list[str] = [pieces[0]]
                gaps: list[float] = []
                for k, piece in enumerate(pieces[1:]):
                    pause = PAUSES_S[(n + k) % len(PAUSES_S)]
                    if mode in ("before", "both"):
                        parts.append("um")
                        gaps.append(JOIN_S)
                    parts.append("uh" if mode in ("after", "both") else piece)
                    gaps.append(pause)
                    if mode in ("after", "both"):
                        parts.append(piece)
                        gaps.append(JOIN_S)
                n += 1
                filler = "" if mode == "none" else f"-{mode}"
                items.append(
                    Item(
                        f"{kind}-{_slug(pieces[0])}{filler}-{voice.id}",
                        kind,  # type: ignore[arg-type]
                        tuple(parts),
                        tuple(gaps),
                        voice,
                    )
                )
    for kind, whole in (("statement", STATEMENTS), ("question", QUESTIONS), ("backchannel", BACKCHANNELS)):
        for i, text in enumerate(whole):
            for voice in voices(i + (kind == "question")):
                items.append(Item(f"{kind}-{_slug(text)}-{voice.id}", kind, (text,), (), voice))  # type: ignore[arg-type]
    for sound in NOISES:
        items.append(Item(f"noise-{sound}", "noise", (sound,), (), SYNTHETIC))
    return items


def subset(
    items: Iterable[Item],
    *,
    kinds: Iterable[str] | None = None,
    engines: Iterable[str] | None = None,
    ids: Iterable[str] | None = None,
    with_pauses: bool | None = None,
    per_kind: int | None = None,
) -> list[Item]:
    """Items matching every filter given, in corpus order; ``per_kind`` keeps the first N of each kind."""
    kind_set = set(kinds) if kinds is not None else None
    engine_set = set(engines) if engines is not None else None
    id_set = set(ids) if ids is not None else None
    out: list[Item] = []
    counts: dict[str, int] = {}
    for item in items:
        if kind_set is not None and item.kind not in kind_set:
            continue
        if engine_set is not None and item.voice.engine not in engine_set:
            continue
        if id_set is not None and item.id not in id_set:
            continue
        if with_pauses is not None and bool(item.pauses_s) != with_pauses:
            continue
        if per_kind is not None and counts.get(item.kind, 0) >= per_kind:
            continue
        counts[item.kind] = counts.get(item.kind, 0) + 1
        out.append(item)
    return out


# -- synthesis -----------------------------------------------------------------------------------
def synthesize(item: Item, *, lead_s: float = 0.3, tail_s: float = 1.0) -> Clip:
    """The item as int16 PCM at its voice's rate, with ``lead_s``/``tail_s`` of digital silence
    around the speech, and the labels of that exact clip."""
    rate = item.voice.sample_rate
    pieces = [_piece(item.voice, part) for part in item.parts]

    def pad(seconds: float) -> FloatAudio:
        return np.zeros(round(seconds * rate), np.float32)

    out: list[FloatAudio] = [pad(lead_s)]
    at = out[0].size
    start = at
    pauses: list[tuple[int, int]] = []
    said: list[str] = []
    for i, audio in enumerate(pieces):
        out.append(audio)
        at += audio.size
        if i < len(item.gaps_s):
            gap = pad(item.gaps_s[i])
            if item.gaps_s[i] >= MIN_PAUSE_S:
                pauses.append((at, at + gap.size))
                said.append(" ".join(item.parts[: i + 1]))
            out.append(gap)
            at += gap.size
    end = at
    out.append(pad(tail_s))
    labels = Labels(rate, start, end, tuple(pauses), tuple(said))
    return Clip(float_to_int16(np.concatenate(out)), rate, labels)


@lru_cache(maxsize=512)
def _piece(voice: Voice, text: str) -> FloatAudio:
    """One piece of speech with its own leading and trailing silence cut off (cached; read-only)."""
    if voice.engine == "hibari":
        audio = _hibari()(text, speed=voice.rate, seed=1)
    elif voice.engine == "espeak":
        audio = _espeak(voice, text)
    else:
        audio = _noise(text)
        audio.setflags(write=False)
        return audio
    audio = trim_silence(np.asarray(audio, np.float32), voice.sample_rate, keep_lead_s=0.0, keep_tail_s=0.0)
    audio = np.ascontiguousarray(audio)
    audio.setflags(write=False)
    return audio


@lru_cache(maxsize=1)
def _hibari() -> Any:
    from hibari import Hibari

    return Hibari()


def _espeak(voice: Voice, text: str) -> FloatAudio:
    if not espeak_available():
        raise RuntimeError(ESPEAK_NOTE)
    wav = subprocess.run(
        ["espeak-ng", "-v", voice.name, "-s", f"{voice.rate:g}", "--stdout", text],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    return int16_to_float(_wav_data(wav))


def _wav_data(wav: bytes) -> Int16Audio:
    """The samples of a mono 16-bit WAV whose header may not know its length (espeak-ng's --stdout)."""
    pos = 12
    while pos + 8 <= len(wav):
        chunk, size = wav[pos : pos + 4], struct.unpack("<I", wav[pos + 4 : pos + 8])[0]
        if chunk == b"data":
            data = wav[pos + 8 :]
            return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.int16)
        pos += 8 + size
    raise ValueError("no data chunk in espeak-ng's WAV output")


def _noise(sound: str) -> FloatAudio:
    """A listener's non-speech sound, made deterministically at NOISE_RATE."""
    rng = np.random.default_rng(sum(map(ord, sound)))
    rate = NOISE_RATE
    if sound == "cough":
        # Two bursts of low-passed noise with a fast attack and a decay, as a short double cough:
        # loud and broadband enough to trip an energy detector, with no words in it.
        bursts = []
        for length_s, level in ((0.22, 0.5), (0.14, 0.35)):
            n = round(length_s * rate)
            t = np.arange(n) / rate
            envelope = (1 - np.exp(-t / 0.008)) * np.exp(-t / (length_s / 3))
            noise = np.convolve(rng.normal(0, 1, n), np.ones(6) / 6, mode="same")
            bursts += [level * envelope * noise / np.abs(noise).max(), np.zeros(round(0.07 * rate))]
        return np.concatenate(bursts[:-1]).astype(np.float32)
    if sound == "click":
        # A mouse or pen click: a few milliseconds of a damped 2.5 kHz ring, twice.
        n = round(0.012 * rate)
        t = np.arange(n) / rate
        ring = 0.6 * np.sin(2 * np.pi * 2500 * t) * np.exp(-t / 0.002)
        return np.concatenate([ring, np.zeros(round(0.09 * rate)), 0.8 * ring]).astype(np.float32)
    raise ValueError(f"unknown sound {sound!r}")
