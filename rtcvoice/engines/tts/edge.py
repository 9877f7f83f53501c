"""Microsoft Edge's online voices through ``edge-tts`` (needs the internet unless ``edge_tts_url``
points at a local or proxy endpoint).

The service streams 24 kHz 48 kbit/s mono MP3 over a WebSocket. Each network chunk is fed to an
incremental PyAV MP3 parser/decoder as it arrives, so the first audio is yielded long before the
whole sentence has been received. Decoding runs in the engine's small executor, off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import av
import edge_tts
import edge_tts.communicate
import numpy as np
from edge_tts.constants import TRUSTED_CLIENT_TOKEN
from edge_tts.exceptions import EdgeTTSException

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
    ("hi-IN-SwaraNeural", "Swara", "female"),
    ("hi-IN-MadhurNeural", "Madhur", "male"),
    ("es-ES-ElviraNeural", "Elvira", "female"),
    ("fr-FR-DeniseNeural", "Denise", "female"),
    ("de-DE-KatjaNeural", "Katja", "female"),
)

_original_wss_url: str | None = None


def _use_endpoint(url: str) -> str:
    """Point edge_tts at ``url`` for this process; returns the URL as edge_tts will use it.

    edge_tts has no endpoint parameter: on every connection ``Communicate`` builds
    ``f"{WSS_URL}&ConnectionId=...&Sec-MS-GEC=...&Sec-MS-GEC-Version=..."`` from the global
    ``WSS_URL`` of ``edge_tts.communicate`` (imported there by name, so patching
    ``edge_tts.constants`` would have no effect). Rebinding that module global is the least
    invasive hook: no private API, no subclassing of the name-mangled ``__stream``. It is
    process-wide, which matches edge_tts_url being a server setting. Because the client appends
    ``&...``, the URL must already carry a query; when it has none, the trusted-client token is
    added, so a pass-through proxy to Microsoft still works and a local server can ignore it.
    """
    global _original_wss_url
    module_globals = vars(edge_tts.communicate)
    if "?" not in url:
        url = f"{url}?TrustedClientToken={TRUSTED_CLIENT_TOKEN}"
    current = str(module_globals["WSS_URL"])
    if _original_wss_url is None:
        _original_wss_url = current
    elif current not in (url, _original_wss_url):
        log.warning("tts: edge endpoint changed from %s to %s for the whole process", current, url)
    module_globals["WSS_URL"] = url
    return url


def _restore_endpoint(url: str) -> None:
    global _original_wss_url
    module_globals = vars(edge_tts.communicate)
    # Only undo our own change: another engine may have set a different endpoint since.
    if _original_wss_url is not None and module_globals["WSS_URL"] == url:
        module_globals["WSS_URL"] = _original_wss_url
        _original_wss_url = None


def _rate(speed: float) -> str:
    # Edge expresses speed as a signed percentage relative to normal ("+25%", "-20%"); the
    # service honours half to double speed.
    percent = round((max(0.5, min(2.0, speed)) - 1.0) * 100)
    return f"{percent:+d}%"


_ID3_HEADER = 10


def _id3_size(header: bytes) -> int:
    """Total length of an ID3v2 tag from its 10-byte header (sizes are 7-bit "syncsafe")."""
    size = 0
    for b in header[6:10]:
        size = (size << 7) | (b & 0x7F)
    has_footer = bool(header[5] & 0x10)
    return _ID3_HEADER + size + (_ID3_HEADER if has_footer else 0)


class _Mp3Decoder:
    """Incremental MP3 -> float32 mono at ``rate``; not thread-safe, used by one synthesis."""

    def __init__(self, rate: int) -> None:
        self._codec: Any = av.CodecContext.create("mp3", "r")
        self._resampler: Any = av.AudioResampler(format="flt", layout="mono", rate=rate)
        self._head: bytes | None = b""  # the first bytes, until we know whether an ID3 tag leads
        self._skip = 0

    def _frames_to_audio(self, frames: list[Any]) -> FloatAudio:
        parts: list[FloatAudio] = []
        for frame in frames:
            for out in self._resampler.resample(frame):
                parts.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        if not parts:
            return np.zeros(0, np.float32)
        return np.concatenate(parts)

    def feed(self, data: bytes) -> FloatAudio:
        if self._head is not None:
            # FFmpeg's MP3 parser does not skip an ID3v2 tag (its demuxer does), so a stream that
            # starts with one must lose it here. Edge sends bare frames; proxies/servers may not.
            self._head += data
            if len(self._head) < _ID3_HEADER:
                return np.zeros(0, np.float32)
            data, self._head = self._head, None
            if data.startswith(b"ID3"):
                self._skip = _id3_size(data[:_ID3_HEADER])
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        frames: list[Any] = []
        for packet in self._codec.parse(data):
            frames.extend(self._codec.decode(packet))
        return self._frames_to_audio(frames)

    def flush(self) -> FloatAudio:
        rest = b""
        if self._head:
            # The whole stream was shorter than an ID3 header: let the decoder judge it.
            rest, self._head = self._head, None
        frames: list[Any] = []
        # parse(None) emits the parser's last buffered frame, decode(None) drains the decoder.
        for packet in [*self._codec.parse(rest), *self._codec.parse(None)]:
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
            raise TtsError(f"edge-tts rejected voice {voice!r}: {exc}", code="unknown_voice") from exc

        loop = asyncio.get_running_loop()
        decoder = await loop.run_in_executor(self._executor, _Mp3Decoder, self.sample_rate)
        try:
            # aclosing: a consumer that stops early (barge-in) closes the WebSocket now, not at GC.
            async with contextlib.aclosing(communicate.stream()) as messages:
                async for message in messages:
                    if message["type"] != "audio":
                        continue
                    audio = await loop.run_in_executor(self._executor, decoder.feed, message["data"])
                    if audio.size:
                        yield audio
        except (EdgeTTSException, aiohttp.ClientError, TimeoutError) as exc:
            raise TtsError(f"edge-tts failed ({type(exc).__name__}): {exc}") from exc
        except av.FFmpegError as exc:
            raise TtsError(f"edge-tts sent MP3 that does not decode: {exc}") from exc
        try:
            tail = await loop.run_in_executor(self._executor, decoder.flush)
        except av.FFmpegError as exc:
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
