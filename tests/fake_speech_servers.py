"""Real, local speech servers for tests: aiohttp on 127.0.0.1, random free ports, real wire formats.

- ``FakeOpenAISpeech``: OpenAI-compatible ``/v1/audio/speech`` (raw 24 kHz s16le PCM, streamed in
  several odd-sized chunks) and ``/v1/audio/transcriptions`` (multipart WAV in, JSON text out).
- ``FakeEdgeServer``: the WebSocket protocol edge-tts speaks to Microsoft's read-aloud service:
  ``speech.config`` and ``ssml`` text messages in; ``turn.start``, binary ``Path:audio`` messages
  (2-byte big-endian header length, headers, MP3), ``audio.metadata`` and ``turn.end`` out. The MP3
  is hibari speech of the requested text, encoded with PyAV's libmp3lame at the service's format
  (24 kHz, 48 kbit/s, mono, bare frames).

Nothing is mocked: the engines under test talk to these exactly as to the real services.

    async with FakeOpenAISpeech(transcript="hello") as fake:
        tts = OpenAISpeechTts(base_url=fake.base_url)
        ...
        assert fake.speech_requests[-1]["voice"] == "alloy"
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import uuid
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from types import TracebackType
from typing import Any, Self
from xml.sax.saxutils import unescape

import av
import numpy as np
import numpy.typing as npt
from aiohttp import WSMsgType, web

FloatAudio = npt.NDArray[np.float32]
SPEECH_RATE = 24_000

# -- audio helpers ----------------------------------------------------------------------------------


def tone(text: str, rate: int = SPEECH_RATE) -> FloatAudio:
    """A deterministic stand-in for speech: 440 Hz, 0.4 s plus 50 ms per character of ``text``."""
    n = int(rate * (0.4 + 0.05 * len(text)))
    t = np.arange(n, dtype=np.float64) / rate
    return (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


@lru_cache(maxsize=1)
def _hibari() -> Any:
    from hibari import Hibari

    return Hibari()


def hibari_speech(text: str) -> FloatAudio:
    """``text`` spoken by hibari's bundled voice, reproducibly (fixed noise seed)."""
    return np.asarray(_hibari()(text, seed=0), dtype=np.float32)


