"""Telling a real interruption from a cough: what the caller's sound over the AI turns out to be.

When the caller makes a sound while the AI is thinking or speaking, the reply is paused at once
(the caller never hears the AI talk over them) and the sound is judged:

- speech that goes on for ``barge_in_ms`` is an interruption: the reply is cut where it was
  paused, and what the caller heard stays in the history;
- a shorter sound is transcribed when it ends: no words (a cough, a click), only a backchannel
  ("uh-huh", "okay"), or one or two words that are neither resume the reply at the sample where
  it paused. Whisper tiny mishears short listener noises as words (hibari's "Uh-huh." as "It
  hurts."), so it takes a word that asks for the floor ("stop", "wait") or three words to
  interrupt.

A sound that starts within ``rejoin_ms`` of the end of the caller's own turn is different: any
words in it go on with that turn ("I would like a table" ... "for two."), so they join it rather
than resume the reply to its first half.

LiveKit resumes after a false interruption (``resume_false_interruption``, research/peers.md
row 5); pipecat and OpenAI Realtime cut the reply on any sound the VAD takes for speech.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .turns import Turn

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
_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")


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
    speech_windows: int = 0  # windows of speech since the sound started
    check: asyncio.Task[None] | None = field(default=None, repr=False)

    def cancel_check(self) -> None:
        if self.check is not None and not self.check.done():
            self.check.cancel()
        self.check = None
