"""Telling a real interruption from a cough: what the caller's sound over the AI turns out to be.

When the caller makes a sound while the AI is thinking or speaking, the reply is paused at once
(the caller never hears the AI talk over them) and the sound is judged:

- speech that goes on for ``barge_in_ms`` is transcribed as far as it has gone, and is an
  interruption if those words are (below): the reply is cut where it was paused, and what the
  caller heard stays in the history. A drawn-out "mm-hmmm" or a slow "okay" lasts that long too
  (espeak-ng's "Mm-hmm." at 150 wpm is 660 ms, and was cut by its length alone before), so
  length alone decides only at twice ``barge_in_ms`` (1.28 s by default, twice the corpus's
  longest listener's noise);
- a shorter sound is transcribed when it ends: no words (a cough, a click), only a backchannel
  ("uh-huh", "okay"), or one or two words that are neither resume the reply at the sample where
  it paused. Whisper tiny mishears short listener noises as words (hibari's "Uh-huh." as "It
  hurts."), so it takes a word that asks for the floor ("stop", "wait") or three words to
  interrupt.

A sound that starts within ``rejoin_ms`` of the end of the caller's own turn is different: any
words in it go on with that turn ("I would like a table" ... "for two."), so they join it rather
than resume the reply to its first half. That holds while the caller had heard little of the
early reply (``REJOIN_HEARD_S``); after that, words that hang on what came before ("... in Paris
this weekend?", "and how they change colour") still join, since a reply is not answered with a
preposition, and anything else is judged as above, except that the midway check decides only
a join: its short audio often lacks the first word ("4. 4." or "Four people to" for "For four
people"), so such a sound is read again when it stops, or at twice ``barge_in_ms``, where it
interrupts by its length and its words say whether it joins.

LiveKit resumes after a false interruption (``resume_false_interruption``, research/peers.md
row 5); pipecat and OpenAI Realtime cut the reply on any sound the VAD takes for speech.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..audio import STT_RATE, Int16Audio
from ..engines.base import EngineError
from ..engines.eot.words import FILLERS
from ..engines.vad import WINDOW_MS
from ..settings import Settings
from .speaker import AudioSink
from .turns import Turn, TurnDetector, TurnEvent
from .utterance import Utterance

log = logging.getLogger(__name__)

# Speech this soon after the reply became audible may still be the rest of the caller's sentence.
REJOIN_HEARD_S = 0.6

# Said while listening, not to take the floor. "no", "stop" and "wait" are not here: they ask
# for something.
BACKCHANNELS = frozenset(
    {
        "mm", "mmm", "hmm", "hm", "mhm", "mm-hmm", "mm-hm", "uh-huh", "uh", "um", "ah", "oh", "ooh",
        "yeah", "yes", "yep", "yup", "ok", "okay", "right", "sure", "alright", "cool", "nice", "wow",
        "i see", "got it", "i know", "true", "exactly", "indeed", "great",
    }
)  # fmt: skip
# One of these on its own is enough to take the floor.
FLOOR_WORDS = frozenset(
    "stop wait no nope hold hang pause hey sorry excuse what actually but cancel enough quiet shut".split()
)
# A turn that opens with one of these hangs on the one before ("What is the weather like?" ...
# "in Paris this weekend?"). Not "but", "so" or "if": each also opens a reply to the AI.
ATTACHING = frozenset(
    """
    for to of at in on with about from into onto by near without within during through after
    before around over under towards toward than and or nor because although though unless
    whereas please
    """.split()
)
_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")
CheckPoint = Literal["stopped", "midway", "at_length"]  # when a sound's words are judged


def is_backchannel(text: str) -> bool:
    """Whether a transcript holds nothing but listener noises ("Mm-hmm.", "Yeah, yeah.", "Okay")."""
    words = _WORD.findall(text.lower())
    if not words:
        return True
    i = 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if pair in BACKCHANNELS:
            i += 2
        elif words[i] in BACKCHANNELS:
            i += 1
        else:
            return False
    return True


def is_speech(text: str) -> bool:
    """Whether a transcript holds words: not Whisper's usual hallucinations on noise (brackets,
    music notes, lone punctuation)."""
    stripped = text.strip().strip(".!?,")
    if not stripped or not any(ch.isalnum() for ch in stripped):
        return False
    return not (stripped.startswith(("[", "(")) and stripped.endswith(("]", ")")))


def continues_sentence(text: str) -> bool:
    """Whether a transcript opens with a word that attaches it to what was said before
    ("In Paris this weekend.", "Uh, for four people"): the rest of a sentence, not a new one."""
    words = [w for w in _WORD.findall(text.lower()) if w not in FILLERS]
    return bool(words) and words[0] in ATTACHING


def asks_for_the_floor(text: str) -> bool:
    """Whether a short sound over the AI was said to interrupt it (see the module's rules)."""
    words = _WORD.findall(text.lower())
    if any(w in FLOOR_WORDS for w in words):
        return True
    if is_backchannel(text):
        return False
    return len(words) >= 3


@dataclass
class PendingInterruption:
    """A sound heard over the AI's turn that has not been judged yet; the turn's audio is paused."""

    turn: Turn
    # It started within rejoin_ms of the end of the caller's own turn: words go on with that turn.
    rejoin: bool = False
    # It started within rejoin_ms, later into the reply: only words that attach go on with the turn.
    may_continue: bool = False
    speech_windows: int = 0  # windows of speech since the sound started
    check: asyncio.Task[None] | None = field(default=None, repr=False)  # its words, once it stopped
    midway: asyncio.Task[None] | None = field(default=None, repr=False)  # its words at barge_in_ms
    judged_midway: bool = False
    # Its words at twice barge_in_ms, for a sound that may continue the caller's turn: it interrupts
    # by its length, and they say whether it joins that turn.
    at_length: asyncio.Task[None] | None = field(default=None, repr=False)

    def cancel_check(self) -> None:
        if self.check is not None and not self.check.done():
            self.check.cancel()
        self.check = None

    def cancel(self) -> None:
        self.cancel_check()
        for task in (self.midway, self.at_length):
            if task is not None and not task.done():
                task.cancel()
        self.midway = self.at_length = None


def rejoinable(
    turn: Turn,
    settings: Settings,
    samples_now: int,
    *,
    spoken_s: float = 0.0,
    heard_s: float | None = REJOIN_HEARD_S,
) -> bool:
    """Whether speech that began ``spoken_s`` ago goes on with ``turn``, the caller's last (see the
    module).

    Only while the reply is new: a caller who had heard more of it than ``heard_s`` when they
    began is more likely answering it ("uh-huh") than finishing their sentence (``None``: however
    much they had heard, for words that attach). Counted from when the speech began, not from
    when the VAD was sure of it (``min_speech_ms`` later), which added that much to what the
    caller was taken to have heard.
    """
    began = time.monotonic() - spoken_s
    heard_at = turn.marks.get("first_audio_played")
    return (
        turn.silence_ms is not None  # a silence ended it (not the length limit, not the client)
        and turn.ended_at is not None
        and began - turn.ended_at <= settings.rejoin_ms / 1000.0
        and (heard_s is None or heard_at is None or began - heard_at <= heard_s)
        and sum(w.size for w in turn.audio) + samples_now < settings.max_utterance_s * STT_RATE
    )


class SoundJudge:
    """Judges the sounds the caller makes over one call's AI, one at a time (see the module).

    The conversation tells it when a sound starts (:meth:`begin`) and feeds it the VAD's windows
    while one is judged (:meth:`on_window`); it pauses and resumes the sink itself, and calls back
    ``barge_in`` (the reply is cut) and ``end_user_turn`` (the sound's words are the caller's
    next turn).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        detector: TurnDetector,
        utterance: Utterance,
        sink: AudioSink,
        transcribe: Callable[[Int16Audio], Awaitable[str]],
        barge_in: Callable[[Turn, bool], Awaitable[None]],
        end_user_turn: Callable[[], None],
        emit: Callable[..., None],
        own: Callable[[asyncio.Task[Any]], None],
        session_id: str,
    ) -> None:
        self.pending: PendingInterruption | None = None
        self._settings = settings
        self._detector = detector
        self._utterance = utterance
        self._sink = sink
        self._transcribe = transcribe
        self._barge_in = barge_in
        self._end_user_turn = end_user_turn
        self._emit = emit
        self._own = own
        self._session_id = session_id

    def begin(self, turn: Turn, *, rejoin: bool, may_continue: bool = False) -> None:
        """A sound over ``turn``: hold its reply (not a sample is lost) while the sound is judged."""
        self.pending = PendingInterruption(turn, rejoin=rejoin, may_continue=may_continue)
        self._sink.pause()
        self._emit("playback_paused", turn)

    def again(self) -> None:
        """Another sound while the first is judged: judge them as one."""
        if self.pending is not None:
            self.pending.cancel_check()
            self.pending.speech_windows = 0

    async def on_window(self, event: TurnEvent | None) -> None:
        pending, detector, settings = self.pending, self._detector, self._settings
        assert pending is not None, "only while a sound is judged"
        if detector.in_speech and detector.silence_run == 0:
            pending.cancel_check()  # it goes on: judge it whole
            pending.speech_windows += 1
            spoken_ms = pending.speech_windows * WINDOW_MS + settings.min_speech_ms
            if spoken_ms >= 2 * settings.barge_in_ms:
                if not (pending.may_continue and not pending.rejoin):
                    await self._confirm(pending)
                elif pending.at_length is None:
                    # Whisper often misses a first word in the midway check's short audio ("4. 4."
                    # for espeak-ng's "For four"); this longer audio has it.
                    pending.at_length = self._start_check(pending, when="at_length")
            elif spoken_ms >= settings.barge_in_ms and not pending.judged_midway:
                pending.judged_midway = True
                pending.midway = self._start_check(pending, when="midway")
            return
        if pending.check is None and pending.at_length is None:
            pending.check = self._start_check(pending)  # it stopped: its words say what it was
        if event is TurnEvent.TURN_END:
            detector.reset()  # the check ends it one way or the other

    def end(self) -> None:
        """The sound is judged (or moot): the sink plays again, whatever comes next."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()
            self._sink.resume()

    def _start_check(
        self, pending: PendingInterruption, *, when: CheckPoint = "stopped"
    ) -> asyncio.Task[None]:
        audio = self._utterance.audio()
        task = asyncio.create_task(self._check(pending, audio, when=when), name=f"sound-{pending.turn.id}")
        self._own(task)
        return task

    async def _check(self, pending: PendingInterruption, audio: Int16Audio, *, when: CheckPoint) -> None:
        """Judge the sound by its words: once it ``stopped``, ``midway`` (once it lasted barge_in_ms),
        or ``at_length`` (twice that, when it interrupts whatever it is)."""
        try:
            text = await self._transcribe(audio)
        except EngineError as exc:
            log.warning("session %s: could not transcribe a sound over the AI: %s", self._session_id, exc)
            text = ""
        if self.pending is not pending:
            return
        midway = when == "midway"
        if when == "at_length":
            pending.at_length = None
            pending.rejoin = continues_sentence(text)
            await self._take_the_floor(pending)
            return
        if midway:
            pending.midway = None
        elif pending.check is asyncio.current_task():
            pending.check = None
        else:
            return  # the sound went on after this check began
        # Words right after the caller's own turn ended go on with it ("... a table" "for four."),
        # whatever they are, and a little later if they attach to it ("in Paris this weekend");
        # otherwise only words that ask for the floor interrupt the AI.
        if pending.may_continue and continues_sentence(text):
            pending.rejoin = True
        elif midway and pending.may_continue:
            return  # its first words may be missing from audio this short ("Four people to"): read it again
        if is_speech(text) and (pending.rejoin or asks_for_the_floor(text)):
            log.info("session %s: %r over the AI interrupts it", self._session_id, text[:80])
            await self._take_the_floor(pending)
            return
        if midway:
            return  # a listener's noise so far: judged whole when it stops (or by its length)
        self.end()
        self._utterance.take()
        self._detector.reset()
        log.info("session %s: %r over the AI; it goes on", self._session_id, text[:80])
        self._emit("playback_resumed", pending.turn, heard=text)

    async def _take_the_floor(self, pending: PendingInterruption) -> None:
        """The sound's words interrupt the AI; once the caller is quiet, they are the next turn."""
        await self._confirm(pending)
        if not self._detector.in_speech:
            self._end_user_turn()

    async def _confirm(self, pending: PendingInterruption) -> None:
        self.end()  # the barge-in flushes what the pause held
        await self._barge_in(pending.turn, pending.rejoin)
