"""P(done) from the transcript's last word and punctuation: instant, and right where it is sure.

A turn rarely ends on a word that needs another after it: an article ("the"), a possessive
("my"), a conjunction ("and", "because"), a preposition ("for", "to"), a filler ("um"). Those
say "not done" whatever the full stop says. A trailing comma, dash or ellipsis says the same. A
"?" says "done". A full stop says little on its own: Whisper puts one at nearly every pause,
after "I want to book a table for." as readily as after a whole sentence, so it only lifts a
transcript whose last word can end one.

Some words sit in between: auxiliaries and modals ("we should"), subject pronouns, wh-words,
prepositions that double as particles ("turn it on"). They end sentences now and then, so they
pull the probability down without deciding. A preposition before a "?" ends a wh-question
("What is that book about?", "Where are you from?") or a question with one inside it ("Thank
you. Can you sum up what we talked about?", which waited the full max_end_of_turn_ms at the end
of a long call): those are finished. Elsewhere it counts as
half a question ("Can you book a table for?" is Whisper's "?" at a pause more often than not).
In a long call the rule cost "What is that book about?" the full max_end_of_turn_ms.

Every number is a field of :class:`TrailingWordsModel`. What matters is the order of the classes
(a filler or an article below a preposition below an in-between word below a full stop below a
question mark), and ``bench/turn_models.py`` scores them on the turn-taking corpus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...audio import FloatAudio

# Never the last word of a finished sentence.
NEVER_LAST = frozenset(
    """
    a an the my your his our their its every each another
    and or but nor because although though whereas unless whether than if
    """.split()
)
# Prepositions: not done, except at the end of a question ("What is it for?").
PREPOSITIONS = frozenset(
    """
    for to of at with about from into onto between through during without towards toward among
    against via per like as
    """.split()
)
# A question that opens with one of these may end on its preposition ("Who is it for?").
WH_WORDS = frozenset("what which who whom whose where".split())
# Words that end a sentence now and then: they lower the probability without deciding it.
RARELY_LAST = frozenset(
    """
    i we they he she im id ill ive were youre theyre hes shes
    is are was am be been being do does did have has had will would should could can may might
    must shall gonna wanna gotta
    not very really quite more most less also just only even
    what which who whose where when why how
    in on over under after before behind along across near by around some any
    """.split()
)
# Hesitations: the caller is still thinking.
FILLERS = frozenset("um uh er erm uhm hmm hm mm ah eh".split())
# Punctuation that trails off: the sentence is not done.
TRAILING_OFF = ("...", "…", ",", "-", "–", "—", ":", ";")
_WORD = re.compile(r"[a-z0-9']+")
_SENTENCE_BREAK = re.compile(r"[.!?…]\s+")


def _last_sentence_words(text: str) -> list[str]:
    return _WORD.findall(_SENTENCE_BREAK.split(text)[-1])


@dataclass
class TrailingWordsModel:
    """P(the caller is done) from the last word and the final punctuation of the transcript."""

    name: str = "words"
    question: float = 0.9  # ends in "?"
    exclaimed: float = 0.8  # ends in "!"
    stopped: float = 0.7  # ends in "." after a word that can end a sentence
    bare: float = 0.55  # a word that can end a sentence, no punctuation
    rarely: float = 0.3  # the last word rarely ends a sentence (and no "?")
    stranded: float = 0.45  # a preposition before "?", not in a wh-question
    trailing: float = 0.15  # ends in a comma, dash, colon or ellipsis
    preposition: float = 0.1  # a preposition, no "?"
    never: float = 0.05  # an article, possessive or conjunction, whatever the punctuation
    filler: float = 0.05  # a hesitation
    empty: float = 0.5  # nothing transcribed: the words say nothing either way
    never_last: frozenset[str] = field(default=NEVER_LAST)
    prepositions: frozenset[str] = field(default=PREPOSITIONS)
    rarely_last: frozenset[str] = field(default=RARELY_LAST)
    fillers: frozenset[str] = field(default=FILLERS)

    def probability(self, text: str, audio: FloatAudio | None = None) -> float:
        return self.score_text(text)

    def score_text(self, text: str) -> float:
        stripped = text.strip().strip("\"'").rstrip()
        words = _WORD.findall(stripped.lower())
        if not words:
            return self.empty
        last = words[-1].replace("'", "")
        asked = stripped.endswith("?")
        if last in self.fillers:
            return self.filler
        if last in self.never_last:
            return self.never
        if last in self.prepositions:
            if asked and WH_WORDS.intersection(_last_sentence_words(stripped.lower())):
                return self.question
            return self.stranded if asked else self.preposition
        if stripped.endswith(TRAILING_OFF):
            return self.trailing
        if asked:
            return self.question
        if last in self.rarely_last:
            return self.rarely
        if stripped.endswith("!"):
            return self.exclaimed
        if stripped.endswith("."):
            return self.stopped
        return self.bare
