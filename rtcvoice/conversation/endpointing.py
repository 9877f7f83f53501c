"""What ends the caller's turn: how much silence, given what was said and how it was said.

Silence alone cannot tell a finished sentence from a thinking pause ("I want to book a table
for ... four people"): a short silence cuts people off, a long one makes every answer slow. A
policy is asked once per silence, when the transcript made during it is ready (the speculative
turn's STT, ~130 ms into the silence), and its :class:`Verdict` says how much silence ends this
utterance. The detector's ceiling (``max_silence_ms``) ends any turn whose verdict is late.

- ``silence``: one silence for everything (the behaviour of most stacks' defaults);
- ``question``: a shorter silence after a transcript that ends in "?" (rtcvoice's earlier default);
- ``semantic``: end-of-turn models (``rtcvoice.engines.eot``) give P(the caller is done); a
  finished utterance ends after ``min_end_of_turn_ms``, an unfinished one after
  ``max_end_of_turn_ms``, an unsure one halfway between. This is pipecat's Smart Turn and
  LiveKit's turn detector idea (research/peers.md row 18), with the models and the lines between
  the bands chosen on our own corpus (bench/turn_models.py, bench/results/turn-models.txt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..audio import FloatAudio
from ..engines.eot import EndOfTurnModel
from ..settings import Settings


@dataclass(frozen=True)
class Verdict:
    silence_ms: int  # the silence that ends this utterance
    done: float | None = None  # P(done) from the models; None when the policy asks none
    reason: str = "silence"


class TurnPolicy(Protocol):
    name: str
    # Whether a verdict needs the transcript (a silence-only policy ends turns without one).
    needs_transcript: bool

    @property
    def max_silence_ms(self) -> int:
        """No utterance waits longer: the detector ends the turn here whatever the verdict."""
        ...

    def judge(self, text: str, audio: FloatAudio) -> Verdict:
        """The verdict on an utterance that went quiet. Blocking (models run): call from an executor."""
        ...


@dataclass
class SilencePolicy:
    silence_ms: int
    name: str = "silence"
    needs_transcript: bool = False

    @property
    def max_silence_ms(self) -> int:
        return self.silence_ms

    def judge(self, text: str, audio: FloatAudio) -> Verdict:
        return Verdict(self.silence_ms)


@dataclass
class QuestionPolicy:
    """A transcript ending in "?" ends after ``question_ms``; Whisper puts "." at nearly every
    pause, so "." says little and waits the full silence (bench/pauses.py)."""

    silence_ms: int
    question_ms: int
    name: str = "question"
    needs_transcript: bool = True

    @property
    def max_silence_ms(self) -> int:
        return self.silence_ms

    def judge(self, text: str, audio: FloatAudio) -> Verdict:
        if 0 < self.question_ms < self.silence_ms and text.rstrip().endswith("?"):
            return Verdict(self.question_ms, reason="question")
        return Verdict(self.silence_ms)


@dataclass
class SemanticPolicy:
    """Three bands of P(done), the mean of the models' probabilities.

    On the corpus, ``words`` alone puts 19 of 20 pauses inside unfinished sentences below 0.5
    and every finished statement and question at 0.7 or above. The mean of ``words`` and ``llm``
    puts none of those pauses at 0.5 or above, but only 62% of finished turns at 0.7; the band
    between holds pauses after clauses that look finished ("I would like a coffee. ... without
    milk") and some finished turns, so it waits between the two.
    """

    models: Sequence[EndOfTurnModel]
    min_ms: int  # finished
    unsure_ms: int
    max_ms: int  # unfinished: a thinking pause
    done_at: float = 0.7  # P(done) at or above this: finished
    unfinished_below: float = 0.5  # below this: unfinished
    name: str = "semantic"
    needs_transcript: bool = True

    @property
    def max_silence_ms(self) -> int:
        return self.max_ms

    def probability(self, text: str, audio: FloatAudio) -> float:
        # The mean: each model sees a different side (the words, the voice), and one sure "not
        # done" is enough to pull an unsure other below the finished line.
        probs = [min(1.0, max(0.0, m.probability(text, audio))) for m in self.models]
        return sum(probs) / len(probs) if probs else 0.5

    def judge(self, text: str, audio: FloatAudio) -> Verdict:
        done = self.probability(text, audio)
        if done >= self.done_at:
            return Verdict(self.min_ms, done, "finished")
        if done < self.unfinished_below:
            return Verdict(self.max_ms, done, "unfinished")
        return Verdict(self.unsure_ms, done, "unsure")


def build_policy(settings: Settings, models: Sequence[EndOfTurnModel]) -> TurnPolicy:
    if settings.turn_policy == "silence":
        return SilencePolicy(settings.end_of_turn_silence_ms)
    if settings.turn_policy == "question":
        return QuestionPolicy(settings.end_of_turn_silence_ms, settings.question_end_of_turn_ms)
    if not models:
        raise ValueError("turn_policy=semantic needs at least one end-of-turn model (turn_models)")
    low, high = settings.min_end_of_turn_ms, max(settings.min_end_of_turn_ms, settings.max_end_of_turn_ms)
    return SemanticPolicy(models, low, (low + high) // 2, high)
