"""hibari: the embedded, offline text-to-speech (24 kHz, voice ``heart`` ships in the wheel).

hibari's other voices are fetched from Hugging Face on first use. A call server must never
download weights behind the operator's back, so only voices already on disk (the bundled one, or
ones a person fetched with the ``hibari`` command) are offered, unless RTCVOICE_ALLOW_DOWNLOADS=1.

Synthesis is CPU-bound ONNX + DSP work, so it runs in one dedicated thread owned by the engine:
one thread is enough (hibari runs ~20x realtime per core) and keeps the event loop free.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from hibari import Hibari
from hibari.voices import VOICES, voice_path

from ..base import FloatAudio, TtsError, Voice

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
DEFAULT_VOICE = "heart"
# The speed range hibari documents (1.0 is the pace of the voice it was distilled from).
_MIN_SPEED, _MAX_SPEED = 0.5, 2.0


def _downloads_allowed() -> bool:
    # Same switch as the Whisper engine: no engine fetches weights unless the operator says so.
    return os.environ.get("RTCVOICE_ALLOW_DOWNLOADS", "").strip().lower() in ("1", "true", "yes")


def _registry() -> dict[str, dict[str, Any]]:
    return dict(VOICES)


def _local_model_path(voice: str) -> str | None:
    """The voice's ONNX file if it is on disk (bundled or cached), else None. Never downloads."""
    try:
        return str(voice_path(voice, download_missing=False))
    except FileNotFoundError:
        return None


class HibariTts:
    name = "hibari"
    sample_rate = SAMPLE_RATE

    def __init__(self, default_voice: str = DEFAULT_VOICE, *, threads: int = 1) -> None:
        self._threads = max(1, threads)
        self._models: dict[str, Any] = {}
        self._load_lock = asyncio.Lock()
        self._closed = False
        # Looked up once: it stats files, which must not happen on the event loop per request.
        # A voice fetched while the server runs is offered after a restart.
        self._available = self._scan_voices()
        self._check_voice(default_voice)
        self.default_voice = default_voice
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts-hibari")

    # -- voices ---------------------------------------------------------------------------------
    @staticmethod
    def _scan_voices() -> dict[str, dict[str, Any]]:
        registry = _registry()
        if _downloads_allowed():
            return registry
        return {vid: meta for vid, meta in registry.items() if _local_model_path(vid) is not None}

    def _check_voice(self, voice: str) -> None:
        available = self._available
        if voice in available:
            return
        valid = ", ".join(sorted(available))
        if voice in _registry():
            raise TtsError(
                f"hibari voice {voice!r} is not downloaded and downloads are off. Valid voices: {valid}. "
                f"Fetch it once with `hibari --voice {voice} hi -o /dev/null` or set RTCVOICE_ALLOW_DOWNLOADS=1.",
                code="unknown_voice",
            )
        raise TtsError(f"Unknown hibari voice {voice!r}. Valid voices: {valid}.", code="unknown_voice")

    def voices(self) -> list[Voice]:
        return [
            Voice(
                id=vid,
                name=f"{vid.title()} ({meta.get('accent', 'English')})",
                gender=str(meta.get("gender", "unknown")),
                language=str(meta.get("language", "en-US")),
                engine=self.name,
                online=False,
            )
            for vid, meta in self._available.items()
        ]

    # -- model ----------------------------------------------------------------------------------
    def _load(self, voice: str) -> Any:
        # An explicit model path means hibari itself can never decide to download.
        path = _local_model_path(voice)
        if path is None:
            path = str(voice_path(voice))  # only reached when downloads are allowed
        model = Hibari(voice=voice, model=path, threads=self._threads)
        # The G2P (lexicons, tagger) loads lazily on first use; touch it here so the first real
        # sentence does not pay for it.
        model.phonemize("Hi.")
        return model

    async def _model(self, voice: str) -> Any:
        model = self._models.get(voice)
        if model is not None:
            return model
        async with self._load_lock:
            model = self._models.get(voice)
            if model is None:
                loop = asyncio.get_running_loop()
                try:
                    model = await loop.run_in_executor(self._executor, self._load, voice)
                except Exception as exc:
                    raise TtsError(f"Could not load hibari voice {voice!r}: {exc}") from exc
                self._models[voice] = model
                log.info("tts: hibari voice %s loaded", voice)
        return model

    # -- synthesis ------------------------------------------------------------------------------
    @staticmethod
    def _render(model: Any, phonemes: str, speed: float, rng: np.random.Generator) -> FloatAudio:
        audio = model.from_ids(model.ids(phonemes), speed, rng)
        return np.ascontiguousarray(audio, dtype=np.float32)

    async def synthesize(
        self, text: str, *, voice: str | None = None, speed: float = 1.0
    ) -> AsyncIterator[FloatAudio]:
        if self._closed:
            raise TtsError("hibari TTS is closed")
        voice = voice or self.default_voice
        if voice not in self._models:
            self._check_voice(voice)
        if not text.strip():
            return
        model = await self._model(voice)
        speed = min(_MAX_SPEED, max(_MIN_SPEED, float(speed)))
        rng = np.random.default_rng()
        loop = asyncio.get_running_loop()
        # Sentence by sentence, so the first sentence plays while the rest is still being made;
        # phonemize() further splits an over-long sentence at clauses (the model's input limit).
        for sentence in Hibari.split_sentences(text):
            try:
                chunks: list[str] = await loop.run_in_executor(self._executor, model.phonemize, sentence)
            except Exception as exc:
                raise TtsError(f"hibari could not phonemize {sentence[:60]!r}: {exc}") from exc
            for phonemes in chunks:
                try:
                    audio = await loop.run_in_executor(
                        self._executor, self._render, model, phonemes, speed, rng
                    )
                except Exception as exc:
                    raise TtsError(f"hibari synthesis failed for {sentence[:60]!r}: {exc}") from exc
                if audio.size:
                    yield audio

    async def warm_up(self) -> None:
        async for _ in self.synthesize("Hello.", voice=self.default_voice):
            pass

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._models.clear()
        # Waiting for an in-flight sentence must not block the loop: do the join in a thread.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
