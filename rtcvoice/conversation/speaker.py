"""Speaking a reply: TTS sentence by sentence into the call's audio sink, trimmed and timed.

The conversation hands over a queue of sentences (None ends it); the speaker synthesizes each,
trims the silence TTS engines pad around sentences, waits for the turn to be committed (a
speculative turn makes its audio early but plays none of it before the silence has ended the
turn), writes it to the sink and records which samples carry which sentence (what the caller
heard before a barge-in).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from ..audio import FloatAudio, Int16Audio, StreamResampler, float_to_int16, trim_silence
from ..engines.base import EngineError, TextToSpeech
from .turns import Turn

log = logging.getLogger(__name__)

FIRST_LEAD_S = 0.005  # silence kept before the first sound of a reply (no click, no delay)
GAP_LEAD_S = 0.1  # ...and before each later sentence, so they do not run together
GAP_TAIL_S = 0.15


class AudioSink(Protocol):
    """Where the AI's voice goes: the paced WebRTC track, or WebSocket binary frames."""

    sample_rate: int

    @property
    def queued(self) -> int:
        """Samples written but not yet played."""
        ...

    def write(self, pcm: Int16Audio) -> int:
        """Queue samples; returns the stream position just after them."""
        ...

    def flush(self) -> int:
        """Drop unplayed audio (and end a pause); returns the playhead position before the flush."""
        ...

    def pause(self) -> None:
        """Hold the playhead where it is (silence plays) until :meth:`resume` or :meth:`flush`."""
        ...

    def resume(self) -> None: ...

    def wait_played(self, position: int) -> asyncio.Future[bool]:
        """True once ``position`` is played, False if flushed first."""
        ...


async def speak(
    sink: AudioSink,
    tts: TextToSpeech,
    turn: Turn,
    sentences: asyncio.Queue[str | None],
    *,
    voice: str,
    speed: float,
    on_audio: Callable[[int, bool], None],
    on_error: Callable[[EngineError], None],
) -> None:
    """Speak every sentence; returns once the last sample is played (or flushed).

    ``on_audio`` gets the position of the first sample of each write, and whether it is the
    reply's first audio; ``on_error`` a TTS failure, after which the next sentence is tried.
    """
    resampler = StreamResampler(sink.sample_rate)
    piece_start: int | None = None
    last_position: int | None = None

    def play(chunk: FloatAudio) -> None:
        nonlocal piece_start, last_position
        # Sub-millisecond per chunk: cheaper inline than an executor hop.
        pcm = resampler.pcm(float_to_int16(chunk), tts.sample_rate)
        if pcm.size == 0:
            return
        if "tts_first_audio" in turn.marks and sink.queued == 0:
            turn.underruns += 1  # the caller heard a gap: audio came slower than real time
        position = sink.write(pcm)
        if piece_start is None:
            piece_start = position - pcm.size
        first = "tts_first_audio" not in turn.marks
        turn.mark("tts_first_audio")
        on_audio(position - pcm.size, first)
        last_position = position

    while (text := await sentences.get()) is not None:
        turn.mark("tts_start")
        piece_start = None
        held: FloatAudio | None = None
        first_chunk = True
        try:
            async for chunk in tts.synthesize(text, voice=voice, speed=speed):
                if first_chunk:
                    # TTS engines pad ~300 ms of silence in front of every sentence: the caller
                    # would hear it as latency on the first, as a long gap on the rest.
                    lead = FIRST_LEAD_S if not turn.spoken else GAP_LEAD_S
                    chunk = trim_silence(chunk, tts.sample_rate, keep_lead_s=lead, keep_tail_s=None)
                    first_chunk = False
                # One chunk is held back so the end of the piece can be trimmed too.
                if held is not None:
                    await turn.committed.wait()
                    play(held)
                held = chunk
        except EngineError as exc:
            log.warning("TTS failed: %s", exc)
            on_error(exc)
        if held is not None:
            await turn.committed.wait()
            play(trim_silence(held, tts.sample_rate, keep_lead_s=None, keep_tail_s=GAP_TAIL_S))
        if piece_start is not None and last_position is not None:
            turn.spoken.append((piece_start, last_position, text))
    tail = resampler.flush()
    if tail.size:
        last_position = sink.write(tail)
    if last_position is not None:
        await sink.wait_played(last_position)
