"""Cuts a streamed reply into pieces TTS can speak while the rest is still being generated."""

from __future__ import annotations

import re

# End of a sentence: terminal punctuation, optional closing quotes/brackets, then whitespace.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*\s+|\n+")
# The same at the end of what has streamed in so far, after a word of letters: an LLM sends the
# full stop as a token of its own and the space with the next word, so waiting for the space costs
# a whole token (~17 ms from the embedded model) before the caller hears anything. A digit before
# the point ("3." of "3.5") or a short word ("Dr.", "F.") still waits for what follows.
_SENTENCE_END_SO_FAR = re.compile(r"(?<=[^\W\d_]{2})[.!?…]+[\"'”’)\]]*$")
# A clause break, used only for the first piece so the first audio starts sooner.
_CLAUSE_END = re.compile(r"[,;:—–]\s+")
# Where a long first sentence without a clause break may still be cut: before a word that
# starts a phrase ("... is a novel | called ...", "... term | that represents ..."). The word
# must be followed by a space, so "to" is not the start of "today".
_PHRASE_START = re.compile(
    r"\s+(?=(?:and|but|or|so|because|which|that|who|whose|where|when|while|with|by|for|from|in|"
    r"on|at|to|about|after|before|than|like|called|named|until|since|into|through|during)\s)",
    re.IGNORECASE,
)
# Words the first piece must have before such a cut: shorter sentences finish soon anyway.
FIRST_PHRASE_WORDS = 7
# The most words the first piece waits for: a run-on without punctuation or a phrase word ("Le
# Jura, het het het ...", which the embedded model wrote in a bench run) was spoken only when the
# reply ended, 40 tokens and ~850 ms after its first word.
FIRST_MAX_WORDS = 14
# A word known to be whole: the next one has begun after it (the last may still be streaming in).
_WHOLE_WORD = re.compile(r"\S+\s+(?=\S)")
_ABBREVIATIONS = {
    "mr.",
    "mrs.",
    "ms.",
    "dr.",
    "prof.",
    "sr.",
    "jr.",
    "st.",
    "vs.",
    "etc.",
    "e.g.",
    "i.e.",
    "no.",
}


class SentenceChunker:
    """Feed text deltas; get back complete sentences (the first may be a clause or a phrase).

    The first piece decides how soon the caller hears anything: waiting for the end of a
    15-word first sentence costs ~10 more tokens, ~130 ms from the embedded model on 2 cores.
    So it may end at a clause break, or before a phrase in a long sentence; later pieces are
    whole sentences, which TTS speaks most naturally.
    """

    def __init__(
        self,
        *,
        min_chars: int = 8,
        first_clause_chars: int = 16,
        first_phrase_words: int = FIRST_PHRASE_WORDS,
        first_max_words: int = FIRST_MAX_WORDS,
    ) -> None:
        self._buf = ""
        self._min_chars = min_chars
        self._first_clause_chars = first_clause_chars
        self._first_phrase_words = first_phrase_words
        self._first_max_words = first_max_words
        self._emitted = 0

    def push(self, delta: str) -> list[str]:
        self._buf += delta
        out: list[str] = []
        while True:
            piece = self._cut()
            if piece is None:
                return out
            out.append(piece)

    def flush(self) -> list[str]:
        rest, self._buf = self._buf.strip(), ""
        if rest and any(ch.isalnum() for ch in rest):
            self._emitted += 1
            return [rest]
        return []

    def _cut(self) -> str | None:
        start = 0
        while True:
            m = _SENTENCE_END.search(self._buf, start)
            if m is None:
                break
            if self._sentence_ends(self._buf[: m.end()].strip()):
                return self._take(m.end())
            start = m.end()
        m = _SENTENCE_END_SO_FAR.search(self._buf, start)
        if m is not None and self._sentence_ends(self._buf[: m.end()].strip()):
            return self._take(m.end())
        if self._emitted == 0 and len(self._buf) >= self._first_clause_chars:
            for m in _CLAUSE_END.finditer(self._buf):
                if m.start() >= self._first_clause_chars // 2:
                    return self._take(m.end())
            if self._first_phrase_words:
                for m in _PHRASE_START.finditer(self._buf):
                    if len(self._buf[: m.start()].split()) >= self._first_phrase_words:
                        return self._take(m.end())
            if self._first_max_words:
                words = list(_WHOLE_WORD.finditer(self._buf))
                if len(words) >= self._first_max_words:
                    return self._take(words[self._first_max_words - 1].end())
        return None

    def _sentence_ends(self, candidate: str) -> bool:
        """Whether ``candidate`` (ending in terminal punctuation) is a sentence, not "Dr." or "F."."""
        last_word = candidate.rsplit(" ", 1)[-1].lower()
        initial = len(last_word) == 2 and last_word[0].isalpha() and last_word[1] == "."  # "F. Scott"
        return len(candidate) >= self._min_chars and last_word not in _ABBREVIATIONS and not initial

    def _take(self, end: int) -> str | None:
        piece, self._buf = self._buf[:end].strip(), self._buf[end:]
        if not any(ch.isalnum() for ch in piece):
            return None if not self._buf else self._cut()
        self._emitted += 1
        return piece
