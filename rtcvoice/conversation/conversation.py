"""The turn-taking state machine of one call: listening → thinking → speaking, and barge-in.

A transport feeds it 16 kHz mono PCM (:meth:`Conversation.push_audio`) and raw client events
(:meth:`Conversation.handle_client_message`); the conversation emits server events through the
``send`` callable and plays speech into an :class:`AudioSink`. The same class serves WebRTC and
WebSocket calls, so every behaviour is written once.

Ownership: each user turn's work (final STT, agent, TTS) runs in one task, ``_turn_task``;
barge-in cancels exactly that task and flushes the sink. Partial transcripts run in
``_partial_task``. :meth:`aclose` cancels and awaits both and is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from ..audio import (
    STT_RATE,
    FloatAudio,
    Int16Audio,
    StreamResampler,
    float_to_int16,
    int16_to_float,
    rms_dbfs,
    trim_silence,
)
from ..engines.base import AgentContext, ChatMessage, EngineError, Engines, PreparingAgent
from ..engines.languages import language_name
from ..engines.vad import WINDOW, WINDOW_MS, VadStream
from ..settings import Settings
from ..telemetry.logs import turn_id_var
from .chunker import SentenceChunker
from .config import SessionConfig
from .events import ClientEvent, EventError, parse_client_event
from .history import context_window
from .turns import TurnDetector, TurnEvent

log = logging.getLogger(__name__)

State = Literal["listening", "thinking", "speaking"]
Event = dict[str, Any]

SPECULATE_AFTER_WINDOWS = 1  # at the first silent window, start transcribing (see _speculate)
# Silero's probability takes 1-4 windows to fall below the off threshold after the last word
# (median ~50 ms on the bench questions), while the level falls at once. A window this far below
# the loudest one so far, and this quiet in absolute terms, starts speculation before the VAD
# agrees. Quiet closures inside words qualify too, so this starts (and drops) about half again
# as many transcriptions while the caller speaks: only when the shared model is idle, so it
# never queues in front of another call's turn (bench/README.md). In background noise the level
# never drops that far, and speculation waits for the VAD as before.
QUIET_BELOW_LOUDEST_DB = 35.0
QUIET_DBFS = -45.0
PRE_ROLL_MS = 300  # audio kept from before the VAD fired, so the first syllable is transcribed
APOLOGY = "Sorry, I ran into a problem answering that."
FIRST_LEAD_S = 0.005  # silence kept before the first sound of a reply (no click, no delay)
GAP_LEAD_S = 0.1  # ...and before each later sentence, so they do not run together
GAP_TAIL_S = 0.15
# A caller who speaks again this soon after a turn ended early as a question was not done.
RESUME_WITHIN_S = 1.0
WRITE_WAIT_S = 15.0  # how long closing a call waits for its messages to be stored
# A push-to-talk client's end_of_input this soon after the silence ended the turn is about that turn.
END_OF_INPUT_GRACE_S = 3.0


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
        """Drop unplayed audio; returns the playhead position before the flush."""
        ...

    def wait_played(self, position: int) -> asyncio.Future[bool]:
        """True once ``position`` is played, False if flushed first."""
        ...


class Recorder(Protocol):
    """Keeps the call's messages in the thread it belongs to (the server's store)."""

    def record(self, message: ChatMessage, meta: dict[str, Any]) -> asyncio.Future[str | None]:
        """Queue one message for writing (order is kept); resolves to its stored id once it is durable.

        A failed write is the recorder's to report: the future resolves (to None) all the same,
        so a broken database never stalls the call.
        """
        ...

    async def switch_thread(self, thread_id: str) -> list[ChatMessage]:
        """Move the call to another thread; returns its history. LookupError if not allowed."""
        ...


@dataclass
class Turn:
    id: str
    source: Literal["voice", "text"]
    user_text: str = ""
    ai_text: str = ""
    # (start, end, text) of each piece of speech queued in the sink, in sink positions.
    spoken: list[tuple[int, int, str]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    metrics_sent: bool = False
    # A turn started during the end-of-turn silence runs ahead: its audio waits for ``committed``
    # (the silence really ended the turn; see Conversation._speculate). Its events wait in
    # ``held`` until ``shown``, which for a voice turn also waits for its transcript to be
    # stored: the client never sees a transcript the thread does not have.
    speculative: bool = False
    committed: asyncio.Event = field(default_factory=asyncio.Event)
    shown: bool = True
    held: list[Callable[[], None]] = field(default_factory=list)
    user_message: ChatMessage | None = None
    reply_id: str | None = None  # the stored assistant message
    usage: dict[str, int] | None = None
    underruns: int = 0
    finished: bool = False
    # The silence that ended the turn: the configured one, or the shorter one for a question.
    silence_ms: float | None = None
    # The turn this one goes on with: its question ended early and the caller went on speaking.
    continues: str | None = None

    def __post_init__(self) -> None:
        if not self.speculative:
            self.committed.set()
        if self.source == "voice":
            self.shown = False

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic())

    def said_before(self, heard: int) -> str:
        """What the listener heard: every piece whose first sample was played before ``heard``."""
        return " ".join(text for start, _end, text in self.spoken if start < heard).strip()

    def metrics(self) -> dict[str, float | None]:
        m = self.marks

        def span(a: str, b: str) -> float | None:
            return round((m[b] - m[a]) * 1000.0, 1) if a in m and b in m else None

        overhead = compute_after = None
        if "turn_end" in m and "tts_first_audio" in m:
            # The part of STT + LLM + TTS that speculation did not hide behind the silence.
            compute_after = round(max(0.0, m["tts_first_audio"] - m["turn_end"]) * 1000.0, 1)
        eot = span("speech_end", "turn_end")
        if eot is not None and "first_audio_played" in m and "tts_first_audio" in m:
            # Time that is neither the configured silence nor STT/LLM/TTS compute: VAD and
            # executor hops before the turn ends, then queueing and pacing after the audio is ready.
            ready = max(m["turn_end"], m["tts_first_audio"])
            # A turn ended by the client (end_of_input) or by length waited for no silence.
            waited = max(0.0, eot - self.silence_ms) if self.silence_ms is not None else 0.0
            overhead = round(waited + (m["first_audio_played"] - ready) * 1000.0, 1)
        return {
            "compute_after_turn_end": compute_after,
            "server_overhead": overhead,
            "end_of_turn": span("speech_end", "turn_end"),
            "stt": span("stt_start", "stt_end"),
            "llm_first_token": span("llm_start", "llm_first_token"),
            "llm_first_sentence": span("llm_start", "tts_start"),
            "tts_first_audio": span("tts_start", "tts_first_audio"),
            "voice_to_voice": span("speech_end", "first_audio_played"),
        }


class Conversation:
    def __init__(
        self,
        *,
        session_id: str,
        settings: Settings,
        engines: Engines,
        vad: VadStream,
        sink: AudioSink | None,
        send: Callable[[Event], None],
        executor: Executor | None = None,
        thread_id: str | None = None,
        user_id: str | None = None,
        history: list[ChatMessage] | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.session_id = session_id
        self.thread_id = thread_id
        self.user_id = user_id
        self.settings = settings
        self.engines = engines
        self.sink = sink
        self._send = send
        self._vad = vad
        self._executor = executor
        self._recorder = recorder
        self.config = SessionConfig(
            voice=settings.tts_voice or engines.tts.default_voice,
            instructions=settings.system_prompt,
            language=settings.language,
            speed=settings.tts_speed,
        )
        self.history: list[ChatMessage] = list(history or [])
        # How the AI's replies are stored: spoken on a call with audio, else shown as text.
        self.content_type = "voice" if sink is not None else "text"
        self.state: State = "listening"
        self.detector = TurnDetector(
            window_ms=WINDOW_MS,
            threshold=settings.vad_threshold,
            min_speech_ms=settings.min_speech_ms,
            end_silence_ms=settings.end_of_turn_silence_ms,
        )
        self._pending = np.zeros(0, dtype=np.int16)
        self._pre_roll: deque[Int16Audio] = deque(
            maxlen=max(1, PRE_ROLL_MS // WINDOW_MS + self.detector.min_speech_windows)
        )
        self._utterance: list[Int16Audio] = []
        self._utterance_samples = 0
        self._last_partial_at = 0.0
        self._last_partial_text = ""
        self._speech_end_at: float | None = None
        self._turn_ended_at = -1e9  # when the last voice turn ended (end_of_input after it is no error)
        self._loudest_db = -120.0  # the loudest window of the current utterance (dBFS)
        self._turn: Turn | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._partial_task: asyncio.Task[None] | None = None
        self._speculation: Turn | None = None
        # A turn ended early as a question, its audio and when it ended: see _on_speech_start.
        self._resumable: tuple[Turn, list[Int16Audio], float] | None = None
        self._continues: str | None = None
        self._side_tasks: set[asyncio.Task[Any] | asyncio.Future[Any]] = set()
        self._writes: set[asyncio.Future[str | None]] = set()  # messages being stored
        self._closed = False
        self._closing = False
        self.turns_completed = 0
        self.last_activity = time.monotonic()  # the last time anyone said or typed anything

    # -- events -----------------------------------------------------------------------------------
    def emit(self, type: str, turn: Turn | None = None, **data: Any) -> None:
        if turn is not None and not turn.shown:
            turn.held.append(lambda: self.emit(type, turn, **data))
            return
        if self._closed:
            return
        event: Event = {"type": type, "session_id": self.session_id}
        if turn is not None:
            event["turn_id"] = turn.id
        event.update(data)
        self._send(event)

    def _set_state(self, state: State, turn: Turn | None = None) -> None:
        if turn is not None and not turn.shown:
            turn.held.append(lambda: self._set_state(state))
            return
        if state != self.state:
            self.state = state
            self.emit("state", state=state)

    def _reveal(self, turn: Turn, first: tuple[str, dict[str, Any]] | None = None) -> None:
        """Show the turn: ``first`` (its transcript), then everything it held back, in order."""
        turn.shown = True
        if first is not None:
            self.emit(first[0], turn, **first[1])
        held, turn.held = turn.held, []
        for show in held:
            show()

    def start(
        self,
        *,
        input_audio: dict[str, Any] | None = None,
        output_audio: dict[str, Any] | None = None,
    ) -> None:
        """Say hello: ``session.started`` with the audio formats the transport uses on the wire.

        Defaults: PCM16 at 16 kHz in, PCM16 at the sink's rate out (none for a text-only call).
        """
        if output_audio is None and self.sink is not None:
            output_audio = {"format": "pcm16", "sample_rate": self.sink.sample_rate}
        self.emit(
            "session.started",
            thread_id=self.thread_id,
            agent=self.engines.agent.name,
            model=self.config.model,
            stt=self.engines.stt.name,
            tts=self.engines.tts.name if self.sink is not None else None,
            voice=self.config.voice,
            language=self.config.language,
            input_audio=input_audio or {"format": "pcm16", "sample_rate": STT_RATE},
            output_audio=output_audio,
        )
        self.emit("state", state=self.state)
        self._prepare_agent()

    # -- audio in ---------------------------------------------------------------------------------
    async def push_audio(self, pcm: Int16Audio) -> None:
        """Feed 16 kHz mono int16 audio as it arrives (any block size)."""
        if self._closed:
            return
        arrived = time.monotonic()
        self._pending = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        n = self._pending.size // WINDOW
        if n == 0:
            return
        block, self._pending = self._pending[: n * WINDOW], self._pending[n * WINDOW :]
        loop = asyncio.get_running_loop()
        probs = await loop.run_in_executor(self._executor, self._vad.process, int16_to_float(block))
        for i, prob in enumerate(probs):
            await self._on_window(block[i * WINDOW : (i + 1) * WINDOW], prob, arrived)

    async def _on_window(self, window: Int16Audio, prob: float, arrived: float) -> None:
        detector = self.detector
        event = detector.feed(prob)
        quiet = False
        if detector.in_speech or event is TurnEvent.TURN_END:
            if event is TurnEvent.SPEECH_START:
                self._utterance = list(self._pre_roll)
                self._utterance_samples = sum(w.size for w in self._utterance)
                self._pre_roll.clear()
                self._loudest_db = max((rms_dbfs(w) for w in self._utterance), default=-120.0)
            level = rms_dbfs(window)
            self._loudest_db = max(self._loudest_db, level)
            quiet = level < min(QUIET_DBFS, self._loudest_db - QUIET_BELOW_LOUDEST_DB)
            self._utterance.append(window)
            self._utterance_samples += window.size
            if prob >= detector.off_threshold:
                self._speech_end_at = arrived
        else:
            self._pre_roll.append(window)

        if event is TurnEvent.SPEECH_START:
            await self._on_speech_start()
        elif event is TurnEvent.TURN_END:
            self._end_user_turn(silence_ms=detector.turn_end_silence_ms)
        elif detector.in_speech:
            if self._utterance_samples >= self.settings.max_utterance_s * STT_RATE:
                detector.reset()
                self._end_user_turn()
            elif detector.silence_run == 0:
                if not quiet:
                    self._drop_speculation()
                    self._maybe_partial()
                elif self._speculation is None and not self._stt_busy():
                    self._speculate()  # the level fell before the VAD's probability did
            elif self._speculation is None:
                if detector.silence_run >= SPECULATE_AFTER_WINDOWS:
                    self._speculate()
            elif self._ends_as_question(self._speculation, detector.silence_ms):
                silence_ms = detector.silence_ms
                detector.reset()
                self._end_user_turn(silence_ms=silence_ms)

    def _speculate(self) -> None:
        """Start answering during the end-of-turn silence; commit when the silence ends the turn.

        STT, the agent and the first sentence's TTS all run while the caller is silent, so when
        the turn ends the reply is (nearly) ready to play. Until then the turn shows nothing; if
        the caller goes on speaking, it is dropped as if it never happened.
        """
        audio = np.concatenate(self._utterance)
        self._cancel_partial()
        turn = Turn(id=uuid.uuid4().hex[:12], source="voice", speculative=True)
        self._speculation = turn
        self._start_turn(turn, self._voice_turn(turn, audio))

    def _ends_as_question(self, turn: Turn, silence_ms: int) -> bool:
        """Whether a speculative turn may end before the full end-of-turn silence.

        Its transcript (ready ~130 ms into the silence) ending in "?" means the caller asked
        something whole: 384 ms of silence then ends the turn instead of 512. Only questions:
        Whisper puts a full stop at nearly every pause, so "." says little. ``bench/pauses.py``
        finds question-shaped halves ("Can you tell me?") before pauses of up to 352 ms, so the
        default waits longer than that; a caller who still goes on is heard whole (see
        _on_speech_start).
        """
        quick = self.settings.question_end_of_turn_ms
        if quick <= 0 or silence_ms < quick or quick >= self.settings.end_of_turn_silence_ms:
            return False
        return turn.user_text.rstrip().endswith("?")

    def _drop_speculation(self) -> None:
        turn, self._speculation = self._speculation, None
        if turn is None:
            return
        task = self._turn_task
        if task is not None and self._turn is turn:
            task.cancel()
            self._own(task)  # closing still awaits it
            self._turn, self._turn_task = None, None
        if turn.user_message is not None:
            self.history = [m for m in self.history if m is not turn.user_message]

    async def _on_speech_start(self) -> None:
        self.last_activity = self._last_partial_at = time.monotonic()
        self._last_partial_text = ""
        resumable, self._resumable = self._resumable, None
        self._continues = None
        # Barge-in: the user talks over the AI (or over its thinking); the new turn wins.
        if self._turn_task is not None and not self._turn_task.done():
            turn = self._turn
            await self.interrupt(reason="barge_in")
            if resumable is not None and resumable[0] is turn:
                earlier, audio, ended_at = resumable
                if time.monotonic() - ended_at <= RESUME_WITHIN_S:
                    # The "question" was half of one ("Can you tell me ... how far it is?"):
                    # the new turn hears it all again, so the answer is to the whole question.
                    self._utterance[:0] = audio
                    self._utterance_samples += sum(w.size for w in audio)
                    self._continues = earlier.id
        self.emit("speech_started")

    def _end_user_turn(self, *, silence_ms: float | None = None) -> None:
        utterance = self._utterance
        audio = np.concatenate(utterance) if utterance else np.zeros(0, np.int16)
        self._utterance, self._utterance_samples = [], 0
        self._cancel_partial()
        turn, self._speculation = self._speculation, None
        if turn is None:
            turn = Turn(id=uuid.uuid4().hex[:12], source="voice")
            self._start_turn(turn, self._voice_turn(turn, audio))
        if self._speech_end_at is not None:
            turn.marks["speech_end"] = self._speech_end_at
        turn.silence_ms = silence_ms
        turn.continues, self._continues = self._continues, None
        quick = silence_ms is not None and silence_ms < self.detector.turn_end_silence_ms
        self._resumable = (turn, utterance, time.monotonic()) if quick else None
        turn.mark("turn_end")
        self._turn_ended_at = time.monotonic()
        self.emit("speech_stopped", turn_id=turn.id)
        self._set_state("thinking")
        turn.committed.set()  # a speculative turn may now play; it shows itself once stored

    # -- partial transcripts ----------------------------------------------------------------------
    def _maybe_partial(self) -> None:
        if self._speculation is not None:
            return
        now = time.monotonic()
        if now - self._last_partial_at < self.settings.partial_interval_ms / 1000.0:
            return
        if self._partial_task is not None and not self._partial_task.done():
            return  # the previous partial is still running: skip rather than queue behind it
        if self._stt_busy():
            return
        self._last_partial_at = now
        audio = np.concatenate(self._utterance)
        self._partial_task = asyncio.create_task(self._partial(audio), name=f"partial-{self.session_id}")
        self._own(self._partial_task)

    def _stt_busy(self) -> bool:
        """Whether the shared STT model is transcribing (any call's turn or partial).

        Optional transcriptions (partials, speculation ahead of the VAD) run only when it is
        not: queued behind one, they would delay someone's final transcript.
        """
        return getattr(self.engines.stt, "pending", 0) > 0

    async def _partial(self, audio: Int16Audio) -> None:
        try:
            text = await self.engines.stt.transcribe(int16_to_float(audio), language=self.config.language)
        except EngineError as exc:
            log.warning("session %s: partial transcription failed: %s", self.session_id, exc)
            return
        if text and text != self._last_partial_text and self.detector.in_speech:
            self._last_partial_text = text
            self.emit("partial_transcript", text=text)

    def _cancel_partial(self) -> None:
        if self._partial_task is not None and not self._partial_task.done():
            self._partial_task.cancel()
        self._partial_task = None

    # -- turns ------------------------------------------------------------------------------------
    def _start_turn(self, turn: Turn, work: Coroutine[Any, Any, None]) -> None:
        self._turn = turn
        task = asyncio.create_task(self._run_turn(turn, work), name=f"turn-{turn.id}")
        # A turn cancelled before it ran (barge-in on the next window) never started ``work``:
        # close it, so it is not left behind unawaited. After a run, closing is a no-op.
        task.add_done_callback(lambda _task: work.close())
        self._turn_task = task

    async def _run_turn(self, turn: Turn, work: Coroutine[Any, Any, None]) -> None:
        turn_id_var.set(turn.id)  # log lines of this turn, and of the tasks it starts, name it
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug, not an engine fault: say so, keep the call up
            log.exception("session %s: turn %s failed", self.session_id, turn.id)
            self._reveal(turn)
            self.emit("error", turn, code="internal_error", message="The server failed to answer this turn.")
            self._finish(turn, interrupted=False)

    async def _voice_turn(self, turn: Turn, audio: Int16Audio) -> None:
        turn.mark("stt_start")
        try:
            text = await self.engines.stt.transcribe(int16_to_float(audio), language=self.config.language)
        except EngineError as exc:
            await turn.committed.wait()
            self._reveal(turn, ("error", {"code": exc.code, "message": str(exc)}))
            self._set_state("listening")
            return
        turn.mark("stt_end")
        if not _is_speech(text):
            # Noise the VAD took for speech: nothing was said, so nothing is answered.
            await turn.committed.wait()
            self._reveal(turn, ("final_transcript", {"text": "", "empty": True}))
            self._set_state("listening")
            return
        turn.user_text = text
        user: ChatMessage = {"role": "user", "content": text}
        self.history.append(user)
        turn.user_message = user
        # The answer starts now, even before the turn is committed; it shows nothing until then.
        response = asyncio.create_task(self._respond(turn), name=f"respond-{turn.id}")
        try:
            await turn.committed.wait()
            message_id = await self._persist(user, turn, content_type="voice")
            shown: dict[str, Any] = {"text": text, "message_id": message_id}
            if turn.continues is not None:
                shown["continues"] = turn.continues
            self._reveal(turn, ("final_transcript", shown))
            await response
        finally:
            if not response.done():
                response.cancel()
                await asyncio.gather(response, return_exceptions=True)

    async def _text_turn(self, turn: Turn, content_type: str) -> None:
        user: ChatMessage = {"role": "user", "content": turn.user_text}
        self.history.append(user)
        turn.user_message = user
        await self._persist(user, turn, content_type=content_type)
        await self._respond(turn)

    async def _respond(self, turn: Turn) -> None:
        """Stream the agent's reply for the turn whose user message ends ``history``."""
        messages = self._request(self.history)
        config = self.config
        context = AgentContext(
            self.session_id,
            self.thread_id,
            self.user_id,
            config.language,
            model=config.model,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
        )
        self._set_state("thinking", turn)

        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        speaker = asyncio.create_task(self._speak(turn, sentences), name=f"speak-{turn.id}")
        chunker = SentenceChunker()
        failed: EngineError | None = None
        try:
            turn.mark("llm_start")
            stream = self.engines.agent.stream(messages, context)
            try:
                while True:
                    try:
                        async with asyncio.timeout(self.settings.llm_timeout_s):
                            delta = await anext(stream)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise EngineError(
                            f"The agent sent nothing for {self.settings.llm_timeout_s:.0f} s.",
                            code="agent_timeout",
                        ) from None
                    if not delta:
                        continue
                    turn.mark("llm_first_token")
                    turn.ai_text += delta
                    self.emit("ai_text", turn, text=delta)
                    for piece in chunker.push(delta):
                        sentences.put_nowait(piece)
            finally:
                await aclose_stream(stream)
            for piece in chunker.flush():
                sentences.put_nowait(piece)
            turn.usage = context.usage.as_dict()
        except EngineError as exc:
            failed = exc
            log.warning("session %s: agent failed: %s", self.session_id, exc)
            self.emit("error", turn, code=exc.code, message=str(exc))
            if not turn.ai_text:
                # Spoken too, so a caller who is not looking at a screen knows what happened.
                sentences.put_nowait(APOLOGY)
        except BaseException:
            speaker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await speaker
            raise
        sentences.put_nowait(None)
        try:
            await speaker
        except BaseException:
            speaker.cancel()
            raise
        if failed is None or turn.ai_text:
            await self._persist_reply(turn, interrupted=False)
        self._finish(turn, interrupted=False)

    def _request(self, history: list[ChatMessage]) -> list[ChatMessage]:
        """What the agent is sent: the instructions, then the window of history that fits."""
        instructions = self.config.instructions
        if self.config.language != "en":
            # Models default to English when the history is short; the caller may not speak it.
            name = language_name(self.config.language)
            instructions += f"\nThe caller speaks {name}: always answer in {name}."
        system: ChatMessage = {"role": "system", "content": instructions}
        return [system, *context_window(history, self.settings.max_history_messages)]

    def _prepare_agent(self) -> None:
        """Let the agent read the next request's system prompt and history before it is asked."""
        agent = self.engines.agent
        if self._closing or not isinstance(agent, PreparingAgent):
            return
        placeholder: ChatMessage = {"role": "user", "content": ""}
        self._spawn(agent.prepare(self._request([*self.history, placeholder])[:-1]))

    async def _speak(self, turn: Turn, sentences: asyncio.Queue[str | None]) -> None:
        if self.sink is None:
            await self._show_text(turn, sentences)
            return
        await self._speak_to(self.sink, turn, sentences)

    async def _show_text(self, turn: Turn, sentences: asyncio.Queue[str | None]) -> None:
        """A text-only call (the client speaks the reply itself): every piece counts as said."""
        while (text := await sentences.get()) is not None:
            turn.mark("tts_start")
            turn.spoken.append((0, 0, text))

    async def _speak_to(self, sink: AudioSink, turn: Turn, sentences: asyncio.Queue[str | None]) -> None:
        resampler = StreamResampler(sink.sample_rate)
        tts = self.engines.tts
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
            if "tts_first_audio" not in turn.marks:
                turn.mark("tts_first_audio")
                self._watch_first_audio(turn, position - pcm.size + 1)
            self._set_state("speaking", turn)
            last_position = position

        while True:
            text = await sentences.get()
            if text is None:
                break
            turn.mark("tts_start")
            piece_start = None
            held: FloatAudio | None = None
            first_chunk = True
            try:
                async for chunk in tts.synthesize(text, voice=self.config.voice, speed=self.config.speed):
                    if first_chunk:
                        # TTS engines pad ~300 ms of silence in front of every sentence: the
                        # caller would hear it as latency on the first, as a long gap on the rest.
                        lead = FIRST_LEAD_S if not turn.spoken else GAP_LEAD_S
                        chunk = trim_silence(chunk, tts.sample_rate, keep_lead_s=lead, keep_tail_s=None)
                        first_chunk = False
                    # One chunk is held back so the end of the piece can be trimmed too.
                    if held is not None:
                        await turn.committed.wait()
                        play(held)
                    held = chunk
            except EngineError as exc:
                log.warning("session %s: TTS failed: %s", self.session_id, exc)
                self.emit("error", turn, code=exc.code, message=str(exc))
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

    def _watch_first_audio(self, turn: Turn, position: int) -> None:
        sink = self.sink
        assert sink is not None, "only a call with audio plays audio"

        async def watch() -> None:
            if await sink.wait_played(position):
                turn.mark("first_audio_played")
                self._send_metrics(turn)

        self._spawn(watch())

    def _send_metrics(self, turn: Turn) -> None:
        if not turn.metrics_sent:
            turn.metrics_sent = True
            self.emit(
                "metrics",
                turn,
                **turn.metrics(),
                speculative=turn.speculative,
                end_of_turn_silence=turn.silence_ms,
            )

    def _finish(self, turn: Turn, *, interrupted: bool) -> None:
        if turn.finished:
            return
        turn.finished = True
        if not turn.shown:
            # Ended before it was shown (interrupted while it was still being stored or
            # transcribed): what it held back is moot; the client only learns it ended.
            turn.held.clear()
            turn.shown = True
        self._send_metrics(turn)
        self.emit(
            "end_of_response",
            turn,
            interrupted=interrupted,
            text=turn.ai_text,
            underruns=turn.underruns,
            message_id=turn.reply_id,
            usage=turn.usage,
        )
        self.turns_completed += 1
        self.last_activity = time.monotonic()
        if self._turn is turn:
            self._turn = None
        self._set_state("listening", turn)
        self._prepare_agent()

    async def _persist(self, message: ChatMessage, turn: Turn, **extra: Any) -> str | None:
        """Store a message before the client hears of it: what a client saw is in the thread.

        Returns its stored id (None without a recorder, or if the write failed).
        """
        if self._recorder is None:
            return None
        written = self._recorder.record(message, {"turn_id": turn.id, "session_id": self.session_id, **extra})
        self._writes.add(written)
        written.add_done_callback(self._writes.discard)
        # Shielded: a turn cancelled mid-write (barge-in, the end of the call) leaves the write to
        # finish, and aclose waits for it.
        return await asyncio.shield(written)

    async def _persist_reply(self, turn: Turn, *, interrupted: bool, said: str | None = None) -> None:
        content = turn.ai_text.strip() if said is None else said
        if not content:
            return
        reply: ChatMessage = {"role": "assistant", "content": content}
        self.history.append(reply)
        turn.reply_id = await self._persist(
            reply, turn, content_type=self.content_type, interrupted=interrupted
        )

    async def interrupt(self, *, reason: str = "client") -> bool:
        """Stop the AI now: flush its audio, cancel the turn's work, keep what was heard."""
        if self._speculation is not None:
            self._drop_speculation()  # nothing of it was shown yet
            return False
        task, turn = self._turn_task, self._turn
        if task is None or task.done() or turn is None:
            return False
        # Without audio, everything the agent said was shown, so all of it counts as heard.
        heard = self.sink.flush() if self.sink is not None else 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if turn.finished:
            return False
        said = turn.said_before(heard)
        if turn.user_text and said:
            await self._persist_reply(turn, interrupted=True, said=said)
        log.info(
            "session %s: turn %s interrupted (%s); heard %r", self.session_id, turn.id, reason, said[:80]
        )
        self._finish(turn, interrupted=True)
        return True

    # -- client events ----------------------------------------------------------------------------
    async def handle_client_message(self, raw: str | bytes) -> None:
        try:
            event = parse_client_event(raw)
        except EventError as exc:
            self.emit("error", code=exc.code, message=exc.message)
            return
        await self.handle_event(event)

    async def handle_event(self, event: ClientEvent) -> None:
        data = event.data
        if event.type != "ping":
            self.last_activity = time.monotonic()
        if event.type == "ping":
            self.emit("pong", id=data.get("id"), t=data.get("t"))
        elif event.type == "interrupt":
            await self.interrupt(reason="client")
        elif event.type == "text_message":
            await self.respond_to_text(data["content"])
        elif event.type == "session.update":
            self.update_session(data)
        elif event.type == "end_of_input":
            self.end_of_input()
        elif event.type == "set_thread":
            await self._set_thread(data["thread_id"])

    def end_of_input(self) -> None:
        """The client says the user is done (push-to-talk): end the turn without waiting for silence."""
        if self.detector.in_speech:
            self.detector.reset()
            self._end_user_turn()
        elif time.monotonic() - self._turn_ended_at < END_OF_INPUT_GRACE_S:
            # The silence already ended this turn here; the client's own pause detection is
            # saying the same thing a little later, which is no mistake.
            log.debug("session %s: end_of_input after the turn had ended", self.session_id)
        else:
            self.emit(
                "error",
                code="no_speech",
                message="end_of_input came, but no speech was heard since the last turn.",
            )

    async def respond_to_audio(self, pcm: Int16Audio) -> None:
        """Answer a whole recorded utterance (16 kHz PCM), without voice activity detection."""
        await self.interrupt(reason="new_input")
        turn = Turn(id=uuid.uuid4().hex[:12], source="voice")
        turn.mark("speech_end")
        turn.mark("turn_end")
        self._start_turn(turn, self._voice_turn(turn, pcm))

    async def respond_to_text(self, text: str, *, spoken: bool = False) -> None:
        """Answer typed text, or (``spoken``) a transcript the client made of the caller's speech."""
        await self.interrupt(reason="text_message")
        turn = Turn(id=uuid.uuid4().hex[:12], source="text", user_text=text.strip())
        turn.mark("speech_end")
        self._start_turn(turn, self._text_turn(turn, "voice" if spoken else "text"))

    def thread_created(self, thread_id: str) -> None:
        """The call's thread was made with its first message (it had none): the client learns its id."""
        self.thread_id = thread_id
        self.emit("thread.updated", thread_id=thread_id, messages=len(self.history))

    async def _set_thread(self, thread_id: str) -> None:
        if self._recorder is None:
            self.emit("error", code="threads_unavailable", message="This server keeps no threads.")
            return
        await self.interrupt(reason="set_thread")
        try:
            history = await self._recorder.switch_thread(thread_id)
        except LookupError:
            self.emit(
                "error", code="thread_not_found", message=f"No thread {thread_id[:64]!r} for this user."
            )
            return
        self.thread_id = thread_id
        self.history = history
        self.emit("thread.updated", thread_id=thread_id, messages=len(history))
        self._prepare_agent()

    def update_session(self, data: dict[str, Any]) -> None:
        """Apply what a client asked for; each field that cannot be served is an ``error`` event of
        its own, and the others still apply. Ends with ``session.updated`` (the settings in force)."""
        for refused in self.config.update(self.engines, data, speaks=self.sink is not None):
            self.emit("error", code=refused.code, message=str(refused))
        if "instructions" in data:
            self._prepare_agent()
        self.emit("session.updated", **self.config.as_event())

    # -- lifecycle --------------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any]) -> None:
        self._own(asyncio.ensure_future(coro))

    def _own(self, task: asyncio.Task[Any] | asyncio.Future[Any]) -> None:
        """Keep a reference until done (so it is not collected) and cancel it on close."""
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        # A reply cut short by the end of the call is kept as far as it was heard, as on barge-in.
        await self.interrupt(reason="call_ended")
        self._closed = True
        tasks = [t for t in (self._turn_task, self._partial_task, *self._side_tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception(
                    "session %s: task %s failed while closing",
                    self.session_id,
                    getattr(task, "get_name", lambda: "?")(),
                )
        self._side_tasks.clear()
        # Closed means stored: whoever says goodbye next ("session.ended", "Conversation saved")
        # may be followed at once by the app reading the thread. The recorder resolves every write;
        # the bound is for a database that hangs, which must not hold the call open for ever.
        if self._writes:
            _done, pending = await asyncio.wait(set(self._writes), timeout=WRITE_WAIT_S)
            if pending:
                log.error(
                    "session %s: %d messages still being stored at close", self.session_id, len(pending)
                )


# A transport builds its call's Conversation from its own sink and event sender.
# A text-only transport passes None: the client speaks the replies itself.
ConversationFactory = Callable[[AudioSink | None, Callable[[Event], None]], Conversation]


def _is_speech(text: str) -> bool:
    # Whisper's usual hallucinations on noise: brackets, music notes, lone punctuation.
    stripped = text.strip().strip(".!?,")
    if not stripped or not any(ch.isalnum() for ch in stripped):
        return False
    return not (stripped.startswith(("[", "(")) and stripped.endswith(("]", ")")))


async def aclose_stream(stream: Any) -> None:
    """Close an agent's reply stream, so a cancelled generation stops at once."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
