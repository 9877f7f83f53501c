"""The small interfaces every engine implements.

Engines know nothing of sessions or transports: they take audio or text in and give text or
audio out. CPU-bound engines run their work in an executor themselves, so callers on the event
loop can simply ``await`` them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NotRequired, Protocol, TypedDict, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from .eot import EndOfTurnModel
    from .vad import SileroVad

FloatAudio = npt.NDArray[np.float32]

Role = Literal["system", "user", "assistant", "tool"]


class ChatMessage(TypedDict):
    """One message in the OpenAI chat format. An assistant message that asked for tools carries
    ``tool_calls`` (OpenAI's shape: id, type, function name and JSON arguments); each answer to
    one is a ``tool`` message with its ``tool_call_id``."""

    role: Role
    content: str
    tool_calls: NotRequired[list[dict[str, Any]]]
    tool_call_id: NotRequired[str]


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for: ``arguments`` is its JSON text, as the model wrote it."""

    id: str
    name: str
    arguments: str

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def unique_call_ids(calls: list[ToolCall]) -> list[ToolCall]:
    """The calls, each with an id no other call of the reply has: some local servers number every
    call ``call_0``, or send none, and a result must answer exactly one call."""
    seen: set[str] = set()
    unique = []
    for i, call in enumerate(calls):
        ident = call.id or f"call_{i}"
        if ident in seen:
            ident = f"{ident}_{i}"
        seen.add(ident)
        unique.append(call if ident == call.id else ToolCall(ident, call.name, call.arguments))
    return unique


@runtime_checkable
class ToolCaller(Protocol):
    """The tools one reply may use; agents that can call tools get it in ``AgentContext.tools``."""

    max_steps: int  # model round trips with tool calls in one reply, before it must answer

    def specs(self) -> list[dict[str, Any]]:
        """The tools in the OpenAI ``tools`` format (``{"type": "function", "function": {...}}``)."""
        ...

    async def run(self, calls: list[ToolCall]) -> list[ChatMessage]:
        """Run the calls (at once where there are several); one ``tool`` message per call, in
        order. Never raises for a tool's failure: the message says what went wrong, for the model
        to tell the caller."""
        ...


@dataclass
class Usage:
    """Tokens one reply cost, filled in by agents that know (``reported`` says whether one did)."""

    input_tokens: int = 0
    output_tokens: int = 0
    reported: bool = False

    def add(self, input_tokens: int, output_tokens: int) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.reported = True

    def as_dict(self) -> dict[str, int] | None:
        if not self.reported:
            return None
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }


@dataclass(frozen=True)
class AgentContext:
    """Who is asking, and this session's choices: agents use what applies to them.

    ``model``, ``temperature`` and ``max_tokens`` are None where the session did not choose, and
    the agent's configured defaults apply. An agent that learns what the reply cost adds it to
    ``usage``.
    """

    session_id: str
    thread_id: str | None = None
    user_id: str | None = None
    language: str = "en"
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    usage: Usage = field(default_factory=Usage)
    tools: ToolCaller | None = None


@dataclass(frozen=True)
class Voice:
    id: str
    name: str
    gender: str = "unknown"
    language: str = "en-US"
    engine: str = ""
    online: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "gender": self.gender,
            "language": self.language,
            "engine": self.engine,
            "online": self.online,
        }


class EngineError(Exception):
    """An engine could not do its job; ``code`` is what clients see in the ``error`` event."""

    code = "engine_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class AgentError(EngineError):
    code = "agent_error"


class TtsError(EngineError):
    code = "tts_error"


class SttError(EngineError):
    code = "stt_error"


@runtime_checkable
class SpeechToText(Protocol):
    name: str

    async def transcribe(self, audio: FloatAudio, *, language: str = "en") -> str:
        """Transcribe 16 kHz mono float32 audio in [-1, 1]."""
        ...

    async def warm_up(self) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Agent(Protocol):
    name: str

    def stream(self, messages: list[ChatMessage], context: AgentContext) -> AsyncIterator[str]:
        """Yield the reply as text deltas, as soon as each is known.

        ``messages`` starts with the system prompt and ends with the user's turn. Cancelling the
        consuming task must stop the generation promptly (barge-in depends on it).
        """
        ...

    async def warm_up(self) -> None: ...

    async def aclose(self) -> None: ...


def supports_tools(agent: Agent) -> bool:
    """Whether ``agent`` uses ``AgentContext.tools`` (its class sets ``supports_tools = True``): it
    sends their specs to its model and runs the calls the model asks for."""
    return bool(getattr(agent, "supports_tools", False))


@runtime_checkable
class PreparingAgent(Agent, Protocol):
    """An agent that can get ready for the next turn while the caller is still speaking."""

    async def prepare(self, messages: list[ChatMessage], *, said: str = "") -> None:
        """``messages`` (system prompt and history) will open the next ``stream`` call, and
        ``said`` is what the caller has said of its user turn so far (a partial transcript).

        A local model evaluates them now, so that call only has to read the rest of the user turn.
        Best effort: failures are the agent's to log, and ``stream`` must not depend on it.
        """
        ...


@runtime_checkable
class TextToSpeech(Protocol):
    name: str
    sample_rate: int
    default_voice: str

    def synthesize(
        self, text: str, *, voice: str | None = None, speed: float = 1.0
    ) -> AsyncIterator[FloatAudio]:
        """Yield mono float32 audio at ``sample_rate`` for ``text`` (one sentence or clause)."""
        ...

    def voices(self) -> list[Voice]: ...

    async def warm_up(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass
class Engines:
    """The engines one server shares between all its sessions."""

    stt: SpeechToText
    agent: Agent
    tts: TextToSpeech
    vad: SileroVad
    # End-of-turn models the semantic turn policy combines (empty for the other policies).
    eot: list[EndOfTurnModel] = field(default_factory=list)
    # Small per-frame audio work (resampling, VAD windows): off the event loop, but never
    # queued behind a long STT or TTS job.
    audio_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="audio")
    )
    # The end-of-turn models (tens of ms each): their own thread, so a busy one never holds up
    # another call's VAD windows on the audio executor.
    eot_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="eot")
    )

    async def aclose(self) -> None:
        for engine in (self.stt, self.agent, self.tts):
            await engine.aclose()
        self.audio_executor.shutdown(wait=False, cancel_futures=True)
        self.eot_executor.shutdown(wait=False, cancel_futures=True)
