"""``rtcvoice bench --floor``: the CPU one call's parts need, each run alone in this process.

What a server cannot avoid per call-second of a WebRTC voice call, measured with the same
libraries a call runs (aiortc's Opus codec over libopus, PyAV's resampler, rtcvoice's Silero,
pylibsrtp over libsrtp2) on the questions' own speech:

* ``opus_decode``: 50 inbound packets (the caller's 20 ms frames), decoded as aiortc does;
* ``resample_in``: the decoded 48 kHz audio to 16 kHz mono for the VAD and STT;
* ``silero``: one speech probability per 32 ms window;
* ``opus_encode``: 50 outbound frames of speech, with the encoder the server's track runs (mono,
  32 kb/s; ``OpusAudioTrack``), every frame encoded, as if the AI spoke the whole second (the
  track encodes no frame of steady silence, so a call's real need is less);
* ``srtp``: unprotecting the 50 inbound packets and protecting the 50 outbound ones.

Their sum is the media floor per call-second. Transcription is per turn, not per second: the
floor of a turn is one Whisper pass over its utterance with the server's model and threads,
``stt_cpu_s`` (CPU seconds, every thread counted). A workload of T turns in C call-seconds has
the floor ``media + T x stt / C`` CPU seconds per call-second; ``bench/peers/compare.py`` sets
that beside what the server used, and capacity beside the capacity that floor allows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np

from .audio import WEBRTC_RATE, Int16Audio, StreamResampler, int16_to_float, resample_pcm
from .transports.tracks import opus_encoder, pcm_frame

FRAME = WEBRTC_RATE // 50  # 20 ms


def _cpu(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Least CPU seconds of ``repeat`` runs of ``fn`` (all threads of this process)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def _frames(pcm48: Int16Audio) -> list[av.AudioFrame]:
    return [pcm_frame(pcm48[i : i + FRAME], i) for i in range(0, pcm48.size - FRAME + 1, FRAME)]


def media_floor(speech: Int16Audio, rate: int) -> dict[str, float]:
    """CPU seconds per call-second of each media part, on ``speech`` (looped to 10 s or more)."""
    from aiortc.codecs.opus import OpusDecoder
    from aiortc.jitterbuffer import JitterFrame
    from pylibsrtp import Policy, Session

    from .engines.vad import SileroVad

    pcm48 = resample_pcm(speech, rate, WEBRTC_RATE)
    while pcm48.size < 10 * WEBRTC_RATE:
        pcm48 = np.concatenate([pcm48, pcm48])
    frames = _frames(pcm48)
    seconds = len(frames) / 50.0

    # What the caller sends: mono Opus at a voice bitrate, as browsers and rtcvoice's caller do.
    encoder = opus_encoder()
    packets = [bytes(p) for frame in frames for p in encoder.encode(frame)]

    def encode() -> None:
        enc = opus_encoder()
        for frame in frames:
            enc.encode(frame)

    decoded: list[Any] = []

    def decode() -> None:
        dec = OpusDecoder()
        decoded.clear()
        for i, payload in enumerate(packets):
            decoded.extend(dec.decode(JitterFrame(data=payload, timestamp=i * FRAME)))

    decode_s = _cpu(decode)
    pcm16: list[Int16Audio] = []

    def resample() -> None:
        resampler = StreamResampler(16_000)
        pcm16.clear()
        pcm16.extend(resampler.frame(f) for f in decoded)

    resample_s = _cpu(resample)
    audio16 = int16_to_float(np.concatenate(pcm16))
    vad = SileroVad()

    def silero() -> None:
        stream = vad.stream()
        for i in range(0, audio16.size, 320):  # 20 ms at a time, as frames arrive
            stream.process(audio16[i : i + 320])

    key = bytes(range(30))
    rtp = [
        bytes([0x80, 111])
        + (i & 0xFFFF).to_bytes(2, "big")
        + (i * FRAME).to_bytes(4, "big")
        + b"\x01\x02\x03\x04"
        + p
        for i, p in enumerate(packets)
    ]

    def srtp() -> None:
        tx = Session(policy=Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
        rx = Session(policy=Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND))
        for packet in rtp:  # what the caller sends: the server unprotects it
            rx.unprotect(tx.protect(packet))

    # srtp() protects and unprotects each packet once: as much work as the server's unprotect of
    # its inbound packets and protect of its outbound ones.
    srtp_pair_s = _cpu(srtp)
    parts = {
        "opus_decode": decode_s,
        "resample_in": resample_s,
        "silero": _cpu(silero),
        "opus_encode": _cpu(encode),
        "srtp": srtp_pair_s,
    }
    per_s = {k: round(v / seconds, 5) for k, v in parts.items()}
    per_s["media_total"] = round(sum(per_s.values()), 5)
    return per_s


def stt_floor(utterances: list[tuple[str, Int16Audio, int]], threads: int = 0) -> float:
    """Median CPU seconds of one Whisper pass over an utterance (the server's model and threads)."""
    import asyncio

    from .engines.blas import hold_blas_to_one_thread
    from .engines.stt.whisper import WhisperStt

    hold_blas_to_one_thread()  # as the server does (load_engines)
    stt = WhisperStt(threads=threads)

    async def run() -> list[float]:
        clips = [int16_to_float(resample_pcm(pcm, rate, 16_000)) for _t, pcm, rate in utterances]
        await stt.transcribe(clips[0])  # loads and warms the model
        costs = []
        for clip in clips:
            t0 = time.process_time()
            await stt.transcribe(clip)
            costs.append(time.process_time() - t0)
        await stt.aclose()
        return costs

    return round(float(np.median(asyncio.run(run()))), 4)


def report(utterances: list[tuple[str, Int16Audio, int]], threads: int = 0) -> dict[str, Any]:
    speech = np.concatenate([pcm for _t, pcm, _r in utterances])
    media = media_floor(speech, utterances[0][2])
    return {"media_cpu_s_per_call_s": media, "stt_cpu_s_per_turn": stt_floor(utterances, threads)}


def text(floor: dict[str, Any]) -> str:
    media = floor["media_cpu_s_per_call_s"]
    lines = ["part            CPU ms per call-second"]
    lines += [f"{k:<16}{v * 1000:>8.2f}" for k, v in media.items()]
    lines.append(f"stt (per turn)  {floor['stt_cpu_s_per_turn'] * 1000:>8.1f} ms CPU")
    return "\n".join(lines)
