"""PCM helpers shared by transports and the conversation: conversions and resampling.

Resampling uses PyAV's ``AudioResampler`` (libswresample), which keeps filter state between
calls, so a stream resampled chunk by chunk has no clicks at chunk borders.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import numpy.typing as npt

Int16Audio = npt.NDArray[np.int16]
FloatAudio = npt.NDArray[np.float32]

STT_RATE = 16_000
WEBRTC_RATE = 48_000
FRAME_MS = 20


def float_to_int16(audio: FloatAudio) -> Int16Audio:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


def int16_to_float(audio: Int16Audio) -> FloatAudio:
    return audio.astype(np.float32) / 32768.0


def rms_dbfs(audio: Int16Audio | FloatAudio) -> float:
    """Loudness of a block in dBFS (-inf for digital silence)."""
    if audio.size == 0:
        return float("-inf")
    x = audio.astype(np.float64)
    if audio.dtype == np.int16:
        x /= 32768.0
    rms = float(np.sqrt(np.mean(x * x)))
    return 20.0 * np.log10(rms) if rms > 0 else float("-inf")


class StreamResampler:
    """Any av.AudioFrame (or mono int16 at ``in_rate``) to mono int16 at ``out_rate``."""

    def __init__(self, out_rate: int) -> None:
        self.out_rate = out_rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=out_rate)
        self._pts = 0

    def frame(self, frame: av.AudioFrame) -> Int16Audio:
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.int16, copy=False) if out else np.zeros(0, np.int16)

    def pcm(self, pcm: Int16Audio, in_rate: int) -> Int16Audio:
        if in_rate == self.out_rate:
            return pcm
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = in_rate
        frame.pts = self._pts
        self._pts += pcm.size
        return self.frame(frame)

    def flush(self) -> Int16Audio:
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(None)]
        return np.concatenate(out).astype(np.int16, copy=False) if out else np.zeros(0, np.int16)


def read_wav(path: str | Path) -> tuple[Int16Audio, int]:
    """Mono int16 samples and sample rate of a 16-bit PCM WAV (stereo is downmixed)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        rate, channels = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return data.astype(np.int16), rate


def write_wav(path: str | Path | BinaryIO, pcm: Int16Audio, rate: int) -> None:
    with wave.open(path if not isinstance(path, str | Path) else str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())


def wav_bytes(pcm: Int16Audio, rate: int) -> bytes:
    """A whole WAV file in memory: for players and APIs that need a container, not raw PCM."""
    buf = io.BytesIO()
    write_wav(buf, pcm, rate)
    return buf.getvalue()


def resample_pcm(pcm: Int16Audio, in_rate: int, out_rate: int) -> Int16Audio:
    """One-shot resampling of a whole buffer."""
    if in_rate == out_rate:
        return pcm
    r = StreamResampler(out_rate)
    return np.concatenate([r.pcm(pcm, in_rate), r.flush()])


AUDIBLE_RMS = 0.003  # -50 dBFS


def audible_bounds(
    audio: FloatAudio, rate: int, threshold: float = AUDIBLE_RMS, block_ms: int = 10
) -> tuple[int, int] | None:
    """(first, last) sample of the audible part: the span of 10 ms blocks louder than ``threshold`` RMS."""
    block = max(1, rate * block_ms // 1000)
    n = audio.size // block
    if n == 0:
        return None
    energy = np.sqrt(np.mean(audio[: n * block].reshape(n, block).astype(np.float64) ** 2, axis=1))
    loud = np.flatnonzero(energy > threshold)
    if loud.size == 0:
        return None
    return int(loud[0] * block), int(min(audio.size, (loud[-1] + 1) * block))


def framed_speech(audio: FloatAudio, rate: int, *, lead_s: float, tail_s: float) -> FloatAudio:
    """The audible part of ``audio`` with exactly ``lead_s`` before it and ``tail_s`` after it
    (zeros where ``audio`` had less), cut at its first and last loud sample.

    The cut is found to the sample, not to the 10 ms block, so the same speech gives the same
    samples however much silence came with it and wherever its blocks started: a transport that
    hands over a whole recording and one whose voice detection cut the utterance out of a stream
    give the transcriber the same input.
    """
    bounds = audible_bounds(audio, rate)
    if bounds is None:
        return audio
    first, last = bounds
    block = rate // 100
    loud = np.flatnonzero(np.abs(audio[max(0, first - block) : first + block]) > AUDIBLE_RMS)
    if loud.size:
        first = max(0, first - block) + int(loud[0])
    loud = np.flatnonzero(np.abs(audio[max(0, last - 2 * block) : last]) > AUDIBLE_RMS)
    if loud.size:
        last = max(0, last - 2 * block) + int(loud[-1]) + 1
    lead, tail = round(lead_s * rate), round(tail_s * rate)
    start, end = first - lead, last + tail
    before = np.zeros(max(0, -start), audio.dtype)
    after = np.zeros(max(0, end - audio.size), audio.dtype)
    return np.concatenate([before, audio[max(0, start) : min(audio.size, end)], after])


def trim_silence(
    audio: FloatAudio, rate: int, *, keep_lead_s: float | None, keep_tail_s: float | None
) -> FloatAudio:
    """Cut leading/trailing silence down to at most ``keep_*_s`` (None leaves that side alone)."""
    bounds = audible_bounds(audio, rate)
    if bounds is None:
        return audio
    first, last = bounds
    start = 0 if keep_lead_s is None else max(0, first - int(keep_lead_s * rate))
    end = audio.size if keep_tail_s is None else min(audio.size, last + int(keep_tail_s * rate))
    return audio[start:end]
