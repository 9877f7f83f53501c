"""Cuts a streamed reply into pieces TTS can speak while the rest is still being generated."""

from __future__ import annotations

import re

# End of a sentence: terminal punctuation, optional closing quotes/brackets, then whitespace.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*\s+|\n+")
# A clause break, used only for the first piece so the first audio starts sooner.
_CLAUSE_END = re.compile(r"[,;:—–]\s+")
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
    """Feed text deltas; get back complete sentences (the first may be a clause)."""

    def __init__(self, *, min_chars: int = 8, first_clause_chars: int = 16) -> None:
        self._buf = ""
        self._min_chars = min_chars
        self._first_clause_chars = first_clause_chars
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
            candidate = self._buf[: m.end()].strip()
            last_word = candidate.rsplit(" ", 1)[-1].lower()
            if len(candidate) >= self._min_chars and last_word not in _ABBREVIATIONS:
                return self._take(m.end())
            start = m.end()
        if self._emitted == 0 and len(self._buf) >= self._first_clause_chars:
            for m in _CLAUSE_END.finditer(self._buf):
                if m.start() >= self._first_clause_chars // 2:
                    return self._take(m.end())
        return None

    def _take(self, end: int) -> str | None:
        piece, self._buf = self._buf[:end].strip(), self._buf[end:]
        if not any(ch.isalnum() for ch in piece):
            return None if not self._buf else self._cut()
        self._emitted += 1
        return piece
