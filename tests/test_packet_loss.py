"""Lost inbound packets become concealment as long as what was lost, never a hole.

The packets are aiortc's own Opus encoding of real speech, decoded by aiortc's own decoder, as
the receiver does; only the network between them drops packets."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import pytest
from conftest import ServerFactory, echo_agent
from speech import speak

from rtcvoice.audio import STT_RATE, resample_pcm, rms_dbfs
from rtcvoice.client import VoiceCallClient
from rtcvoice.engines.tts.tone import ToneTts
from rtcvoice.transports.jitter import (
    ArrivalOrderBuffer,
    ConcealingBuffer,
    JitterBuffer,
    ReorderBuffer,
    opus_samples,
    with_lost_frames,
)

FRAME = 960  # 20 ms at 48 kHz, aiortc's and browsers' Opus frame


@dataclass
class Packet:  # the parts of an aiortc RtpPacket a jitter buffer reads
    sequence_number: int
    timestamp: int
    _data: bytes
    payload_type: int = 111


def opus_packets(pcm: np.ndarray, rate: int) -> list[Packet]:
    from aiortc.codecs.opus import OpusEncoder

    encoder = OpusEncoder()
    audio = resample_pcm(pcm, rate, 48000)
    packets: list[Packet] = []
    start = 40_000  # RTP time starts anywhere; near the top it wraps, as below
    for i in range(audio.size // FRAME):
        frame = av.AudioFrame.from_ndarray(audio[i * FRAME : (i + 1) * FRAME].reshape(1, -1), layout="mono")
        frame.sample_rate, frame.pts = 48000, i * FRAME
        payloads, _ts = encoder.encode(frame)
        packets += [Packet((65_530 + i) % 65_536, (2**32 - start + i * FRAME) % 2**32, p) for p in payloads]
    return packets


def decode(buffer: object, packets: list[Packet]) -> np.ndarray:
    from aiortc.codecs.opus import OpusDecoder

    decoder = OpusDecoder()
    out: list[np.ndarray] = []
    for packet in packets:
        _pli, frame = buffer.add(packet)  # type: ignore[attr-defined]
        if frame is not None:
            out += [f.to_ndarray().reshape(-1, 2)[:, 0] for f in decoder.decode(frame)]
    return np.concatenate(out)


@pytest.fixture(scope="module")
def packets() -> list[Packet]:
    return opus_packets(
        *speak("The quick brown fox jumps over the lazy dog near the river bank.", tail_s=0.0)
    )


def test_the_toc_says_how_long_a_packet_is_and_lost_frames_are_zero_length_frames(
    packets: list[Packet],
) -> None:
    data = packets[10]._data
    assert opus_samples(data) == FRAME and data[0] & 3 == 0
    repacked = with_lost_frames(data, 2)
    assert opus_samples(repacked) == 3 * FRAME
    assert repacked[1:4] == bytes([0x80 | 3, 0, 0]) and repacked[4:] == data[1:]


@pytest.mark.parametrize("buffer", ["arrival", "reorder-4"])
def test_lost_packets_are_concealed_for_as_long_as_they_lasted(packets: list[Packet], buffer: str) -> None:
    speaking = [i for i, p in enumerate(packets) if i > 5 and i + 5 < len(packets)]
    # One packet lost in the middle of a word, then two in a row, then five in a row.
    lost = {speaking[10], speaking[30], speaking[31], *speaking[50:55]}
    kept = [p for i, p in enumerate(packets) if i not in lost]

    def inner() -> object:
        return ArrivalOrderBuffer() if buffer == "arrival" else ReorderBuffer(4)

    whole = decode(inner(), packets)
    bare = decode(inner(), kept)
    concealing = ConcealingBuffer(inner())
    concealed = decode(concealing, kept)
    # Without concealment the audio after each loss comes early: the stream is 8 frames short.
    assert whole.size - bare.size == len(lost) * FRAME
    assert concealed.size == whole.size, (concealed.size - whole.size) / FRAME
    assert concealing.concealed == len(lost) * FRAME
    # And it lines up with what was sent: the frames after the losses are where they belong.
    after = (speaking[56] - (whole.size - concealed.size) // FRAME) * FRAME
    tail = slice(after, after + 20 * FRAME)
    assert np.corrcoef(whole[tail], concealed[tail])[0, 1] > 0.9
    # The single lost frame is not silence: the decoder carried the voice into it, fading (CELT's
    # concealment measured 16 dB under the lost frame here; a zero fill is below -90 dBFS).
    gap = slice(speaking[10] * FRAME, (speaking[10] + 1) * FRAME)
    assert rms_dbfs(whole[gap]) > -40
    assert rms_dbfs(concealed[gap]) > rms_dbfs(whole[gap]) - 25, (
        rms_dbfs(concealed[gap]),
        rms_dbfs(whole[gap]),
    )


def test_aiortcs_own_jitter_buffer_loses_far_more_than_the_packet_lost(packets: list[Packet]) -> None:
    """Why --jitter-buffer-frames no longer uses it (README: it made recognition worse)."""
    lost = {20}
    kept = [p for i, p in enumerate(packets) if i not in lost]
    whole = decode(JitterBuffer(capacity=16, prefetch=4), packets)
    bare = decode(JitterBuffer(capacity=16, prefetch=4), kept)
    assert whole.size - bare.size >= 5 * FRAME
    ours = decode(ConcealingBuffer(ReorderBuffer(4)), kept)
    assert ours.size == decode(ReorderBuffer(4), packets).size


@pytest.mark.parametrize("depth", [0, 3])
def test_a_late_or_repeated_packet_is_not_concealed_twice(packets: list[Packet], depth: int) -> None:
    """Arriving late by one: with no buffer it is concealed and dropped; with one, put in place."""
    concealing = ConcealingBuffer(ArrivalOrderBuffer() if depth == 0 else ReorderBuffer(depth))
    order = list(range(20))
    order[8], order[9] = order[9], order[8]  # 8 comes after 9
    order.insert(12, 11)  # 11 again
    decoded = decode(concealing, [packets[i] for i in order])
    assert decoded.size == (20 - depth) * FRAME
    assert concealing.concealed == (FRAME if depth == 0 else 0)


def test_speech_resampled_for_whisper_keeps_its_length(packets: list[Packet]) -> None:
    from rtcvoice.audio import StreamResampler

    kept = [p for i, p in enumerate(packets) if i % 10 != 5]
    resampler = StreamResampler(STT_RATE)
    concealed = decode(ConcealingBuffer(ArrivalOrderBuffer()), kept)
    frame = av.AudioFrame.from_ndarray(concealed.reshape(1, -1).astype(np.int16), layout="mono")
    frame.sample_rate = 48000
    assert abs(resampler.frame(frame).size + resampler.flush().size - len(packets) * FRAME // 3) <= 16


def test_a_pcmu_stream_is_passed_on_as_it_came() -> None:
    concealing = ConcealingBuffer(ArrivalOrderBuffer(), is_opus=lambda pt: pt == 111)
    for seq in (1, 2, 4):  # 3 is lost; G.711 bytes have no TOC to repack
        payload = bytes([seq]) * 160
        _pli, frame = concealing.add(Packet(seq, seq * 160, payload, payload_type=0))
        assert frame is not None and frame.data == payload
    assert concealing.concealed == 0


def drop_inbound_rtp(client: VoiceCallClient, share: float, seed: int) -> list[int]:
    """Lose ``share`` of the RTP packets reaching the client (SRTP headers are in clear; STUN,
    DTLS and RTCP pass, RFC 7983); returns a one-item list counting the drops."""
    assert client.pc is not None
    connection = client.pc.getTransceivers()[0].sender.transport.transport._connection
    rng = random.Random(seed)
    dropped = [0]
    for protocol in connection._protocols:
        receive = protocol.datagram_received

        def lossy(data: bytes, addr: Any, receive: Any = receive) -> None:
            rtp = 128 <= data[0] <= 191 and not 192 <= data[1] <= 223
            if rtp and rng.random() < share:
                dropped[0] += 1
                return
            receive(data, addr)

        protocol.datagram_received = lossy
    return dropped


def tone_span_s(pcm: np.ndarray) -> float:
    """From the first to the last 20 ms frame that carries sound: how long the reply lasted."""
    loud = [i for i in range(pcm.size // FRAME) if rms_dbfs(pcm[i * FRAME : (i + 1) * FRAME]) > -40]
    return (loud[-1] - loud[0] + 1) * FRAME / 48_000 if loud else 0.0


async def test_a_reply_over_a_lossy_link_reaches_the_caller_as_long_as_it_was_sent(
    start_server: ServerFactory,
) -> None:
    """10% of the server's packets lost on the way: the caller's recording of the reply lasts as
    long as over a clean link (the losses concealed), not 10% less (the losses cut out)."""
    url = await start_server(agent=echo_agent(), tts=ToneTts())
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    spans: list[float] = []
    drops = 0
    for share in (0.0, 0.1):
        client = VoiceCallClient(url)
        await client.connect()
        dropped = drop_inbound_rtp(client, share, seed=5)
        try:
            client.send({"type": "text_message", "content": words})
            await client.wait_count("end_of_response", 1, 30)
            await asyncio.sleep(0.6)  # the last frames are in flight behind the event
        finally:
            await client.close()
        spans.append(tone_span_s(client.received.pcm()))
        drops += dropped[0]
    clean, lossy = spans
    assert clean > 1.5, spans  # "You said: ..." at 0.12 s a word
    assert drops > 10, drops  # the link did lose packets
    assert abs(lossy - clean) <= 0.06, spans  # 10% lost would be ~0.2 s short


def test_the_adaptive_buffer_waits_only_once_packets_come_out_of_order_and_gives_the_wait_back_whole(
    packets: list[Packet],
) -> None:
    from aiortc.codecs.opus import OpusDecoder

    adaptive = ReorderBuffer(0, adaptive_max=4, quiet_packets=30)
    concealing = ConcealingBuffer(adaptive)
    decoder = OpusDecoder()
    order = list(range(len(packets)))
    order[10], order[11] = order[11], order[10]  # late by one: concealed, the buffer grows to 1
    order[30], order[32] = order[32], order[30]  # late by two: concealed, the buffer grows to 2
    order[45], order[47] = order[47], order[45]  # late by two again: held in its place
    held_for: list[int] = []  # packets in the buffer, after each arrival
    out: list[np.ndarray] = []
    for i in order:
        _pli, frame = concealing.add(packets[i])
        held_for.append(len(adaptive._held))
        if frame is not None:
            out += [f.to_ndarray().reshape(-1, 2)[:, 0] for f in decoder.decode(frame)]
    decoded = np.concatenate(out)
    # In order, nothing waits: each packet is decoded as it comes.
    assert held_for[:10] == [0] * 10
    # A packet later than the buffer could hold is concealed, and the buffer grows to hold the
    # next one as late: the third was put in its place.
    assert concealing.concealed == 2 * FRAME and adaptive.deepest == 2
    assert len(packets) > 47 + 2 * 30
    # 30 packets in order give a frame back, then another: the buffer is empty again, and no
    # audio was dropped to shrink it (two frames left as one packet each time).
    assert held_for[-1] == 0 and adaptive.depth == 0
    whole = decode(ArrivalOrderBuffer(), packets)
    assert decoded.size == whole.size
    tail = slice(whole.size - 40 * FRAME, whole.size)
    assert np.corrcoef(whole[tail], decoded[tail])[0, 1] > 0.9
