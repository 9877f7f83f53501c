"""Speech-to-text engines."""

from __future__ import annotations

from ...settings import Settings
from ..base import SpeechToText
from .whisper import WhisperStt


def create_stt(settings: Settings) -> SpeechToText:
    if settings.stt == "openai":
        from .openai_transcribe import OpenAITranscribeStt

        return OpenAITranscribeStt(settings)
    return WhisperStt(
        settings.stt_model,
        compute_type=settings.stt_compute_type,
        threads=settings.stt_threads,
        concurrency=settings.stt_concurrency,
        window_s=settings.stt_window_s,
    )


__all__ = ["create_stt", "WhisperStt"]
