"""Any OpenAI-compatible ``/audio/speech`` endpoint (OpenAI, or a local server speaking its API).

The response is requested as raw 24 kHz s16le PCM so audio can be yielded as bytes arrive, with no
decoder in between.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import numpy as np
import openai

from ..base import FloatAudio, TtsError, Voice
from ..pool import pooled_http_client

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000  # what OpenAI's response_format="pcm" is defined to be
DEFAULT_VOICE = "alloy"
DEFAULT_MODEL = "tts-1"

_VOICES: tuple[tuple[str, str], ...] = (
    ("alloy", "neutral"),
    ("ash", "male"),
    ("ballad", "male"),
    ("coral", "female"),
    ("echo", "male"),
    ("fable", "male"),
    ("nova", "female"),
    ("onyx", "male"),
    ("sage", "female"),
    ("shimmer", "female"),
    ("verse", "male"),
)


def pcm16_to_float(data: bytes) -> FloatAudio:
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32, copy=False)


class OpenAISpeechTts:
    name = "openai"
    languages = None  # OpenAI's voices speak the language of the text they are given
    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        *,
        base_url: str = "",
        api_key: str = "",
        model: str = DEFAULT_MODEL,
        default_voice: str = DEFAULT_VOICE,
        timeout_s: float = 30.0,
        max_requests: int = 0,
    ) -> None:
        if not base_url and not api_key:
            raise TtsError(
                "tts=openai needs OPENAI_API_KEY (for api.openai.com) or a base URL "
                "(RTCVOICE_TTS_BASE_URL / OPENAI_BASE_URL) of an OpenAI-compatible server."
            )
        self.default_voice = default_voice
        self.model = model or DEFAULT_MODEL
        self.base_url = base_url
        # Local servers usually ignore the key, but the client insists on one.
        self._client = openai.AsyncOpenAI(
            base_url=base_url or None,
            api_key=api_key or "unused",
            timeout=timeout_s,
            # One retry: on a live call a late answer is barely better than none.
            max_retries=1,
            http_client=pooled_http_client(max_requests),
        )

    def voices(self) -> list[Voice]:
        return [
            Voice(id=vid, name=vid.title(), gender=gender, language="en-US", engine=self.name, online=True)
            for vid, gender in _VOICES
        ]

    async def synthesize(
        self, text: str, *, voice: str | None = None, speed: float = 1.0
    ) -> AsyncIterator[FloatAudio]:
        if not text.strip():
            return
        voice = voice or self.default_voice
        # The API accepts 0.25 .. 4.0.
        speed = max(0.25, min(4.0, float(speed)))
        remainder = b""
        try:
            async with self._client.audio.speech.with_streaming_response.create(
                model=self.model,
                voice=voice,
                input=text,
                response_format="pcm",
                speed=speed,
            ) as response:
                # Whatever each network read brings, without waiting to fill a fixed size: first
                # audio as early as possible. Reads may end mid-sample, hence the remainder.
                async for chunk in response.iter_bytes():
                    data = remainder + chunk
                    usable = len(data) - (len(data) % 2)
                    remainder = data[usable:]
                    if usable:
                        yield pcm16_to_float(data[:usable])
        except openai.OpenAIError as exc:
            raise TtsError(f"OpenAI speech request failed ({type(exc).__name__}): {exc}") from exc
        if remainder:
            log.debug("tts: openai speech ended on a half sample; dropped 1 byte")

    async def warm_up(self) -> None:
        # No model to load here, and warming up must not spend the user's API quota.
        return None

    async def aclose(self) -> None:
        await self._client.close()
