"""The turn-taking state machine of one call: listening → thinking → speaking, and barge-in.

A transport feeds it 16 kHz mono PCM (:meth:`Conversation.push_audio`) and raw client events
(:meth:`Conversation.handle_client_message`); the conversation emits server events through the
``send`` callable and plays speech into an :class:`AudioSink`. The same class serves WebRTC and
WebSocket calls, so every behaviour is written once.

It orchestrates; the parts live beside it: the utterance being heard (utterance.py), speech and
silence (turns.py), how much silence ends a turn (endpointing.py, the turn policy), whether a
sound over the AI interrupts it (interruptions.py), the tools the agent may call (call_tools.py),
reading the agent's reply (replies.py), speaking it (speaker.py) and storing messages
(recording.py).

Ownership: each user turn's work (final STT, agent, TTS) runs in one task, ``_turn_task``;
barge-in cancels exactly that task and flushes the sink. Partial transcripts run in
``_partial_task``, the check of a sound over the AI in its own side task, and a speculative
turn's transcription in its own task too (it outlives the turn: see :meth:`_speculate`).
:meth:`aclose` cancels and awaits them all and is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, Literal

import numpy as np

from ..audio import STT_RATE, Int16Audio, int16_to_float
from ..engines.base import AgentContext, ChatMessage, EngineError, Engines, PreparingAgent
from ..engines.languages import language_name
from ..engines.vad import WINDOW, WINDOW_MS, VadStream
from ..settings import Settings
from ..telemetry.logs import turn_id_var
from ..tools import Toolbox, ToolInvocation
from .call_tools import CallTools
from .config import SessionConfig
from .endpointing import TurnPolicy, Verdict, build_policy
from .events import ClientEvent, EventError, parse_client_event
from .history import context_window
from .interruptions import SoundJudge, is_speech, rejoinable
from .recording import Recorder, Writes
from .replies import APOLOGY, read_reply
from .speaker import AudioSink, speak
from .tool_calls import ReplyTools
from .turns import Turn, TurnDetector, TurnEvent
from .utterance import QUIET_MAX_PROB, Utterance

__all__ = ["APOLOGY", "AudioSink", "Conversation", "ConversationFactory", "Recorder", "Turn"]

log = logging.getLogger(__name__)

State = Literal["listening", "thinking", "speaking"]
Event = dict[str, Any]

SPECULATE_AFTER_WINDOWS = 1  # at the first silent window, start transcribing (see _speculate)
PRE_ROLL_MS = 300  # audio kept from before the VAD fired, so the first syllable is transcribed
WRITE_WAIT_S = 15.0  # how long closing a call waits for its messages to be stored
# A push-to-talk client's end_of_input this soon after the silence ended the turn is about that turn.
END_OF_INPUT_GRACE_S = 3.0


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
        policy: TurnPolicy | None = None,
        tools: Toolbox | None = None,
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
        self.tools = CallTools(tools, settings, engines.agent, self.emit)
        # Set by the transport: ends the call with a reason (the AI hung up: agent_hangup).
        self.request_end: Callable[[str], None] | None = None
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
        self.policy = policy if policy is not None else build_policy(settings, engines.eot)
        self.detector = TurnDetector(
            window_ms=WINDOW_MS,
            threshold=settings.vad_threshold,
            min_speech_ms=settings.min_speech_ms,
            end_silence_ms=self.policy.max_silence_ms,
        )
        self._pending = np.zeros(0, dtype=np.int16)
        self._utterance = Utterance(PRE_ROLL_MS // WINDOW_MS + self.detector.min_speech_windows)
        self._last_partial_at = 0.0
        self._last_partial_text = ""
        self._turn_ended_at = -1e9  # when the last voice turn ended (end_of_input after it is no error)
        self._turn: Turn | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._partial_task: asyncio.Task[None] | None = None
        self._speculation: Turn | None = None
        # Judges a sound over the AI (a cough or an interruption?) where replies are heard and may
        # be paused; elsewhere any speech over the AI interrupts at once.
        self._sounds = (
            SoundJudge(
                settings=settings,
                detector=self.detector,
                utterance=self._utterance,
                sink=sink,
                transcribe=self._transcribe,
                barge_in=lambda turn, rejoin: self._barge_in(turn, rejoin=rejoin),
                end_user_turn=self._end_user_turn,
                emit=self.emit,
                own=self._own,
                session_id=session_id,
            )
            if sink is not None and settings.barge_in_ms > 0
            else None
        )
        self._continues: str | None = None
        self._side_tasks: set[asyncio.Task[Any] | asyncio.Future[Any]] = set()
        self._writes = Writes(recorder)  # messages being stored
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
                self._utterance.begin()
            quiet = self._utterance.add(window, speech=prob >= detector.off_threshold, arrived=arrived)
        else:
            self._utterance.idle(window)

        if event is TurnEvent.SPEECH_START:
            await self._on_speech_start()
        elif self._sounds is not None and self._sounds.pending is not None:
            await self._sounds.on_window(event)
        elif event is TurnEvent.TURN_END:
            self._end_user_turn(silence_ms=detector.turn_end_silence_ms)
        elif detector.in_speech:
            if self._utterance.samples >= self.settings.max_utterance_s * STT_RATE:
                detector.reset()
                self._end_user_turn()
            elif detector.silence_run == 0:
                if not quiet:
                    self._drop_speculation()
                    self._maybe_partial()
                elif self._speculation is None and prob < QUIET_MAX_PROB and not self._stt_busy():
                    self._speculate()  # the level fell before the VAD's probability did
            elif self._speculation is None:
                if detector.silence_run >= SPECULATE_AFTER_WINDOWS:
                    self._speculate()
            else:
                self._end_on_verdict(self._speculation)

    def _speculate(self) -> None:
        """Start answering during the end-of-turn silence; commit when the silence ends the turn.

        STT, the agent and the first sentence's TTS all run while the caller is silent, so when
        the turn ends the reply is (nearly) ready to play. Until then the turn shows nothing; if
        the caller goes on speaking, it is dropped as if it never happened.
        """
        audio = self._utterance.audio()
        self._cancel_partial()
        turn = Turn(id=uuid.uuid4().hex[:12], source="voice", speculative=True)
        self._speculation = turn
        # The Whisper pass outlives the turn. A caller who goes on after a short pause drops the
        # turn, but not the CPU already spent: its words are the partial transcript of the
        # sentence so far, and the next partial waits a full interval from here. Before, a
        # partial pass followed nearly every dropped speculation, on nearly the same audio
        # (a third of all passes on bench/mixed.txt).
        transcript = asyncio.create_task(self._transcribe(audio), name=f"stt-{turn.id}")
        self._own(transcript)
        transcript.add_done_callback(lambda task: self._dropped_transcript(turn, task))
        self._last_partial_at = time.monotonic()
        self._start_turn(turn, self._voice_turn(turn, audio, transcript))

    def _dropped_transcript(self, turn: Turn, task: asyncio.Task[str]) -> None:
        """A speculative turn's transcript is in: if the turn was dropped, show it as a partial."""
        if task.cancelled() or task.exception() is not None:
            return  # a turn still alive reports the error; a dropped one has nobody to tell
        if self._closed or self._speculation is turn or turn.committed.is_set():
            return  # the turn itself shows it, as its final transcript
        self._show_partial(task.result())

    def _end_on_verdict(self, turn: Turn) -> None:
        """End the speculative turn if its verdict is in and the silence has lasted as long as it says."""
        verdict = turn.verdict
        silence_ms = self.detector.silence_ms
        if self._speculation is not turn or verdict is None or silence_ms < verdict.silence_ms:
            return
        self.detector.reset()
        self._end_user_turn(silence_ms=silence_ms)

    async def _judge(self, turn: Turn, text: str, audio: Int16Audio) -> None:
        """The turn policy's verdict on a speculative turn, made while the caller is silent."""
        if not self.policy.needs_transcript:
            return  # the detector's silence is the verdict
        loop = asyncio.get_running_loop()
        judging = loop.run_in_executor(
            self.engines.eot_executor, self.policy.judge, text, int16_to_float(audio)
        )
        verdict = await judging
        turn.verdict = verdict
        log.debug("session %s: turn %s verdict %s", self.session_id, turn.id, verdict)
        self._end_on_verdict(turn)  # the silence may already be long enough

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
        self._continues = None
        task, turn = self._turn_task, self._turn
        if self._sounds is not None and self._sounds.pending is not None:
            self._sounds.again()
        elif task is not None and not task.done() and turn is not None:
            spoken_s = self.detector.speech_run * WINDOW_MS / 1000.0  # the speech that started it
            samples = self._utterance.samples
            rejoin = rejoinable(turn, self.settings, samples, spoken_s=spoken_s)
            if self._sounds is not None:
                # Maybe a cough: the reply waits while the sound is judged.
                may_continue = rejoin or rejoinable(
                    turn, self.settings, samples, spoken_s=spoken_s, heard_s=None
                )
                self._sounds.begin(turn, rejoin=rejoin, may_continue=may_continue)
            else:
                await self._barge_in(turn, rejoin=rejoin)
        self.emit("speech_started")

    async def _barge_in(self, turn: Turn, *, rejoin: bool) -> None:
        """The caller talks over the AI (or over its thinking): the new turn wins.

        A caller who starts again within ``rejoin_ms`` of the end of their turn was not done
        ("I want to book a table ... for four"): the new turn hears the earlier audio again, so
        the reply is to the whole sentence, and the early exchange leaves the agent's history
        (the thread keeps it, marked by the new transcript's ``continues``).
        """
        if rejoin:
            # Before the await: windows go on arriving while the reply is cancelled, and a
            # speculation or a turn end among them must already hear the words before.
            self._utterance.prepend(turn.audio)
            self._continues = turn.id
        await self.interrupt(reason="barge_in")
        if not rejoin:
            return
        early = (turn.user_message, turn.reply_message)
        self.history = [m for m in self.history if not any(m is e for e in early)]

    def _end_user_turn(self, *, silence_ms: float | None = None) -> None:
        speech_end_at = self._utterance.speech_end_at
        utterance = self._utterance.take()
        audio = np.concatenate(utterance) if utterance else np.zeros(0, np.int16)
        self._cancel_partial()
        turn, self._speculation = self._speculation, None
        if turn is None:
            turn = Turn(id=uuid.uuid4().hex[:12], source="voice")
            self._start_turn(turn, self._voice_turn(turn, audio))
        if speech_end_at is not None:
            turn.marks["speech_end"] = speech_end_at
        turn.silence_ms = silence_ms
        turn.continues, self._continues = self._continues, None
        turn.audio = utterance
        turn.mark("turn_end")
        turn.ended_at = self._turn_ended_at = time.monotonic()
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
        audio = self._utterance.audio()
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
            text = await self._transcribe(audio)
        except EngineError as exc:
            log.warning("session %s: partial transcription failed: %s", self.session_id, exc)
            return
        self._show_partial(text)

    def _show_partial(self, text: str) -> None:
        if text and text != self._last_partial_text and self.detector.in_speech:
            self._last_partial_text = text
            self.emit("partial_transcript", text=text)
            if self._turn_task is None or self._turn_task.done():
                # The reply's prompt holds these words: read them now, not after the caller stops
                # (~5 ms a token on 2 cores). Not while a reply is still out: that reply's words
                # are not in the history yet, and reading a prompt without them would evict them.
                self._prepare_agent(said=text)

    async def _transcribe(self, audio: Int16Audio) -> str:
        return await self.engines.stt.transcribe(int16_to_float(audio), language=self.config.language)

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

    async def _voice_turn(
        self, turn: Turn, audio: Int16Audio, transcript: asyncio.Task[str] | None = None
    ) -> None:
        """Answer one utterance; ``transcript`` is its transcription already running (speculation)."""
        turn.mark("stt_start")
        try:
            # Shielded: dropping the turn must not cancel a transcription it does not own alone.
            text = await (self._transcribe(audio) if transcript is None else asyncio.shield(transcript))
        except EngineError as exc:
            await turn.committed.wait()
            self._reveal(turn, ("error", {"code": exc.code, "message": str(exc)}))
            self._set_state("listening")
            return
        turn.mark("stt_end")
        if not is_speech(text):
            # Noise the VAD took for speech: nothing was said, so nothing is answered (and there is
            # no sentence to wait for the end of).
            turn.verdict = Verdict(self.settings.end_of_turn_silence_ms, reason="no_words")
            self._end_on_verdict(turn)
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
            if not turn.committed.is_set():
                await self._judge(turn, text, audio)
            await turn.committed.wait()
            message_id = turn.user_message_id = await self._persist(user, turn, content_type="voice")
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
        turn.user_message_id = await self._persist(user, turn, content_type=content_type)
        await self._respond(turn)

    async def _respond(self, turn: Turn) -> None:
        """Stream the agent's reply for the turn whose user message ends ``history``."""
        messages = self._request(self.history)
        config = self.config
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        context = AgentContext(
            self.session_id,
            self.thread_id,
            self.user_id,
            config.language,
            model=config.model,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            tools=self._reply_tools(turn, sentences),
        )
        self._set_state("thinking", turn)

        speaker = asyncio.create_task(self._speak(turn, sentences), name=f"speak-{turn.id}")
        failed: EngineError | None = None

        def on_delta(delta: str) -> None:
            turn.mark("llm_first_token")
            turn.ai_text += delta
            self.emit("ai_text", turn, text=delta)

        try:
            turn.mark("llm_start")
            stream = self.engines.agent.stream(messages, context)
            await read_reply(
                stream, timeout_s=self.settings.llm_timeout_s, on_delta=on_delta, pieces=sentences
            )
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

    def _reply_tools(self, turn: Turn, sentences: asyncio.Queue[str | None]) -> ReplyTools | None:
        def end_call() -> None:
            turn.hang_up = True

        caller = ToolInvocation(
            call_id="",
            session_id=self.session_id,
            thread_id=self.thread_id,
            user_id=self.user_id,
            timezone=self.config.timezone or self.settings.timezone or None,
            end_call=end_call,
        )
        return self.tools.for_reply(
            turn, sentences, caller, lambda type, **data: self.emit(type, turn, **data)
        )

    def _request(self, history: list[ChatMessage]) -> list[ChatMessage]:
        """What the agent is sent: the instructions, then the window of history that fits."""
        instructions = self.config.instructions
        if self.config.language != "en":
            # Models default to English when the history is short; the caller may not speak it.
            name = language_name(self.config.language)
            instructions += f"\nThe caller speaks {name}: always answer in {name}."
        system: ChatMessage = {"role": "system", "content": instructions}
        return [system, *context_window(history, self.settings.max_history_messages)]

    def _prepare_agent(self, said: str = "") -> None:
        """Let the agent read the next request's system prompt and history before it is asked,
        and the caller's words so far (``said``) while the caller is still speaking."""
        agent = self.engines.agent
        if self._closing or not isinstance(agent, PreparingAgent):
            return
        placeholder: ChatMessage = {"role": "user", "content": ""}
        self._spawn(agent.prepare(self._request([*self.history, placeholder])[:-1], said=said))

    async def _speak(self, turn: Turn, sentences: asyncio.Queue[str | None]) -> None:
        if self.sink is None:
            await self._show_text(turn, sentences)
            return

        def on_audio(position: int, first: bool) -> None:
            if first:
                self._watch_first_audio(turn, position + 1)
            self._set_state("speaking", turn)

        def on_error(exc: EngineError) -> None:
            self.emit("error", turn, code=exc.code, message=str(exc))

        await speak(
            self.sink,
            self.engines.tts,
            turn,
            sentences,
            voice=self.config.voice,
            speed=self.config.speed,
            on_audio=on_audio,
            on_error=on_error,
        )

    async def _show_text(self, turn: Turn, sentences: asyncio.Queue[str | None]) -> None:
        """A text-only call (the client speaks the reply itself): every piece counts as said."""
        while (text := await sentences.get()) is not None:
            turn.mark("tts_start")
            turn.spoken.append((0, 0, text))

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
                # Why that silence: the turn policy's reading of the words (and its P(done)).
                end_of_turn_reason=turn.verdict.reason if turn.verdict else None,
                end_of_turn_probability=(
                    round(turn.verdict.done, 3) if turn.verdict and turn.verdict.done is not None else None
                ),
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
        if turn.hang_up and not interrupted and self.request_end is not None:
            # The goodbye has been heard (the reply's audio has played): the AI hangs up. A caller
            # who cut the goodbye short has more to say, so an interrupted reply does not.
            log.info("session %s: the AI ended the call (end_call)", self.session_id)
            self.request_end("agent_hangup")
            return
        self._prepare_agent()

    async def _persist(self, message: ChatMessage, turn: Turn, **extra: Any) -> str | None:
        """Store a message before the client hears of it: what a client saw is in the thread."""
        return await self._writes.store(message, {"turn_id": turn.id, "session_id": self.session_id, **extra})

    async def _persist_reply(self, turn: Turn, *, interrupted: bool, said: str | None = None) -> None:
        content = turn.ai_text.strip() if said is None else said
        # What the tools did is history the next turns need, even when nothing of the reply was
        # heard; kept in the thread (after the user's message) for later calls on it too.
        done, turn.tool_messages = turn.tool_messages, []
        self.history += done
        if done and turn.user_message_id is not None:
            await self._writes.store(
                {"role": "tool", "content": ""},
                {"tool_messages": done, "after_message_id": turn.user_message_id, "turn_id": turn.id},
            )
        if not content:
            return
        reply: ChatMessage = {"role": "assistant", "content": content}
        self.history.append(reply)
        turn.reply_message = reply
        turn.reply_id = await self._persist(
            reply, turn, content_type=self.content_type, interrupted=interrupted
        )

    async def interrupt(self, *, reason: str = "client") -> bool:
        """Stop the AI now: flush its audio, cancel the turn's work, keep what was heard."""
        if self._speculation is not None:
            self._drop_speculation()  # nothing of it was shown yet
            return False
        if self._sounds is not None:
            self._sounds.end()
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
        elif event.type == "tool_result":
            self.tools.answer(data)

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
        if "tools" in data:
            self.tools.declare(data["tools"])
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
        if pending := await self._writes.drain(WRITE_WAIT_S):
            log.error("session %s: %d messages still being stored at close", self.session_id, pending)


# A transport builds its call's Conversation from its own sink and event sender.
# A text-only transport passes None: the client speaks the replies itself.
ConversationFactory = Callable[[AudioSink | None, Callable[[Event], None]], Conversation]