def float_to_pcm16(audio: FloatAudio) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def mp3_encode(audio: FloatAudio, rate: int = SPEECH_RATE, bit_rate: int = 48_000) -> bytes:
    """MP3 as Edge's service sends it: bare MPEG frames, no ID3 tag, no Xing header."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3", options={"id3v2_version": "0", "write_xing": "0"}) as out:
        stream: Any = out.add_stream("libmp3lame", rate=rate, layout="mono")
        stream.bit_rate = bit_rate
        frame = av.AudioFrame.from_ndarray(audio.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def chunk(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# -- common lifecycle -------------------------------------------------------------------------------


class _LocalServer:
    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.port = 0

    def _app(self) -> web.Application:
        raise NotImplementedError

    async def start(self) -> Self:
        runner = web.AppRunner(self._app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


# -- OpenAI-compatible speech + transcription -------------------------------------------------------


@dataclass
class Transcription:
    """What one ``/audio/transcriptions`` request carried."""

    model: str
    language: str | None
    filename: str
    content_type: str
    sample_rate: int
    channels: int
    sample_width: int
    audio: FloatAudio
    authorization: str

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass
class SpeechRequest:
    body: dict[str, Any]
    authorization: str
    sent_bytes: int = 0
    chunks: list[int] = field(default_factory=list)


class FakeOpenAISpeech(_LocalServer):
    """``speech(text) -> float audio at 24 kHz`` decides what is spoken (default: ``tone``).

    ``fail_status`` makes both endpoints answer with that HTTP status and an OpenAI error body.
    """

    def __init__(
        self,
        *,
        transcript: str = "hello world",
        speech: Callable[[str], FloatAudio] = tone,
        chunk_bytes: int = 4801,  # odd on purpose: clients must carry half samples over
        fail_status: int | None = None,
    ) -> None:
        super().__init__()
        self.transcript = transcript
        self.speech = speech
        self.chunk_bytes = chunk_bytes
        self.fail_status = fail_status
        self.speech_requests: list[SpeechRequest] = []
        self.transcriptions: list[Transcription] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/audio/speech", self._speech)
        app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        return app

    def _error(self, status: int, message: str) -> web.Response:
        return web.json_response(
            {"error": {"message": message, "type": "invalid_request_error", "code": None}}, status=status
        )

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        record = SpeechRequest(body=body, authorization=request.headers.get("Authorization", ""))
        self.speech_requests.append(record)
        if self.fail_status is not None:
            return self._error(self.fail_status, "speech is failing on purpose")
        if body.get("response_format") != "pcm":
            return self._error(400, f"this fake only speaks pcm, not {body.get('response_format')!r}")
        audio = await asyncio.to_thread(self.speech, str(body["input"]))
        pcm = float_to_pcm16(audio)
        response = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
        await response.prepare(request)
        for part in chunk(pcm, self.chunk_bytes):
            await response.write(part)
            record.sent_bytes += len(part)
            record.chunks.append(len(part))
            # Let each write leave as its own network read, as a real streaming server's would.
            await asyncio.sleep(0.002)
        await response.write_eof()
        return response

    async def _transcriptions(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        if not isinstance(upload, web.FileField):
            return self._error(400, "file must be an upload")
        raw = upload.file.read()
        with wave.open(io.BytesIO(raw), "rb") as w:
            frames = w.readframes(w.getnframes())
            record = Transcription(
                model=str(form.get("model", "")),
                language=str(form["language"]) if "language" in form else None,
                filename=upload.filename,
                content_type=upload.content_type,
                sample_rate=w.getframerate(),
                channels=w.getnchannels(),
                sample_width=w.getsampwidth(),
                audio=(np.frombuffer(frames, "<i2").astype(np.float32) / 32768.0).astype(np.float32),
                authorization=request.headers.get("Authorization", ""),
            )
        self.transcriptions.append(record)
        if self.fail_status is not None:
            return self._error(self.fail_status, "transcription is failing on purpose")
        return web.json_response({"text": self.transcript})


# -- Edge read-aloud WebSocket ----------------------------------------------------------------------


@dataclass
class EdgeRequest:
    """One synthesis over one WebSocket connection, as the server saw it."""

    query: dict[str, str]
    headers: dict[str, str]
    speech_config: dict[str, Any] | None = None
    voice: str = ""
    rate: str = ""
    text: str = ""
    mp3_total: int = 0  # the whole answer's MP3
    mp3_bytes: int = 0  # how much of it was sent
    audio_messages: int = 0
    closed: bool = False  # the client closed the WebSocket (or it dropped)


def _parse_text_message(message: str) -> tuple[dict[str, str], str]:
    head, _, body = message.partition("\r\n\r\n")
    headers = {}
    for line in head.split("\r\n"):
        key, _, value = line.partition(":")
        headers[key] = value
    return headers, body


def _text_message(
    path: str, request_id: str, body: str, content_type: str = "application/json; charset=utf-8"
) -> str:
    return f"X-RequestId:{request_id}\r\nContent-Type:{content_type}\r\nPath:{path}\r\n\r\n{body}"


def _audio_message(request_id: str, data: bytes) -> bytes:
    # The final audio message of a turn carries no Content-Type and no data, as the service's does.
    content_type = "Content-Type:audio/mpeg\r\n" if data else ""
    headers = (
        f"X-RequestId:{request_id}\r\n{content_type}X-StreamId:{uuid.uuid4().hex}\r\nPath:audio\r\n".encode()
    )
    return len(headers).to_bytes(2, "big") + headers + data


class FakeEdgeServer(_LocalServer):
    """``speech(text)`` makes the 24 kHz audio that is MP3-encoded and sent (default: hibari).

    ``send_audio=False`` ends the turn without audio, which the real service does for bad SSML.
    """

    PATH = "/consumer/speech/synthesize/readaloud/edge/v1"

    def __init__(
        self,
        *,
        speech: Callable[[str], FloatAudio] = hibari_speech,
        chunk_bytes: int = 2400,  # 0.4 s of 48 kbit/s MP3 per message
        send_audio: bool = True,
    ) -> None:
        super().__init__()
        self.speech = speech
        self.chunk_bytes = chunk_bytes
        self.send_audio = send_audio
        self.requests: list[EdgeRequest] = []
        self.sent_audio: list[FloatAudio] = []  # what was encoded, per request, for comparison

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.PATH}"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(self.PATH, self._websocket)
        return app

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        record = EdgeRequest(query=dict(request.query), headers=dict(request.headers))
        self.requests.append(record)
        # Answer in a task and keep reading, as the real service does: a client that closes
        # mid-answer (barge-in) gets its close acknowledged at once and the sending stops.
        answers: list[asyncio.Task[None]] = []
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                headers, body = _parse_text_message(msg.data)
                path = headers.get("Path")
                if path == "speech.config":
                    record.speech_config = json.loads(body)
                elif path == "ssml":
                    request_id = headers.get("X-RequestId", uuid.uuid4().hex)
                    answers.append(asyncio.create_task(self._answer(ws, record, request_id, body)))
                else:
                    await ws.close(code=1003, message=f"unknown path {path!r}".encode())
        finally:
            record.closed = True
            for task in answers:
                task.cancel()
            for task in answers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return ws

    async def _answer(
        self, ws: web.WebSocketResponse, record: EdgeRequest, request_id: str, ssml: str
    ) -> None:
        voice = re.search(r"<voice name='([^']*)'>", ssml)
        rate = re.search(r"rate='([^']*)'", ssml)
        text = re.search(r"<prosody[^>]*>(.*)</prosody>", ssml, re.S)
        record.voice = voice.group(1) if voice else ""
        record.rate = rate.group(1) if rate else ""
        record.text = unescape(text.group(1)) if text else ""

        await ws.send_str(_text_message("turn.start", request_id, '{"context":{"serviceTag":"fake"}}'))
        await ws.send_str(_text_message("response", request_id, '{"context":{"serviceTag":"fake"}}'))
        if self.send_audio:
            audio = await asyncio.to_thread(self.speech, record.text)
            self.sent_audio.append(audio)
            mp3 = await asyncio.to_thread(mp3_encode, audio)
            record.mp3_total = len(mp3)
            for part in chunk(mp3, self.chunk_bytes):
                await ws.send_bytes(_audio_message(request_id, part))
                record.mp3_bytes += len(part)
                record.audio_messages += 1
                await asyncio.sleep(0.002)
            ticks = int(len(audio) / SPEECH_RATE * 10_000_000)
            metadata = {
                "Metadata": [
                    {
                        "Type": "SentenceBoundary",
                        "Data": {
                            "Offset": 1_000_000,
                            "Duration": ticks,
                            "text": {
                                "Text": record.text,
                                "Length": len(record.text),
                                "BoundaryType": "SentenceBoundary",
                            },
                        },
                    }
                ]
            }
            await ws.send_str(_text_message("audio.metadata", request_id, json.dumps(metadata)))
        await ws.send_bytes(_audio_message(request_id, b""))
        await ws.send_str(_text_message("turn.end", request_id, '{"context":{"serviceTag":"fake"}}'))
