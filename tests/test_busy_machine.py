"""On a busy machine a caller hears each reply once, in order: checked on the audio received.

A spoken-answer test once transcribed the received reply as the answer one and a half times on
a loaded machine. Whether the reply was played twice or had gaps that made Whisper repeat
itself, a transcript cannot tell; so here each sentence is spoken as a tone of its own pitch,
and the received audio is read back frame by frame: every pitch must come once, in order, and
last as long as it was synthesized (a sentence sent twice would last twice as long).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import numpy as np
from conftest import ServerFactory, openai_agent
from fake_openai import FakeOpenAI
from speech import speak

from rtcvoice.audio import rms_dbfs
from rtcvoice.client import VoiceCallClient
from rtcvoice.engines.base import FloatAudio
from rtcvoice.engines.tts.tone import RATE, ToneTts

SENTENCES = ["One two three four.", "Five six seven eight.", "Nine ten eleven twelve.", "Thirteen fourteen."]
PITCHES = [400.0 + 200.0 * i for i in range(len(SENTENCES))]
SENTENCE_S = 0.6
FRAME = 960  # 20 ms at the client's 48 kHz


class SentenceTones(ToneTts):
    """The beep TTS, but sentence i of SENTENCES is a SENTENCE_S tone at PITCHES[i]."""

    name = "sentence-tones"

    async def synthesize(
        self, text: str, *, voice: str | None = None, speed: float = 1.0
    ) -> AsyncIterator[FloatAudio]:
        pitch = PITCHES[SENTENCES.index(text.strip())]
        t = np.arange(int(RATE * SENTENCE_S), dtype=np.float32) / RATE
        tone = (0.3 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)
        for piece in np.array_split(tone, 4):  # streamed, as real engines do
            yield piece


def pitches_heard(pcm: np.ndarray) -> list[int | None]:
    """Per 20 ms frame: the index of the sentence whose pitch it carries, None for silence or a
    frame that is not one clean pitch (a sentence's first or last frame, cut by the frame grid)."""
    labels: list[int | None] = []
    freqs = np.fft.rfftfreq(FRAME, 1 / 48_000)
    for i in range(pcm.size // FRAME):
        frame = pcm[i * FRAME : (i + 1) * FRAME].astype(np.float32)
        if rms_dbfs(frame.astype(np.int16)) < -35:
            labels.append(None)
            continue
        spectrum = np.abs(np.fft.rfft(frame * np.hanning(FRAME)))
        peak = freqs[int(np.argmax(spectrum))]
        nearest = int(np.argmin([abs(peak - p) for p in PITCHES]))
        labels.append(nearest if abs(peak - PITCHES[nearest]) < 60 else None)
    return labels


@contextlib.contextmanager
def cpu_burners(n: int) -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_on_a_busy_machine_each_sentence_of_a_reply_is_heard_once_and_in_order(
    start_server: ServerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = " ".join(SENTENCES)
    fake_openai.token_delay = 0.01
    url = await start_server(agent=openai_agent(fake_openai), tts=SentenceTones())
    client = VoiceCallClient(url)
    await client.connect()
    try:
        with cpu_burners(3):  # three busy processes on top of the server and the caller
            for n in (1, 2):  # two turns: speculation gets two chances to answer twice
                client.play(*speak("What is the capital of France?"))
                end = await client.wait_count("end_of_response", n, 90)
                assert not end["interrupted"], end
                await asyncio.sleep(1.0)  # the reply's last frames are in flight behind the event
    finally:
        await client.close()

    labels = pitches_heard(client.received.pcm())
    sounds = [label for label in labels if label is not None]  # a gap inside a sentence is not a repeat
    order = [label for k, label in enumerate(sounds) if k == 0 or sounds[k - 1] != label]
    assert order == [0, 1, 2, 3, 0, 1, 2, 3], order
    frames = SENTENCE_S * 1000 / 20
    for i in range(len(SENTENCES)):
        heard = labels.count(i) / 2  # per reply
        # Gaps (late frames on a busy machine) may cut a sentence; nothing may lengthen it.
        assert heard <= frames + 1, f"sentence {i} lasted {heard:.0f} frames of {frames:.0f}: sent twice"
        assert heard >= frames - 3, f"sentence {i} lasted {heard:.0f} frames of {frames:.0f}: audio lost"
