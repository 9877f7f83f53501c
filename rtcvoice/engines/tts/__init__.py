"""Text-to-speech engines: hibari (embedded, offline; the default), edge (online), openai."""

from __future__ import annotations

import importlib.util
import logging
from urllib.parse import urlsplit

from ...settings import Settings
from ..base import TextToSpeech, TtsError

log = logging.getLogger(__name__)

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def _require(module: str, install: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TtsError(f"tts={what} needs the Python package {module!r}, which is not installed: {install}")


def _is_local(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host in _LOCAL_HOSTS or host.startswith("127.") or host.endswith(".localhost")


def create_tts(settings: Settings) -> TextToSpeech:
    engine: TextToSpeech
    if settings.tts == "hibari":
        _require("hibari", "pip install hibari-tts", "hibari")
        from .hibari import DEFAULT_VOICE, HibariTts

        engine = HibariTts(settings.tts_voice or DEFAULT_VOICE)
        log.info("tts: hibari (embedded, offline), voice %s", engine.default_voice)
        return engine

    if settings.tts == "edge":
        _require("edge_tts", "pip install 'rtcvoice[edge]'", "edge")
        _require("av", "pip install av", "edge")
        from .edge import DEFAULT_VOICE as EDGE_VOICE
        from .edge import EdgeTts

        engine = EdgeTts(settings.tts_voice or EDGE_VOICE, url=settings.edge_tts_url)
        if settings.edge_tts_url and _is_local(settings.edge_tts_url):
            log.info("tts: edge via local endpoint %s, voice %s", settings.edge_tts_url, engine.default_voice)
        else:
            log.warning(
                "tts: edge, voice %s -- NEEDS THE INTERNET: every sentence is sent to %s",
                engine.default_voice,
                settings.edge_tts_url or "Microsoft's speech service (speech.platform.bing.com)",
            )
        return engine

    if settings.tts == "openai":
        _require("openai", "pip install openai", "openai")
        from .openai_speech import DEFAULT_MODEL, OpenAISpeechTts
        from .openai_speech import DEFAULT_VOICE as OPENAI_VOICE

        base_url = settings.tts_base_url or settings.openai_base_url
        engine = OpenAISpeechTts(
            base_url=base_url,
            api_key=settings.openai_api_key,
            model=settings.tts_model or DEFAULT_MODEL,
            default_voice=settings.tts_voice or OPENAI_VOICE,
            max_requests=settings.pool_max_requests,
        )
        if base_url and _is_local(base_url):
            log.info("tts: openai-compatible speech at %s, voice %s", base_url, engine.default_voice)
        else:
            log.warning(
                "tts: openai speech, voice %s -- NEEDS THE NETWORK: every sentence is sent to %s",
                engine.default_voice,
                base_url or "api.openai.com",
            )
        return engine

    if settings.tts == "tone":
        from .tone import ToneTts

        log.info("tts: tone (diagnostic: a beep per sentence, no speech)")
        return ToneTts()

    raise TtsError(f"Unknown tts engine {settings.tts!r}; choose hibari, edge, openai or tone.")


__all__ = ["create_tts"]
