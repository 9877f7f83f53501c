"""Any OpenAI-compatible ``/audio/transcriptions`` endpoint (OpenAI Whisper, or a local server).

The utterance is sent once, at the end of the turn, as a 16 kHz mono 16-bit WAV built in memory.
"""

from __future__ import annotations

import io
import logging
import wave

import numpy as np
import openai

from ...settings import Settings
from ..base import FloatAudio, SttError
from ..pool import pooled_http_client

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
DEFAULT_MODEL = "whisper-1"


def wav_bytes(audio: FloatAudio, sample_rate: int = SAMPLE_RATE) -> bytes:
    pcm = (np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


class OpenAITranscribeStt:
    name = "openai"
    languages = None  # whisper-1 and its kin are multilingual

    def __init__(self, settings: Settings, *, timeout_s: float = 30.0) -> None:
        base_url = settings.stt_base_url or settings.tts_base_url or settings.openai_base_url
        if not base_url and not settings.openai_api_key:
            raise SttError(
                "stt=openai needs OPENAI_API_KEY (for api.openai.com) or a base URL "
                "(RTCVOICE_TTS_BASE_URL / OPENAI_BASE_URL) of an OpenAI-compatible server."
            )
        self.base_url = base_url
        self.model = settings.stt_model or DEFAULT_MODEL
        # Local servers usually ignore the key, but the client insists on one.
        self._client = openai.AsyncOpenAI(
            base_url=base_url or None,
            api_key=settings.openai_api_key or "unused",
            timeout=timeout_s,
            max_retries=1,
            http_client=pooled_http_client(settings.pool_max_requests),
        )

    async def transcribe(self, audio: FloatAudio, *, language: str = "en") -> str:
        if audio.size == 0:
            return ""
        # Whisper-style APIs take ISO-639-1 ("en"), not a locale ("en-US").
        lang = language.split("-")[0].lower() if language else ""
        try:
            result = await self._client.audio.transcriptions.create(
                model=self.model,
                file=("audio.wav", wav_bytes(audio), "audio/wav"),
                language=lang or openai.omit,
            )
        except openai.OpenAIError as exc:
            raise SttError(f"OpenAI transcription request failed ({type(exc).__name__}): {exc}") from exc
        return str(result.text).strip()

    async def warm_up(self) -> None:
        # Nothing local to load; a warm-up request would cost the user quota.
        return None

    async def aclose(self) -> None:
        await self._client.close()
