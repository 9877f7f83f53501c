"""Engines: speech-to-text, the agent, text-to-speech and VAD, each behind a small Protocol."""

from __future__ import annotations

import asyncio
import logging
import time

from ..settings import Settings
from .base import Agent, AgentError, EngineError, Engines, SpeechToText, SttError, TextToSpeech, TtsError
from .blas import hold_blas_to_one_thread
from .eot import create_eot_models
from .vad import SileroVad

log = logging.getLogger(__name__)


async def load_engines(settings: Settings, *, warm: bool = True) -> Engines:
    """Build every engine the settings ask for and warm them, so the first call is as fast as the rest.

    Raises EngineError with a message that says how to fix the setup when an engine cannot serve.
    """
    from .agents import create_agent
    from .stt import create_stt
    from .tts import create_tts

    started = time.perf_counter()
    hold_blas_to_one_thread()
    engines = Engines(
        stt=create_stt(settings),
        agent=create_agent(settings),
        tts=create_tts(settings),
        vad=SileroVad(),
        eot=create_eot_models(settings),
    )
    if warm:
        try:
            await asyncio.gather(engines.stt.warm_up(), engines.agent.warm_up(), engines.tts.warm_up())
        except BaseException:
            await engines.aclose()
            raise
    log.info(
        "engines ready in %.1f s: stt=%s agent=%s tts=%s turn=%s %s",
        time.perf_counter() - started,
        engines.stt.name,
        engines.agent.name,
        engines.tts.name,
        settings.turn_policy,
        ",".join(m.name for m in engines.eot),
    )
    return engines


__all__ = [
    "Agent",
    "AgentError",
    "Engines",
    "EngineError",
    "SpeechToText",
    "SttError",
    "TextToSpeech",
    "TtsError",
    "SileroVad",
    "load_engines",
]
