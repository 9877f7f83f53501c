"""Which spoken languages the configured engines serve, and language codes as clients write them.

An engine says what it serves with a ``languages`` attribute: a set of ISO 639-1 codes, or None
for "any" (an online service, a multilingual model, a diagnostic engine). A text-to-speech engine
without the attribute serves the languages of its voices. A session that asks for a language one
of its engines cannot serve is refused with the reason, rather than answered in English.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .base import EngineError, Engines

_TAG = re.compile(r"^([A-Za-z]{2,3})(?:[-_][A-Za-z0-9]{1,8})*$")

# Names for messages and for the agent's instructions; other codes are shown as they are.
NAMES = {
    "ar": "Arabic", "bn": "Bengali", "de": "German", "en": "English", "es": "Spanish",
    "fr": "French", "gu": "Gujarati", "hi": "Hindi", "it": "Italian", "ja": "Japanese",
    "kn": "Kannada", "ko": "Korean", "ml": "Malayalam", "mr": "Marathi", "nl": "Dutch",
    "pa": "Punjabi", "pl": "Polish", "pt": "Portuguese", "ru": "Russian", "ta": "Tamil",
    "te": "Telugu", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "zh": "Chinese",
}  # fmt: skip


class LanguageError(EngineError):
    code = "unsupported_language"


def language_name(code: str) -> str:
    return NAMES.get(code, code)


def normalize_language(tag: str) -> str:
    """``en-US`` -> ``en``: the engines work with the primary language subtag. ValueError if not a tag."""
    match = _TAG.match(tag.strip())
    if match is None:
        raise ValueError(f"{tag[:32]!r} is not a language code (use ISO 639-1, e.g. en, hi, en-US)")
    return match.group(1).lower()


def served_by(engine: object) -> frozenset[str] | None:
    """The languages ``engine`` serves; None for any."""
    if hasattr(engine, "languages"):
        declared: Iterable[str] | None = engine.languages
        return None if declared is None else frozenset(declared)
    voices = getattr(engine, "voices", None)
    if callable(voices):
        found = set()
        for voice in voices():
            try:
                found.add(normalize_language(voice.language))
            except ValueError:
                continue
        return frozenset(found) if found else None
    return None


def check_language(engines: Engines, tag: str, *, speech_in: bool = True, speech_out: bool = True) -> str:
    """The normalized code if every engine the session uses serves it; else LanguageError saying which does not.

    ``speech_in``/``speech_out``: whether the session uses the STT / the TTS (a text-only session,
    whose client speaks and listens itself, needs only the agent).
    """
    try:
        code = normalize_language(tag)
    except ValueError as exc:
        raise LanguageError(str(exc)) from None
    roles: list[tuple[str, object]] = [("the agent", engines.agent)]
    if speech_in:
        roles.insert(0, ("speech recognition", engines.stt))
    if speech_out:
        roles.append(("speech synthesis", engines.tts))
    for role, engine in roles:
        languages = served_by(engine)
        if languages is not None and code not in languages:
            offered = ", ".join(f"{language_name(c)} ({c})" for c in sorted(languages)) or "none"
            described = getattr(engine, "description", None) or getattr(engine, "name", "?")
            raise LanguageError(
                f"{language_name(code)} ({code}) is not served by the configured {role} "
                f"({described}), which serves: {offered}. See README 'Languages' for engines that do."
            )
    return code
