"""Microsoft Edge's online voices through ``edge-tts`` (needs the internet unless ``edge_tts_url``
points at a local or proxy endpoint).

The service streams 24 kHz 48 kbit/s mono MP3 over a WebSocket. Each network chunk is fed to an
incremental PyAV MP3 parser/decoder as it arrives, so the first audio is yielded long before the
whole sentence has been received. Decoding runs in the engine's small executor, off the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import numpy as np

from ..base import FloatAudio, TtsError, Voice

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
DEFAULT_VOICE = "en-US-AriaNeural"

# A few popular English voices, listed without contacting the service (edge_tts.list_voices()
# would). Any other Edge voice name also works in synthesize().
_VOICES: tuple[tuple[str, str, str], ...] = (
    ("en-US-AriaNeural", "Aria", "female"),
    ("en-US-JennyNeural", "Jenny", "female"),
    ("en-US-GuyNeural", "Guy", "male"),
    ("en-US-AvaNeural", "Ava", "female"),
    ("en-US-AndrewNeural", "Andrew", "male"),
    ("en-US-EmmaNeural", "Emma", "female"),
    ("en-US-BrianNeural", "Brian", "male"),
    ("en-US-ChristopherNeural", "Christopher", "male"),
    ("en-US-MichelleNeural", "Michelle", "female"),
    ("en-GB-SoniaNeural", "Sonia", "female"),
    ("en-GB-RyanNeural", "Ryan", "male"),
    ("en-AU-NatashaNeural", "Natasha", "female"),
    ("en-AU-WilliamNeural", "William", "male"),
    ("en-IN-NeerjaNeural", "Neerja", "female"),
)

_original_wss_url: str | None = None


def _use_endpoint(url: str) -> str:
    """Point edge_tts at ``url`` for this process.

    edge_tts offers no endpoint parameter: Communicate builds
    ``f"{WSS_URL}&ConnectionId=...&Sec-MS-GEC=...&Sec-MS-GEC-Version=..."`` from the module global
    ``edge_tts.communicate.WSS_URL`` each time it connects. Rebinding that global is therefore the
    one supported-by-construction hook, and it is process-wide (edge_tts_url is a server setting,
    so one value per process). Because the client appends ``&...``, the URL must already carry a
    query; the trusted-client token is added when it has none so a pass-through proxy still works.
    """
    global _original_wss_url
    import edge_tts.communicate as communicate
    from edge_tts.constants import TRUSTED_CLIENT_TOKEN

    if "?" not in url:
        url = f"{url}?TrustedClientToken={TRUSTED_CLIENT_TOKEN}"
    if _original_wss_url is None:
        _original_wss_url = communicate.WSS_URL
    elif communicate.WSS_URL not in (url, _original_wss_url):
        log.warning("tts: edge endpoint changed from %s to %s for the whole process", communicate.WSS_URL, url)
    communicate.WSS_URL = url
    return url


def _restore_endpoint(url: str) -> None:
    global _original_wss_url
    import edge_tts.communicate as communicate

    # Only undo our own change: another engine may have set a different endpoint since.
    if _original_wss_url is not None and communicate.WSS_URL == url:
        communicate.WSS_URL = _original_wss_url
        _original_wss_url = None


def _rate(speed: float) -> str:
    # Edge expresses speed as a signed percentage relative to normal ("+25%", "-20%").
    percent = round((max(0.25, min(4.0, speed)) - 1.0) * 100)
    return f"{percent:+d}%"


class _Mp3Decoder:
    """Incremental MP3 -> float32 mono at ``rate``; not thread-safe, used by one synthesis."""

    def __init__(self, rate: int) -> None:
        import av

        self._codec: Any = av.CodecContext.create("mp3", "r")
        self._resampler: Any = av.AudioResampler(format="flt", layout="mono", rate=rate)

    def _frames_to_audio(self, frames: list[Any]) -> FloatAudio:
        parts: list[FloatAudio] = []
        for frame in frames:
            for out in self._resampler.resample(frame):
                parts.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        if not parts:
            return np.zeros(0, np.float32)
        return np.concatenate(parts)

    def feed(self, data: bytes) -> FloatAudio:
        frames: list[Any] = []
        for packet in self._codec.parse(data):
            frames.extend(self._codec.decode(packet))
        return self._frames_to_audio(frames)

    def flush(self) -> FloatAudio:
        frames: list[Any] = []
        # parse(None) emits the parser's last buffered frame, decode(None) drains the decoder.
        for packet in self._codec.parse(None):
            frames.extend(self._codec.decode(packet))
        frames.extend(self._codec.decode(None))
        audio = self._frames_to_audio(frames)
        tail: list[FloatAudio] = [audio]
        for out in self._resampler.resample(None):
            tail.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        return np.concatenate(tail)


class EdgeTts:
    name = "edge"
    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        default_voice: str = DEFAULT_VOICE,
        *,
        url: str = "",
        connect_timeout_s: int = 10,
        receive_timeout_s: int = 30,
    ) -> None:
        self.default_voice = default_voice
        self._url = _use_endpoint(url) if url else ""
        self._connect_timeout_s = connect_timeout_s
        self._receive_timeout_s = receive_timeout_s
        # Decoding is light, but it is still C work on bytes: keep it off the loop. Two threads
        # let two sessions decode at once without one long queue.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tts-edge-mp3")
        self._closed = False

    def voices(self) -> list[Voice]:
        return [
            Voice(id=vid, name=name, gender=gender, language=vid[:5], engine=self.name, online=True)
            for vid, name, gender in _VOICES
        ]

    async def synthesize(
        self, text: str, *, voice: str | None = None, speed: float = 1.0
    ) -> AsyncIterator[FloatAudio]:
        if self._closed:
            raise TtsError("edge TTS is closed")
        if not text.strip():
            return
        import edge_tts
        from edge_tts.exceptions import EdgeTTSException

        voice = voice or self.default_voice
        try:
            communicate = edge_tts.Communicate(
                text,
                voice,
                rate=_rate(speed),
                connect_timeout=self._connect_timeout_s,
                receive_timeout=self._receive_timeout_s,
            )
        except ValueError as exc:
            raise TtsError(f"edge-tts rejected voice {voice!r} or speed {speed}: {exc}", code="unknown_voice") from exc

        loop = asyncio.get_running_loop()
        decoder = await loop.run_in_executor(self._executor, _Mp3Decoder, self.sample_rate)
        try:
            async for message in communicate.stream():
                if message["type"] != "audio":
                    continue
                audio = await loop.run_in_executor(self._executor, decoder.feed, message["data"])
                if audio.size:
                    yield audio
        except (EdgeTTSException, aiohttp.ClientError, TimeoutError) as exc:
            raise TtsError(f"edge-tts failed ({type(exc).__name__}): {exc}") from exc
        except Exception as exc:
            # av raises its own FFmpegError family for corrupt MP3: report it as the engine's error.
            import av

            if isinstance(exc, av.FFmpegError):
                raise TtsError(f"edge-tts sent MP3 that does not decode: {exc}") from exc
            raise
        try:
            tail = await loop.run_in_executor(self._executor, decoder.flush)
        except Exception as exc:
            raise TtsError(f"edge-tts MP3 did not decode to the end: {exc}") from exc
        if tail.size:
            yield tail

    async def warm_up(self) -> None:
        # Nothing to load, and a warm-up must not reach the network by itself.
        return None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._url:
            _restore_endpoint(self._url)
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
