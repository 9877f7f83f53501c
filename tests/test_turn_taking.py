"""Turn detection, sentence chunking and the paced track, with synthetic inputs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import av
import numpy as np
from aiortc.codecs.opus import OpusDecoder
from aiortc.jitterbuffer import JitterFrame
from speech import speak

from rtcvoice.audio import STT_RATE, Int16Audio, int16_to_float, resample_pcm, rms_dbfs
from rtcvoice.conversation.chunker import SentenceChunker
from rtcvoice.conversation.turns import TurnDetector, TurnEvent
from rtcvoice.engines import Engines
from rtcvoice.transports.tracks import FRAME_SAMPLES, OpusAudioTrack, PacedAudioTrack


def feed(detector: TurnDetector, probs: list[float]) -> list[tuple[int, TurnEvent]]:
    return [(i, ev) for i, p in enumerate(probs) if (ev := detector.feed(p)) is not None]


def test_speech_starts_only_after_the_minimum_duration() -> None:
    d = TurnDetector(window_ms=32, min_speech_ms=96, end_silence_ms=320)
    assert feed(d, [0.9, 0.9, 0.1, 0.9, 0.9]) == []  # two windows: a click, not speech
    assert feed(d, [0.9]) == [(0, TurnEvent.SPEECH_START)]


def test_turn_ends_after_the_configured_silence_and_not_before() -> None:
    d = TurnDetector(window_ms=32, min_speech_ms=32, end_silence_ms=320)
    events = feed(d, [0.9] * 5 + [0.1] * 9 + [0.9] + [0.1] * 10)
    # Nine quiet windows (288 ms) are a pause; ten after the word are the end of the turn.
    assert events == [(0, TurnEvent.SPEECH_START), (24, TurnEvent.TURN_END)]


def test_hysteresis_keeps_a_soft_syllable_inside_the_turn() -> None:
    d = TurnDetector(window_ms=32, threshold=0.5, min_speech_ms=32, end_silence_ms=96)
    events = feed(d, [0.9, 0.4, 0.4, 0.4, 0.4, 0.1, 0.1, 0.1])
    assert events == [(0, TurnEvent.SPEECH_START), (7, TurnEvent.TURN_END)]


async def test_silero_hears_speech_and_not_silence_or_noise(shared_engines: Engines) -> None:
    pcm, rate = speak("The weather is lovely today, isn't it?", lead_s=0.5, tail_s=0.5)
    speech = int16_to_float(resample_pcm(pcm, rate, STT_RATE))
    stream = shared_engines.vad.stream()
    probs = stream.process(speech)
    assert max(probs[:10]) < 0.3 and max(probs) > 0.8 and max(probs[-10:]) < 0.3
    noise = np.random.default_rng(0).normal(0, 0.02, STT_RATE * 2).astype(np.float32)
    assert max(shared_engines.vad.stream().process(noise)) < 0.5


def stream(chunker: SentenceChunker, text: str) -> list[str]:
    """The pieces the chunker gives back while ``text`` streams in word by word, as an LLM sends it."""
    out: list[str] = []
    for token in text.split(" "):
        out += chunker.push(token + " ")
    return out


def test_chunker_cuts_sentences_as_they_complete() -> None:
    c = SentenceChunker(first_clause_chars=1000)
    out = stream(c, "Dr. Smith is here. He says hi! Is 3.5 enough? Yes") + c.flush()
    assert out == ["Dr. Smith is here.", "He says hi!", "Is 3.5 enough?", "Yes"]


def test_chunker_speaks_a_long_first_clause_early() -> None:
    c = SentenceChunker(first_clause_chars=28, first_phrase_words=0)
    out = stream(c, "Well, the quickest way to get there from here, honestly, is by train. It is")
    # Only the first piece may be a clause: later ones wait for the sentence to end.
    assert out == ["Well, the quickest way to get there from here,", "honestly, is by train."]


def test_chunker_cuts_a_long_first_sentence_before_a_phrase() -> None:
    c = SentenceChunker()
    text = "The best book to read is a novel called The Great Gatsby by F. Scott Fitzgerald. It is a book that lasts."
    out = stream(c, text) + c.flush()
    # Only the first piece is cut early, and "F." is an initial, not the end of a sentence.
    assert out == [
        "The best book to read is a novel",
        "called The Great Gatsby by F. Scott Fitzgerald.",
        "It is a book that lasts.",
    ]


def test_chunker_leaves_a_short_first_sentence_whole() -> None:
    assert stream(SentenceChunker(), "A spider has eight legs in total. Yes.") == [
        "A spider has eight legs in total."
    ]


def test_chunker_cuts_at_the_full_stop_token_without_waiting_for_the_next_word() -> None:
    # As SmolLM2 streams it: the full stop is a token of its own, the space comes with the next word.
    c = SentenceChunker()
    pushed = [c.push(t) for t in ["The", " capital", " of", " France", " is", " Paris", "."]]
    assert pushed[-1] == ["The capital of France is Paris."] and not any(pushed[:-1])
    # A point after a number, an abbreviation or an initial waits for what follows it.
    for tokens, whole in (
        (["It", " costs", " 3", ".", "5", " euros", "."], "It costs 3.5 euros."),
        (["Ask", " Dr", ".", " Smith", " today", "."], "Ask Dr. Smith today."),
        (["It", " is", " by", " F", ".", " Scott", "."], "It is by F. Scott."),
    ):
        c = SentenceChunker()
        assert [p for t in tokens for p in c.push(t)] == [whole]


def test_chunker_cuts_a_run_on_first_piece_after_its_longest_wait_in_whole_words() -> None:
    # No punctuation and no phrase word: before, nothing was spoken until the reply ended.
    c = SentenceChunker()
    tokens = ["Le", " Jura", ","] + [" het"] * 12 + [" he", "t", " het"] * 3
    pieces = [(i, p) for i, t in enumerate(tokens) for p in c.push(t)]
    assert pieces[0] == (15, "Le Jura," + " het" * 12)  # cut once the 15th word began
    assert len(pieces) == 1 and c.flush() == [" ".join(["het"] * 6)]  # "he"+"t" kept whole
    # A first sentence that ends sooner is left whole.
    c = SentenceChunker()
    assert c.push("I like it very much. ") == ["I like it very much."]


def test_chunker_drops_pieces_without_words() -> None:
    c = SentenceChunker()
    assert c.push("Okay then. ") == ["Okay then."]
    assert c.push(" ... !! ") == [] and c.flush() == []


async def test_paced_track_sends_20ms_frames_on_time_with_silence_when_idle() -> None:
    track = PacedAudioTrack()
    track.write(np.full(FRAME_SAMPLES + 100, 1000, np.int16))
    started = time.monotonic()
    frames = [await track.recv() for _ in range(10)]
    elapsed = time.monotonic() - started
    assert [f.pts for f in frames] == [i * FRAME_SAMPLES for i in range(10)]
    assert all(f.samples == FRAME_SAMPLES and f.sample_rate == 48_000 for f in frames)
    assert 0.15 <= elapsed < 0.5  # nine intervals of 20 ms
    data = [f.to_ndarray().reshape(-1) for f in frames]
    assert data[0].min() == 1000 and data[1][:100].min() == 1000 and not data[1][100:].any()
    assert not any(d.any() for d in data[2:])
    track.stop()


async def opus_stream(track: OpusAudioTrack, n: int, at: dict[int, Int16Audio]) -> list[av.Packet[Any]]:
    """``n`` packets from ``track``, writing ``at[i]`` just before packet ``i`` is pulled."""
    packets = []
    for i in range(n):
        if i in at:
            track.write(at[i])
        packets.append(await track.recv())
    track.stop()
    return packets


def decode(packets: list[av.Packet[Any]]) -> Int16Audio:
    """What a receiver plays: one Opus decoder over the whole stream (left channel)."""
    decoder = OpusDecoder()
    out = []
    for p in packets:
        ts = int(p.pts or 0)
        for frame in decoder.decode(JitterFrame(data=bytes(p), timestamp=ts)):
            out.append(frame.to_ndarray().reshape(-1, 2)[:, 0])
    return np.concatenate(out)


TONE = (np.sin(2 * np.pi * 440 * np.arange(FRAME_SAMPLES * 5) / 48_000) * 8000).astype(np.int16)


async def test_opus_track_encodes_speech_and_repeats_the_encoders_own_silence() -> None:
    track = OpusAudioTrack()
    encoded: list[int] = []
    encode = track._encode

    def counted(samples: Int16Audio, pts: int) -> bytes:
        encoded.append(pts // FRAME_SAMPLES)
        return encode(samples, pts)

    track._encode = counted  # type: ignore[method-assign]
    packets = await opus_stream(track, 60, {2: TONE, 40: TONE})
    assert [p.pts for p in packets] == [i * FRAME_SAMPLES for i in range(60)]
    data = [bytes(p) for p in packets]
    assert data[0] == data[1] and len(data[0]) <= 8  # the encoder's silence: a few bytes
    # After the tone the encoder goes on (its look-ahead still holds the end) until it makes
    # the same silence packet twice; from there that packet is repeated, not encoded again,
    # until the next reply, which the encoder gets from its first frame.
    again = next(i for i in range(8, 40) if data[i] == data[i - 1] and len(data[i]) <= 8)
    assert again < 30 and len(set(data[again:40])) == 1, [len(d) for d in data]
    skipped = set(range(60)) - set(encoded)
    assert set(range(again + 1, 40)) <= skipped and not skipped & set(range(2, again + 1))
    assert not skipped & set(range(40, 45))
    pcm = decode(packets)
    assert rms_dbfs(pcm[8 * FRAME_SAMPLES : 40 * FRAME_SAMPLES]) < -60  # the tone's end rings, then nothing
    # Both replies are heard at the tone's level, each from its first frame.
    for at in (2, 40):
        for i in range(5):
            heard = pcm[(at + i) * FRAME_SAMPLES + 480 : (at + i + 1) * FRAME_SAMPLES]
            assert abs(rms_dbfs(heard) - rms_dbfs(TONE)) < 1.5, (at, i)


async def test_flush_drops_queued_audio_and_reports_what_was_heard() -> None:
    track = PacedAudioTrack()
    end = track.write(np.ones(FRAME_SAMPLES * 50, np.int16))
    done = track.wait_played(end)
    await track.recv()
    await track.recv()
    heard = track.flush()
    assert heard == 2 * FRAME_SAMPLES
    assert await asyncio.wait_for(done, 1) is False  # flushed, never played
    frame = await track.recv()
    assert not frame.to_ndarray().any()
    assert await track.wait_played(track.written) is True
    track.stop()


def test_the_context_window_moves_in_steps_and_starts_with_the_user() -> None:
    from rtcvoice.conversation.history import context_window
    from rtcvoice.engines.base import ChatMessage

    def history(n: int) -> list[ChatMessage]:
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": str(i)} for i in range(n)]

    assert context_window(history(6), 10) == history(6)
    starts = [context_window(history(n), 10)[0]["content"] for n in range(11, 25)]
    # The first message stays the same while five messages are added (a reusable prompt
    # prefix), where a sliding window would change it with every message...
    assert starts == ["6"] * 4 + ["10"] * 5 + ["16"] * 5
    # ...and the window never holds more than asked, nor opens with an answer.
    for n in range(1, 60):
        window = context_window(history(n), 10)
        assert len(window) <= 10 and window[0]["role"] == "user"
    assert context_window(history(5), 0) == []
